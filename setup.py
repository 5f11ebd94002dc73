"""Packaging of ECLIPSE-D2: ECLIPSE (continual panoptic segmentation with visual prompt tuning)
as a Detectron2 extension.

PyTorch, torchvision and Detectron2 are deliberately NOT listed in ``install_requires``:
they are platform- and CUDA-specific, and a user's own builds must never be replaced by
``pip install -e .``. Install them first (``tools/install.sh`` does it for a fresh
environment), then this package.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _long_description() -> str:
    readme = HERE / "README.md"
    return readme.read_text(encoding="utf-8") if readme.is_file() else ""


setup(
    name="eclipse-d2",
    version="0.1.0",
    description=(
        "ECLIPSE (CVPR 2024): continual panoptic/semantic segmentation with visual prompt "
        "tuning, re-implemented as a Detectron2 extension"
    ),
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["mask2former", "mask2former.*", "continual", "continual.*"]),
    python_requires=">=3.9",
    install_requires=[
        "numpy<2",
        "scipy",
        "Pillow",
        "matplotlib",
        "pycocotools",
        "fvcore",
        "iopath",
        "panopticapi-lite",
        "opencv-python-headless",
        "pyyaml",
    ],
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
