"""The synthetic dataset on disk: ``synthetic_panoptic_{train,val}`` and
``synthetic_sem_seg_{train,val}``.

It is written by ``datasets/generate_synthetic.py`` into ``$DETECTRON2_DATASETS/synthetic/`` in
the ADE20K-panoptic layout (see :mod:`.register_ade20k_panoptic`), with PNG images, prefix
``synthetic`` and the categories of :data:`.synthetic.SYNTHETIC_CATEGORIES` behind void (id 0).
"""
from typing import Dict, List

from .register_ade20k_panoptic import register_panoptic_ade20k_layout
from .register_ade20k_semantic import register_semantic_ade20k_layout
from .synthetic import SYNTHETIC_CATEGORIES

__all__ = [
    "SYNTHETIC_DATASET_DIR",
    "SYNTHETIC_IMAGE_EXT",
    "SYNTHETIC_PANOPTIC_CATEGORIES",
    "SYNTHETIC_PREFIX",
    "SYNTHETIC_PREPARE_COMMAND",
]

SYNTHETIC_DATASET_DIR = "synthetic"
SYNTHETIC_PREFIX = "synthetic"
# PNG, not JPEG: lossless, so the stored pixels are exactly the rendered ones, and the bytes do
# not depend on the JPEG encoder version (datasets/README.md).
SYNTHETIC_IMAGE_EXT = "png"
SYNTHETIC_PREPARE_COMMAND = "python datasets/generate_synthetic.py"

#: void (id 0) followed by the 10 synthetic categories (ids 1..10).
SYNTHETIC_PANOPTIC_CATEGORIES: List[Dict] = [
    {"id": 0, "name": "void", "isthing": 0, "color": [0, 0, 0]}
] + [
    {"id": c["id"], "name": c["name"], "isthing": int(c["isthing"]), "color": list(c["color"])}
    for c in SYNTHETIC_CATEGORIES
]

for _split in ("train", "val"):
    register_panoptic_ade20k_layout(
        f"synthetic_panoptic_{_split}",
        dataset_dir=SYNTHETIC_DATASET_DIR,
        split=_split,
        prefix=SYNTHETIC_PREFIX,
        categories=SYNTHETIC_PANOPTIC_CATEGORIES,
        prepare_command=SYNTHETIC_PREPARE_COMMAND,
        image_ext=SYNTHETIC_IMAGE_EXT,
    )
    register_semantic_ade20k_layout(
        f"synthetic_sem_seg_{_split}",
        dataset_dir=SYNTHETIC_DATASET_DIR,
        split=_split,
        class_names=[c["name"] for c in SYNTHETIC_PANOPTIC_CATEGORIES],
        class_colors=[c["color"] for c in SYNTHETIC_PANOPTIC_CATEGORIES],
        prepare_command=SYNTHETIC_PREPARE_COMMAND,
        image_ext=SYNTHETIC_IMAGE_EXT,
    )
