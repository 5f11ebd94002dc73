#!/usr/bin/env python3
"""Write COCO semantic labels from the panoptic annotations (``panoptic_semseg_{train,val}2017/``).

    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py [--coco-dir DIR]
                                                                       [--splits train val] [--workers N]

``DIR`` defaults to ``$DETECTRON2_DATASETS/coco``. For each split it reads
``annotations/panoptic_<split>2017.json`` and ``panoptic_<split>2017/*.png`` and writes
``panoptic_semseg_<split>2017/<same name>.png``: a single-channel PNG whose value is the
**0-based contiguous id** of the pixel's category (its index in detectron2's ``COCO_CATEGORIES``,
0..132, person = 0) and **255** where no segment is (unlabeled). Crowd segments keep their class.
These files are the ``sem_seg_file_name`` of ``coco_2017_{train,val}_panoptic_with_sem_seg``.
"""
import argparse
import json
import os
import sys
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["panoptic_to_semantic_labels", "prepare_split", "main"]

UNLABELED = 255


def _contiguous_ids() -> Dict[int, int]:
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def panoptic_to_semantic_labels(pan_rgb: np.ndarray, segments_info: List[Dict], id_map: Dict[int, int],
                                name: str = "image") -> np.ndarray:
    """Panoptic RGB PNG pixels [H, W, 3] + segments -> uint8 [H, W] contiguous ids, 255 unlabeled."""
    pan = pan_rgb.astype(np.int64)
    ids = pan[..., 0] + 256 * pan[..., 1] + 256 * 256 * pan[..., 2]
    out = np.full(ids.shape, UNLABELED, dtype=np.uint8)
    for seg in segments_info:
        if seg["category_id"] not in id_map:
            raise ValueError(f"{name}: segment {seg['id']} has unknown COCO category id {seg['category_id']}")
        out[ids == seg["id"]] = id_map[seg["category_id"]]
    return out


def _convert_one(job) -> None:
    pan_file, out_file, segments_info, id_map = job
    pan_rgb = np.asarray(Image.open(pan_file).convert("RGB"))
    Image.fromarray(panoptic_to_semantic_labels(pan_rgb, segments_info, id_map, name=pan_file)).save(out_file)


def prepare_split(coco_dir: str, split: str, workers: int = 1) -> str:
    """Convert one split (``"train"`` or ``"val"``); returns the output folder."""
    json_file = os.path.join(coco_dir, "annotations", f"panoptic_{split}2017.json")
    pan_dir = os.path.join(coco_dir, f"panoptic_{split}2017")
    out_dir = os.path.join(coco_dir, f"panoptic_semseg_{split}2017")
    for path in (json_file, pan_dir):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Missing {path}: download the COCO 2017 panoptic annotations "
                "(panoptic_annotations_trainval2017.zip) and unzip the PNG archives inside it "
                "(see datasets/README.md)."
            )
    with open(json_file) as f:
        annotations = json.load(f)["annotations"]
    os.makedirs(out_dir, exist_ok=True)
    id_map = _contiguous_ids()
    jobs = [
        (os.path.join(pan_dir, a["file_name"]), os.path.join(out_dir, a["file_name"]), a["segments_info"], id_map)
        for a in annotations
    ]
    if workers > 1:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_convert_one, jobs, chunksize=32):
                pass
    else:
        for job in jobs:
            _convert_one(job)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-dir", default=None, help="coco folder (default: $DETECTRON2_DATASETS/coco)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    coco_dir = args.coco_dir or os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "coco")
    for split in args.splits:
        print(f"Wrote {prepare_split(coco_dir, split, args.workers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
