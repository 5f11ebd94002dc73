"""Training mappers of Mask2Former/ECLIPSE (test time uses detectron2's ``DatasetMapper``)."""
from .color_augmentation import ColorAugSSD, ColorAugSSDTransform
from .file_reading import UnreadableFileError, read_image_file, read_label_file
from .mask_former_panoptic_dataset_mapper import MaskFormerPanopticDatasetMapper, panoptic_to_semantic
from .mask_former_semantic_dataset_mapper import (
    MaskFormerSemanticDatasetMapper,
    build_mask_former_train_augmentations,
    pad_to_divisible,
)

__all__ = [
    "ColorAugSSD",
    "ColorAugSSDTransform",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "UnreadableFileError",
    "build_mask_former_train_augmentations",
    "build_train_mapper",
    "pad_to_divisible",
    "panoptic_to_semantic",
    "read_image_file",
    "read_label_file",
]

_MAPPERS = {
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
}


def build_train_mapper(cfg):
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``
    (``"mask_former_panoptic"`` or ``"mask_former_semantic"``)."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in _MAPPERS:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME must be one of {sorted(_MAPPERS)}, got {name!r}"
        )
    return _MAPPERS[name](cfg, True)
