"""COCO panoptic with semantic labels: ``coco_2017_{train,val}_panoptic_with_sem_seg``.

Files under ``$DETECTRON2_DATASETS/coco/``: images ``{train,val}2017/``, panoptic PNGs
``panoptic_{train,val}2017/``, panoptic json ``annotations/panoptic_{train,val}2017.json`` and the
semantic PNGs ``panoptic_semseg_{train,val}2017/`` (0-based contiguous ids, 255 = unlabeled) made
by ``datasets/prepare_coco_semantic_annos_from_panoptic_annos.py``.

Contiguous ids are the index in detectron2's ``COCO_CATEGORIES`` (0..132, person = 0), as for
detectron2's builtin ``coco_2017_train_panoptic`` that ECLIPSE trains on.
"""
import os
from typing import Dict

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .catalog_utils import register_panoptic_json_dataset

__all__ = ["COCO_PANOPTIC_SEMSEG_PREPARE_COMMAND", "coco_panoptic_metadata"]

COCO_PANOPTIC_SEMSEG_PREPARE_COMMAND = "python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py"


def coco_panoptic_metadata() -> Dict:
    """Class metadata: things only in ``thing_*``, all 133 categories in ``stuff_*``; the thing
    map covers things, the stuff map every category (so the semantic evaluator sees all)."""
    things = [(i, c) for i, c in enumerate(COCO_CATEGORIES) if c["isthing"]]
    return {
        "thing_classes": [c["name"] for _, c in things],
        "thing_colors": [c["color"] for _, c in things],
        "stuff_classes": [c["name"] for c in COCO_CATEGORIES],
        "stuff_colors": [c["color"] for c in COCO_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in things},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)},
    }


def _register(split: str) -> None:
    name = f"coco_2017_{split}_panoptic_with_sem_seg"
    register_panoptic_json_dataset(
        name,
        {
            "image_root": os.path.join("coco", f"{split}2017"),
            "panoptic_root": os.path.join("coco", f"panoptic_{split}2017"),
            "panoptic_json": os.path.join("coco", "annotations", f"panoptic_{split}2017.json"),
            "sem_seg_root": os.path.join("coco", f"panoptic_semseg_{split}2017"),
            "json_file": os.path.join("coco", "annotations", f"instances_{split}2017.json"),
        },
        coco_panoptic_metadata(),
        evaluator_type="coco_panoptic_seg",
        prepare_command=COCO_PANOPTIC_SEMSEG_PREPARE_COMMAND,
        image_ext="jpg",
        integer_image_ids=True,
    )

for _split in ("train", "val"):
    _register(_split)
