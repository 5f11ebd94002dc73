#!/usr/bin/env python3
"""Write detectron2's ADE20K semantic labels (``annotations_detectron2/``) from the raw ones.

    python datasets/prepare_ade20k_sem_seg.py [--dataset-dir DIR]

``DIR`` defaults to ``$DETECTRON2_DATASETS/ADEChallengeData2016``. Every
``annotations/{training,validation}/<stem>.png`` (0 = other, 1..150 classes) becomes
``annotations_detectron2/{training,validation}/<stem>.png`` with label ``v - 1`` for classes
(0..149) and 255 for "other". These files serve detectron2's builtin ``ade20k_sem_seg_{train,val}``;
the ECLIPSE names ``myade20k_sem_seg_{train,val}`` read the raw ``annotations/`` and need no
preparation.
"""
import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["convert_labels", "prepare", "main"]


def _default_dataset_dir() -> str:
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "ADEChallengeData2016")


def convert_labels(raw: np.ndarray) -> np.ndarray:
    """Raw ADE20K labels (uint8, 0 = other) -> detectron2 labels (class - 1, other = 255)."""
    return (raw.astype(np.int32) - 1).astype(np.uint8)  # 0 - 1 wraps to 255


def prepare(dataset_dir: str) -> int:
    """Convert both splits; returns the number of files written."""
    written = 0
    for folder in ("training", "validation"):
        src = os.path.join(dataset_dir, "annotations", folder)
        dst = os.path.join(dataset_dir, "annotations_detectron2", folder)
        if not os.path.isdir(src):
            raise FileNotFoundError(
                f"Missing folder {src}: download and unzip ADEChallengeData2016.zip (see datasets/README.md)."
            )
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if not name.endswith(".png"):
                continue
            raw = np.asarray(Image.open(os.path.join(src, name)))
            if raw.ndim != 2:
                raise ValueError(f"{os.path.join(src, name)}: expected a single-channel label image")
            Image.fromarray(convert_labels(raw)).save(os.path.join(dst, name))
            written += 1
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default=None,
                        help="ADEChallengeData2016 folder (default: $DETECTRON2_DATASETS/ADEChallengeData2016)")
    args = parser.parse_args(argv)
    dataset_dir = args.dataset_dir or _default_dataset_dir()
    print(f"Wrote {prepare(dataset_dir)} label files under {os.path.join(dataset_dir, 'annotations_detectron2')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
