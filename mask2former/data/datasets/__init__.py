"""Dataset registrations (importing this package registers every name; nothing is read from disk).

Registered names (files under ``$DETECTRON2_DATASETS``, see ``datasets/README.md``):

* ``myade20k_panoptic_{train,val}``: ADE20K panoptic, ids 0 (void) .. 150;
* ``myade20k_sem_seg_{train,val}``: ADE20K semantic on the raw labels (0 = other);
* ``coco_2017_{train,val}_panoptic_with_sem_seg``: COCO panoptic plus semantic PNGs, ids 0..132;
* ``synthetic_panoptic_{train,val}`` / ``synthetic_sem_seg_{train,val}``: the generated dataset.
"""
from . import synthetic
from . import register_ade20k_panoptic
from . import register_ade20k_semantic
from . import register_coco_panoptic_annos_semseg
from . import register_synthetic
from .catalog_utils import DatasetFilesMissingError, datasets_root
from .register_ade20k_panoptic import (
    ADE20K_150_CATEGORIES,
    panoptic_layout_metadata,
    register_panoptic_ade20k_layout,
)
from .register_ade20k_semantic import register_semantic_ade20k_layout

__all__ = [
    "ADE20K_150_CATEGORIES",
    "DatasetFilesMissingError",
    "datasets_root",
    "panoptic_layout_metadata",
    "register_panoptic_ade20k_layout",
    "register_semantic_ade20k_layout",
]
