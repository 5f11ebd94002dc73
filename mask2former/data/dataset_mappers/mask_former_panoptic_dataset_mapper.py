"""Training mapper for panoptic segmentation: image + COCO panoptic PNG -> Mask2Former targets."""
import functools
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from panopticapi.utils import rgb2id

from .file_reading import read_image_file
from .mask_former_semantic_dataset_mapper import (
    IMAGE_PAD_VALUE,
    MaskFormerSemanticDatasetMapper,
    _masks_tensor,
    pad_to_divisible,
)

__all__ = ["MaskFormerPanopticDatasetMapper", "panoptic_to_semantic"]


def panoptic_to_semantic(pan_ids: np.ndarray, segments_info: List[Dict], ignore_label: int) -> np.ndarray:
    """Per-pixel class map of a panoptic id map.

    Args:
        pan_ids: int [H, W] segment ids (0 = void).
        segments_info: the record's segments (``id``, contiguous ``category_id``).
        ignore_label: value of void pixels and of pixels whose segment is not listed.
    Returns:
        int64 [H, W]: the ``category_id`` of each pixel's segment (crowd segments included).
    """
    sem = np.full(pan_ids.shape, ignore_label, dtype=np.int64)
    for seg in segments_info:
        sem[pan_ids == seg["id"]] = seg["category_id"]
    return sem


class MaskFormerPanopticDatasetMapper(MaskFormerSemanticDatasetMapper):
    """Map a panoptic dataset dict to a Mask2Former training input.

    Reads ``file_name`` and ``pan_seg_file_name`` (``segments_info`` with contiguous
    ``category_id``), applies the augmentations (the panoptic PNG follows the image with
    nearest-neighbour resampling), and pads in training when ``size_divisibility > 0`` (image 128,
    panoptic map 0 = void).

    Output: the input dict without ``pan_seg_file_name``/``sem_seg_file_name``, plus ``image``
    (uint8 [3, H, W]), ``height``/``width`` (original size), ``sem_seg`` (int64 [H, W], each
    pixel's segment class, ``ignore_label`` on void and padding) and ``instances``:
    ``gt_classes`` (int64 [N]) and ``gt_masks`` (bool [N, H, W]), one per segment in
    ``segments_info`` order, skipping crowd segments and, when ``remove_bkg``, class 0. As in the
    official mapper, a segment cropped out of view keeps an empty mask.

    The semantic map is derived from the panoptic annotation, not read from
    ``sem_seg_file_name``, so it matches the masks pixel for pixel.
    """

    @functools.cached_property
    def _crop_inspects_classes(self) -> bool:
        """Whether the augmentations look at the class map before transforming (only a
        category-area constrained crop does); the map is built only then."""
        return any(
            isinstance(a, T.RandomCrop_CategoryAreaConstraint) and a.single_category_max_area < 1.0
            for a in self.augmentations.augs
        )

    def read_files(self, dataset_dict: Dict) -> Dict[str, Optional[np.ndarray]]:
        """Read the image and the panoptic PNG (the only disk access of the mapper).

        Returns:
            ``{"image": uint8 [H, W, C], "pan_seg": uint8 RGB [H, W, 3]}``.
        Raises:
            ValueError: the record has no ``pan_seg_file_name``.
            UnreadableFileError: a file is missing, truncated or invalid.
        """
        if "pan_seg_file_name" not in dataset_dict:
            raise ValueError(
                f"{type(self).__name__} needs 'pan_seg_file_name'; the record of "
                f"{dataset_dict.get('file_name')} has none (is this a panoptic dataset?)."
            )
        image = read_image_file(dataset_dict["file_name"], format=self.image_format)
        pan_seg = read_image_file(dataset_dict["pan_seg_file_name"], format="RGB", kind="panoptic annotation")
        return {"image": image, "pan_seg": pan_seg}

    def map_files(self, dataset_dict: Dict, files: Dict) -> Dict:
        """Turn one record (``file_name``, ``pan_seg_file_name``, ``segments_info``) and its
        decoded files (:meth:`read_files`) into the model input."""
        image, pan_seg = files["image"], files["pan_seg"]
        utils.check_image_size(dataset_dict, image)
        if pan_seg.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"Panoptic annotation {dataset_dict['pan_seg_file_name']} has size {pan_seg.shape[:2]}, "
                f"but image {dataset_dict['file_name']} has size {image.shape[:2]}."
            )
        if "annotations" in dataset_dict:
            raise ValueError(f"{type(self).__name__} expects a panoptic dataset without 'annotations'.")
        segments_info = dataset_dict["segments_info"]

        sem_before = None
        if self._crop_inspects_classes:
            sem_before = panoptic_to_semantic(rgb2id(pan_seg), segments_info, self.ignore_label)
            if sem_before.max(initial=0) < 256:
                sem_before = sem_before.astype(np.uint8)
        aug_input = T.AugInput(image, sem_seg=sem_before)
        transforms = self.augmentations(aug_input)
        pan_ids = rgb2id(transforms.apply_segmentation(pan_seg))

        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        pan_ids = torch.as_tensor(pan_ids.astype(np.int64))
        if self.is_train and self.size_divisibility > 0:
            image = pad_to_divisible(image, self.size_divisibility, IMAGE_PAD_VALUE)
            pan_ids = pad_to_divisible(pan_ids, self.size_divisibility, 0)  # 0 = void

        pan_ids = pan_ids.numpy()
        dataset_dict.pop("pan_seg_file_name", None)
        dataset_dict.pop("sem_seg_file_name", None)
        dataset_dict["image"] = image
        dataset_dict["sem_seg"] = torch.from_numpy(panoptic_to_semantic(pan_ids, segments_info, self.ignore_label))
        dataset_dict["instances"] = self.panoptic_targets(pan_ids, segments_info)
        return dataset_dict

    def panoptic_targets(self, pan_ids: np.ndarray, segments_info: List[Dict]) -> Instances:
        """One mask per non-crowd segment (class 0 dropped when ``remove_bkg``)."""
        keep = [
            s for s in segments_info
            if not s.get("iscrowd", 0) and not (self.remove_bkg and s["category_id"] == 0)
        ]
        h, w = pan_ids.shape
        instances = Instances((h, w))
        instances.gt_classes = torch.tensor([s["category_id"] for s in keep], dtype=torch.int64)
        instances.gt_masks = _masks_tensor([pan_ids == s["id"] for s in keep], h, w)
        return instances
