#!/usr/bin/env python3
"""Write the synthetic panoptic dataset in the ADE20K-panoptic layout.

    python datasets/generate_synthetic.py [--root DIR] [--num-train N] [--num-val N]
                                          [--size S | --size H W] [--seed SEED]

Default root: ``$DETECTRON2_DATASETS/synthetic`` (``datasets/synthetic`` when the variable is not
set), which is where ``synthetic_panoptic_{train,val}`` and ``synthetic_sem_seg_{train,val}``
look. Layout (``<split>`` = train/val, ``<folder>`` = training/validation)::

    images/<folder>/synthetic_<split>_00000001.png        RGB image
    annotations/<folder>/synthetic_<split>_00000001.png   semantic labels (L): category id, 0 = void
    synthetic_panoptic_<split>/synthetic_<split>_00000001.png   panoptic PNG, id2rgb(segment id)
    synthetic_panoptic_<split>.json                       COCO panoptic json, categories void first

Images are PNG rather than JPEG: lossless, so the stored pixels are exactly what the renderer
drew (no compression noise across class borders), and the bytes do not depend on the JPEG
encoder's version. The output is a pure function of the arguments: image ``i`` of a split is
drawn from ``numpy.random.default_rng([seed, split, i])``, so the same seed gives byte-identical
files, and changing ``--num-train`` leaves the validation images unchanged.
"""
import argparse
import glob
import os
import sys
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

try:
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mask2former.data.datasets.catalog_utils import datasets_root
from mask2former.data.datasets.panoptic_files import (
    save_json,
    save_label_png,
    save_panoptic_png,
    segments_info_from_id_map,
)
from mask2former.data.datasets.register_ade20k_panoptic import ADE20K_SPLIT_FOLDERS
from mask2former.data.datasets.register_synthetic import (
    SYNTHETIC_DATASET_DIR,
    SYNTHETIC_IMAGE_EXT,
    SYNTHETIC_PANOPTIC_CATEGORIES,
    SYNTHETIC_PREFIX,
)
from mask2former.data.datasets.synthetic import render_sample

__all__ = ["generate", "default_root"]

_SPLIT_CODES = {"train": 0, "val": 1}


def default_root() -> str:
    """``$DETECTRON2_DATASETS/synthetic``."""
    return os.path.join(datasets_root(), SYNTHETIC_DATASET_DIR)


def _write_split(root: str, split: str, num_images: int, height: int, width: int, seed: int,
                 max_things: int) -> Dict[str, str]:
    folder = ADE20K_SPLIT_FOLDERS[split]
    image_dir = os.path.join(root, "images", folder)
    label_dir = os.path.join(root, "annotations", folder)
    pan_dir = os.path.join(root, f"{SYNTHETIC_PREFIX}_panoptic_{split}")
    json_file = os.path.join(root, f"{SYNTHETIC_PREFIX}_panoptic_{split}.json")
    for d in (image_dir, label_dir, pan_dir):
        os.makedirs(d, exist_ok=True)
        # files of an earlier, larger run would otherwise be picked up by the loaders
        for stale in glob.glob(os.path.join(d, f"{SYNTHETIC_PREFIX}_{split}_*.png")):
            os.remove(stale)

    isthing = {c["id"]: c["isthing"] for c in SYNTHETIC_PANOPTIC_CATEGORIES}
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        image, seg, segments = render_sample(rng, height, width, max_things=max_things)
        stem = f"{SYNTHETIC_PREFIX}_{split}_{i + 1:08d}"
        png = f"{stem}.png"

        Image.fromarray(image).save(os.path.join(image_dir, f"{stem}.{SYNTHETIC_IMAGE_EXT}"))
        save_panoptic_png(os.path.join(pan_dir, png), seg)
        seg_to_cat = {s["id"]: s["category_id"] for s in segments}
        lut = np.zeros(int(seg.max()) + 1, dtype=np.int64)  # segment id -> category id, void 0
        for seg_id, cat in seg_to_cat.items():
            lut[seg_id] = cat
        save_label_png(os.path.join(label_dir, png), lut[seg])

        images.append({"id": stem, "file_name": f"{stem}.{SYNTHETIC_IMAGE_EXT}", "width": width, "height": height})
        annotations.append({
            "image_id": stem,
            "file_name": png,
            "segments_info": segments_info_from_id_map(seg, seg_to_cat, isthing),
        })
    save_json(json_file, images, annotations, SYNTHETIC_PANOPTIC_CATEGORIES)
    return {"image_root": image_dir, "sem_seg_root": label_dir, "panoptic_root": pan_dir, "panoptic_json": json_file}


def generate(
    root: Optional[str] = None,
    num_train: int = 200,
    num_val: int = 50,
    size: Union[int, Sequence[int]] = 128,
    seed: int = 0,
    max_things: int = 4,
) -> Dict[str, Dict[str, str]]:
    """Write the synthetic dataset under ``root`` (default :func:`default_root`).

    Args:
        root: output folder.
        num_train, num_val: number of images per split.
        size: image size, ``S`` (square) or ``(H, W)``.
        seed: non-negative integer; the output is a pure function of all arguments.
        max_things: at most this many thing instances per image (at least one).
    Returns:
        ``{"train": paths, "val": paths}`` with the ``image_root``, ``sem_seg_root``,
        ``panoptic_root`` and ``panoptic_json`` of each split.
    """
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if min(height, width) < 16:
        raise ValueError(f"size must be at least 16x16, got {height}x{width}")
    if num_train < 0 or num_val < 0 or seed < 0:
        raise ValueError("num_train, num_val and seed must be non-negative")
    root = root or default_root()
    return {
        split: _write_split(root, split, n, height, width, seed, max_things)
        for split, n in (("train", num_train), ("val", num_val))
    }


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None,
                        help="output folder (default: $DETECTRON2_DATASETS/synthetic)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--size", type=int, nargs="+", default=[128], help="S, or H W")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-things", type=int, default=4)
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one (S) or two (H W) integers")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    size: Tuple[int, ...] = (args.size[0], args.size[0]) if len(args.size) == 1 else tuple(args.size)
    root = args.root or default_root()
    generate(root, args.num_train, args.num_val, size, args.seed, args.max_things)
    print(f"Wrote {args.num_train} training and {args.num_val} validation images to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
