"""Training mapper for semantic segmentation: image + label PNG -> Mask2Former targets."""
import copy
import logging
import math
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from .color_augmentation import ColorAugSSD
from .file_reading import UnreadableFileError, read_image_file, read_label_file

__all__ = ["MaskFormerSemanticDatasetMapper", "build_mask_former_train_augmentations", "pad_to_divisible"]

#: pixel value of the padded image border (the official mappers use 128)
IMAGE_PAD_VALUE = 128


def build_mask_former_train_augmentations(cfg) -> List[T.Augmentation]:
    """The training augmentations of the Mask2Former mappers, in order.

    ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN, INPUT.MIN_SIZE_TRAIN_SAMPLING)``;
    if ``INPUT.CROP.ENABLED``: ``RandomCrop_CategoryAreaConstraint(CROP.TYPE, CROP.SIZE,
    CROP.SINGLE_CATEGORY_MAX_AREA, MODEL.SEM_SEG_HEAD.IGNORE_VALUE)``; if ``INPUT.COLOR_AUG_SSD``:
    :class:`ColorAugSSD`; then a random flip (``INPUT.RANDOM_FLIP``, horizontal by default).
    """
    augs = [
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    ]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.COLOR_AUG_SSD:
        augs.append(ColorAugSSD(img_format=cfg.INPUT.FORMAT))
    flip = cfg.INPUT.RANDOM_FLIP
    if flip != "none":
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    return augs


def pad_to_divisible(tensor: torch.Tensor, divisor: int, value) -> torch.Tensor:
    """Pad the last two dims of ``tensor`` (bottom and right) up to multiples of ``divisor``.

    With ECLIPSE's settings (crop size = ``INPUT.SIZE_DIVISIBILITY``) every training image is at
    most ``divisor`` wide and tall, so this pads to exactly ``divisor`` x ``divisor``.
    """
    h, w = tensor.shape[-2:]
    target_h, target_w = math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor
    if (target_h, target_w) == (h, w):
        return tensor.contiguous()
    return F.pad(tensor, [0, target_w - w, 0, target_h - h], value=value).contiguous()


def _masks_tensor(masks: List[np.ndarray], height: int, width: int) -> torch.Tensor:
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(np.stack(masks)).to(torch.bool)


def _train_ignore_label(cfg) -> int:
    # the official mappers read it from the metadata of the first training dataset
    if cfg.DATASETS.TRAIN:
        value = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", None)
        if value is not None:
            return int(value)
    return int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)


