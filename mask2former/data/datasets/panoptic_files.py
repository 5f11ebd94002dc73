"""Writing COCO-format panoptic annotations: segment records, PNGs and the json.

Used by ``datasets/generate_synthetic.py`` and ``datasets/prepare_ade20k_pan_seg.py`` so that both
produce the same format: RGB PNGs where ``id = R + 256 G + 256^2 B`` (panopticapi ``id2rgb``,
0 = void), and a json with ``images``, ``annotations`` (``segments_info`` entries ``id``,
``category_id``, ``iscrowd``, ``isthing``, ``area``, ``bbox`` [x, y, w, h]) and ``categories``.
All writers are deterministic: the same arrays give byte-identical files.
"""
import json
import os
from typing import Dict, List, Mapping, Sequence

import numpy as np
from PIL import Image

from panopticapi.utils import id2rgb

__all__ = ["mask_bbox", "segments_info_from_id_map", "save_panoptic_png", "save_label_png", "save_json"]


def mask_bbox(mask: np.ndarray) -> List[int]:
    """Tight ``[x, y, width, height]`` box of a non-empty boolean mask [H, W]."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def segments_info_from_id_map(
    id_map: np.ndarray, segment_categories: Mapping[int, int], isthing: Mapping[int, int]
) -> List[Dict]:
    """Segment records for every non-void segment visible in ``id_map``.

    Args:
        id_map: int [H, W] segment ids, 0 = void.
        segment_categories: segment id -> category id (segments absent from the map are dropped).
        isthing: category id -> 0/1.
    Returns:
        one ``{"id", "category_id", "iscrowd": 0, "isthing", "area", "bbox"}`` per visible
        segment, in increasing id order; ``area`` is the pixel count in ``id_map``.
    """
    ids, counts = np.unique(id_map, return_counts=True)
    out = []
    for seg_id, area in zip(ids.tolist(), counts.tolist()):
        if seg_id == 0:
            continue
        if seg_id not in segment_categories:
            raise ValueError(f"segment id {seg_id} is in the id map but has no category")
        cat = int(segment_categories[seg_id])
        out.append({
            "id": int(seg_id),
            "category_id": cat,
            "iscrowd": 0,
            "isthing": int(isthing[cat]),
            "area": int(area),
            "bbox": mask_bbox(id_map == seg_id),
        })
    return out


def save_panoptic_png(path: str, id_map: np.ndarray) -> None:
    """Save segment ids [H, W] (< 2**24) as an RGB PNG with panopticapi's ``id2rgb``."""
    if id_map.min() < 0 or id_map.max() >= 256 ** 3:
        raise ValueError("panoptic segment ids must be in [0, 2**24)")
    Image.fromarray(id2rgb(id_map.astype(np.int64)).astype(np.uint8)).save(path)


def save_label_png(path: str, labels: np.ndarray) -> None:
    """Save a label map [H, W] with values 0..255 as a single-channel (mode ``L``) PNG."""
    if labels.min() < 0 or labels.max() > 255:
        raise ValueError("label values must be in [0, 255] for an 8-bit PNG")
    Image.fromarray(labels.astype(np.uint8)).save(path)


def save_json(path: str, images: Sequence[Dict], annotations: Sequence[Dict], categories: Sequence[Dict]) -> None:
    """Write the panoptic json (keys in a fixed order, so the bytes are reproducible)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {"images": list(images), "annotations": list(annotations), "categories": list(categories)}, f
        )