class MaskFormerSemanticDatasetMapper:
    """Map a semantic-segmentation dataset dict to a Mask2Former training input.

    Reads ``file_name`` and ``sem_seg_file_name``, applies the augmentations to both, pads them
    (training, ``size_divisibility > 0``: image with 128, labels with ``ignore_label``) and
    builds one target per class present.

    Output: the input dict without ``sem_seg_file_name``, plus ``image`` (uint8 [3, H, W]),
    ``height``/``width`` (original size), ``sem_seg`` (int64 [H, W]) and ``instances`` with
    ``gt_classes`` (int64 [N], sorted) and ``gt_masks`` (bool [N, H, W]): every label value except
    ``ignore_label``, and except 0 when ``remove_bkg`` (``not MODEL.MASK_FORMER.TEST.MASK_BG``).
    Files that cannot be read raise :class:`~.file_reading.UnreadableFileError` naming the file.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        ignore_label: int,
        size_divisibility: int,
        remove_bkg: bool,
        skip_unreadable: bool = False,
    ):
        """
        Args:
            is_train: training (pads) or inference (does not).
            augmentations: detectron2 augmentations or transforms, applied in order.
            image_format: the image format for ``read_image`` (``cfg.INPUT.FORMAT``).
            ignore_label: the label ignored by the loss; fills the label padding.
            size_divisibility: pad training inputs to a multiple of this (<= 0: no padding).
            remove_bkg: drop class 0 from the targets.
            skip_unreadable: a sample whose file cannot be read is skipped with a warning
                (the loader draws another one) instead of stopping the run.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.size_divisibility = size_divisibility
        self.remove_bkg = remove_bkg
        self.skip_unreadable = skip_unreadable
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[{type(self).__name__}] Augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        augs = build_mask_former_train_augmentations(cfg) if is_train else utils.build_augmentation(cfg, False)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": _train_ignore_label(cfg),
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "remove_bkg": not cfg.MODEL.MASK_FORMER.TEST.MASK_BG,
            "skip_unreadable": cfg.DATALOADER.SKIP_UNREADABLE_FILES,
        }

    # ----------------------------------------------------------------------------- reading
    def read_files(self, dataset_dict: Dict) -> Dict[str, Optional[np.ndarray]]:
        """Read the files of one sample (the only disk access of the mapper).

        Returns:
            ``{"image": uint8 [H, W, C], "sem_seg": [H, W] or None}``.
        Raises:
            UnreadableFileError: a file is missing, truncated or invalid.
        """
        image = read_image_file(dataset_dict["file_name"], format=self.image_format)
        sem_path = dataset_dict.get("sem_seg_file_name")
        sem_seg = read_label_file(sem_path) if sem_path else None
        return {"image": image, "sem_seg": sem_seg}

    # ----------------------------------------------------------------------------- mapping
    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        """
        Args:
            dataset_dict: one record of the dataset.
        Returns:
            the model input described in the class docstring, or None for a skipped sample
            (unreadable file with ``skip_unreadable``).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            files = self.read_files(dataset_dict)
        except UnreadableFileError as e:
            if not self.skip_unreadable:
                raise
            logging.getLogger(__name__).warning(f"{e}; skipping the sample (DATALOADER.SKIP_UNREADABLE_FILES True)")
            return None
        return self.map_files(dataset_dict, files)

    def map_files(self, dataset_dict: Dict, files: Dict) -> Dict:
        """Turn one record and its decoded files (:meth:`read_files`) into the model input."""
        image, sem_seg = files["image"], files["sem_seg"]
        utils.check_image_size(dataset_dict, image)
        if sem_seg is None:
            if self.is_train:
                raise ValueError(
                    f"{type(self).__name__} needs 'sem_seg_file_name' for training; the record of "
                    f"{dataset_dict['file_name']} has none."
                )
        elif sem_seg.shape != image.shape[:2]:
            raise ValueError(
                f"Label {dataset_dict['sem_seg_file_name']} has size {sem_seg.shape}, but image "
                f"{dataset_dict['file_name']} has size {image.shape[:2]}."
            )

        # float64 so that any label type (uint8, uint16) goes through the geometric transforms
        aug_input = T.AugInput(image, sem_seg=None if sem_seg is None else sem_seg.astype(np.float64))
        self.augmentations(aug_input)
        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if self.is_train and self.size_divisibility > 0:
            image = pad_to_divisible(image, self.size_divisibility, IMAGE_PAD_VALUE)
        dataset_dict["image"] = image
        dataset_dict.pop("sem_seg_file_name", None)
        if "annotations" in dataset_dict:
            raise ValueError(f"{type(self).__name__} expects a semantic dataset without 'annotations'.")
        if sem_seg is None:
            return dataset_dict

        sem_seg = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        if self.is_train and self.size_divisibility > 0:
            sem_seg = pad_to_divisible(sem_seg, self.size_divisibility, self.ignore_label)
        dataset_dict["sem_seg"] = sem_seg
        dataset_dict["instances"] = self.semantic_targets(sem_seg)
        return dataset_dict

    def semantic_targets(self, sem_seg: torch.Tensor) -> Instances:
        """One mask per label value in ``sem_seg`` [H, W] (see the class docstring)."""
        labels = sem_seg.numpy()
        classes = np.unique(labels)
        classes = classes[classes != self.ignore_label]
        if self.remove_bkg:
            classes = classes[classes != 0]
        h, w = labels.shape
        instances = Instances((h, w))
        instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
        instances.gt_masks = _masks_tensor([labels == c for c in classes], h, w)
        return instances
