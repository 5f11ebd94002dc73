#!/usr/bin/env python3
"""Write the synthetic panoptic dataset, or small generated stand-ins for ADE20K and COCO in
their official layouts.

    python datasets/generate_synthetic.py [--layout {synthetic,ade20k,coco}] [--root DIR]
                                          [--num-train N] [--num-val N] [--size S | --size H W]
                                          [--seed SEED] [--max-things K]

``--layout synthetic`` (default) writes the 10-class synthetic dataset. Default root:
``$DETECTRON2_DATASETS/synthetic`` (``datasets/synthetic`` when the variable is not set), which is
where ``synthetic_panoptic_{train,val}`` and ``synthetic_sem_seg_{train,val}`` look. Layout
(``<split>`` = train/val, ``<folder>`` = training/validation)::

    images/<folder>/synthetic_<split>_00000001.png        RGB image
    annotations/<folder>/synthetic_<split>_00000001.png   semantic labels (L): category id, 0 = void
    synthetic_panoptic_<split>/synthetic_<split>_00000001.png   panoptic PNG, id2rgb(segment id)
    synthetic_panoptic_<split>.json                       COCO panoptic json, categories void first

Images are PNG rather than JPEG: lossless, so the stored pixels are exactly what the renderer
drew (no compression noise across class borders), and the bytes do not depend on the JPEG
encoder's version. The output is a pure function of the arguments: image ``i`` of a split is
drawn from ``numpy.random.default_rng([seed, split, i])``, so the same seed gives byte-identical
files, and changing ``--num-train`` leaves the validation images unchanged.

``--layout ade20k`` and ``--layout coco`` write tiny datasets (default 40 training and 4
validation images of 64x64) in the **official** layouts, so that the real registrations
(``myade20k_panoptic_*``, ``myade20k_sem_seg_*``, detectron2's ``coco_2017_train_panoptic``,
``coco_2017_{train,val}_panoptic_with_sem_seg``), loaders, mappers, step membership and
evaluation run on them without the real data (CI, smoke tests of ``script/``). The pictures are
those of :func:`render_sample` (two textured stuff regions, coloured shapes); each stuff region
gets a real stuff category and each shape a real thing category, handed out round-robin per
split, so every category appears in the training set (in a bounded number of images) as soon as
it has enough images (ADE20K: 34, COCO: 27, with the default 3..4 shapes per image). The
default root is ``$DETECTRON2_DATASETS/ADEChallengeData2016`` resp. ``$DETECTRON2_DATASETS/coco``.

* ade20k: ``images/<folder>/ADE_<split>_00000001.jpg``, the raw labels
  ``annotations/<folder>/*.png`` (0 = other, 1..150) and the instance labels
  ``annotations_instance/<folder>/*.png`` (R = instance category 1..100, G = instance index),
  from which ``datasets/prepare_ade20k_pan_seg.py`` (run here) builds
  ``myade20k_panoptic_<split>/`` and ``myade20k_panoptic_<split>.json``. Every 4th image has a
  strip of "other" (0) at the bottom. Next to the dataset folder (in the datasets root) it also
  writes ``mya_{100-10,100-50,50-50}-ov.npy``: the step membership of the ADE20K-semantic
  scenarios whose official partition ships with this repository (that partition only fits the
  20,210 real images, so without these files those scenarios stop with an error on a generated
  set). They hold the in-code overlap membership of the generated images (identity order), in
  the official format (float64 [images, steps]). ``--no-split-files`` skips them.
* coco: ``{train,val}2017/<12-digit id>.jpg``, ``panoptic_{train,val}2017/*.png``,
  ``annotations/panoptic_{train,val}2017.json`` (the 133 ``COCO_CATEGORIES`` with their real ids),
  ``annotations/instances_{train,val}2017.json`` (the thing segments as RLE instances, for
  detectron2's builtin names) and ``panoptic_semseg_{train,val}2017/`` written by
  ``datasets/prepare_coco_semantic_annos_from_panoptic_annos.py`` (run here). Every 4th image has
  an unlabeled strip at the bottom.

The ADE20K/COCO output is deterministic too (same arguments, same bytes with the same Pillow),
but the category of a segment depends on the images before it in its split. A marker file
``.eclipse_generated`` in the dataset folder protects real data: the generator refuses to write
into an existing, non-empty ADEChallengeData2016/coco folder without it.
"""
import argparse
import glob
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

try:
    import continual  # noqa: F401  (the ade20k layout uses continual.scenario)
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.data.datasets import load_sem_seg  # noqa: E402
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from continual.scenario import Scenario, shipped_split_names  # noqa: E402
from mask2former.data.datasets.catalog_utils import datasets_root
from mask2former.data.datasets.panoptic_files import (
    save_json,
    save_label_png,
    save_panoptic_png,
    segments_info_from_id_map,
)
from mask2former.data.datasets.register_ade20k_panoptic import (
    ADE20K_150_CATEGORIES,
    ADE20K_DATASET_DIR,
    ADE20K_SPLIT_FOLDERS,
    ade20k_thing_ids,
)
from mask2former.data.datasets.register_synthetic import (
    SYNTHETIC_DATASET_DIR,
    SYNTHETIC_IMAGE_EXT,
    SYNTHETIC_PANOPTIC_CATEGORIES,
    SYNTHETIC_PREFIX,
)
from mask2former.data.datasets.synthetic import render_sample

__all__ = ["LAYOUTS", "generate", "generate_ade20k", "generate_coco", "generate_layout", "default_root"]

logger = logging.getLogger(__name__)

#: the values of ``--layout``
LAYOUTS = ("synthetic", "ade20k", "coco")

_SPLIT_CODES = {"train": 0, "val": 1}


def default_root(layout: str = "synthetic") -> str:
    """``$DETECTRON2_DATASETS/synthetic`` (``ADEChallengeData2016`` for ``ade20k``, ``coco`` for ``coco``)."""
    folders = {"synthetic": SYNTHETIC_DATASET_DIR, "ade20k": ADE20K_DATASET_DIR, "coco": COCO_DATASET_DIR}
    if layout not in folders:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return os.path.join(datasets_root(), folders[layout])


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


# ============================================================================================
# Generated stand-ins for ADE20K and COCO in their official layouts
# ============================================================================================
COCO_DATASET_DIR = "coco"
#: written into the dataset folder; without it an existing, non-empty folder is not touched
GENERATED_MARKER = ".eclipse_generated"
_LAYOUT_CODES = {"ade20k": 1, "coco": 2}
_DATASETS_DIR = os.path.dirname(os.path.abspath(__file__))
# COCO image ids of the generated splits: train 1, 2, ...; val 900001, 900002, ... (distinct)
_COCO_FIRST_ID = {"train": 1, "val": 900001}
_JPEG_QUALITY = 95


def _load_sibling(name: str):
    """A script of this folder as a module (``datasets/`` is not a package, and the name
    ``datasets`` may belong to an installed library)."""
    spec = importlib.util.spec_from_file_location(f"_eclipse_datasets_{name}", os.path.join(_DATASETS_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _claim_folder(root: str, what: str) -> None:
    """Create ``root`` with the generator's marker; refuse an existing folder without it."""
    marker = os.path.join(root, GENERATED_MARKER)
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(marker):
        raise FileExistsError(
            f"{root} exists and was not written by this generator (no {GENERATED_MARKER} in it): it "
            f"may hold the real {what}. Point --root / DETECTRON2_DATASETS at another folder."
        )
    os.makedirs(root, exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"generated by datasets/generate_synthetic.py: a small stand-in for {what}, not real data\n")


def _clear(folder: str, pattern: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, pattern)):
        os.remove(stale)


class _RoundRobin:
    """Hands out the ids of ``ids`` in turn, starting at ``start``."""

    def __init__(self, ids: Sequence[int], start: int = 0):
        self.ids = list(ids)
        self.next = start % len(self.ids)

    def take(self) -> int:
        value = self.ids[self.next]
        self.next = (self.next + 1) % len(self.ids)
        return value


def _render_official(rng: np.random.Generator, height: int, width: int, max_things: int,
                     min_things: int, void_rows: int):
    """One :func:`render_sample` picture with both stuff regions and at least ``min_things``
    shapes visible; the bottom ``void_rows`` rows are blanked to void (0). Redraws from ``rng``
    until the picture qualifies, so the result is a pure function of the generator state."""
    for _ in range(1000):
        image, seg, segments = render_sample(rng, height, width, max_things=max_things)
        if void_rows:
            seg[height - void_rows:] = 0
            image[height - void_rows:] = 0
        visible = [s for s in segments if (seg == s["id"]).any()]
        stuff = [s for s in visible if not s["isthing"]]
        things = [s for s in visible if s["isthing"]]
        if len(stuff) == 2 and len(things) >= min_things:
            return image, seg, stuff, things
    raise RuntimeError(f"could not draw {min_things} visible shapes in a {height}x{width} image")


def _check_official_args(num_train, num_val, size, seed, max_things, min_things):
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if min(height, width) < 32:
        raise ValueError(f"size must be at least 32x32 for the official layouts, got {height}x{width}")
    if num_train < 1 or num_val < 1 or seed < 0:
        raise ValueError("num_train and num_val must be positive and seed non-negative")
    if not 1 <= min_things <= max_things:
        raise ValueError(f"need 1 <= min_things <= max_things, got {min_things} and {max_things}")
    return height, width


def _warn_uncovered(name: str, present: set, expected: Sequence[int]) -> List[int]:
    missing = sorted(set(expected) - present)
    if missing:
        logger.warning(
            "%s: %d categories appear in no training image (e.g. %s); raise --num-train so that every "
            "continual step has images", name, len(missing), missing[:10],
        )
    return missing


# ----------------------------------------------------------------------------------- ADE20K
def _write_ade20k_split(root: str, split: str, num_images: int, height: int, width: int, seed: int,
                        max_things: int, min_things: int) -> None:
    folder = ADE20K_SPLIT_FOLDERS[split]
    image_dir = os.path.join(root, "images", folder)
    label_dir = os.path.join(root, "annotations", folder)
    instance_dir = os.path.join(root, "annotations_instance", folder)
    pan_dir = os.path.join(root, f"myade20k_panoptic_{split}")
    for d in (image_dir, label_dir, instance_dir, pan_dir):
        _clear(d, f"ADE_{split}_*")

    thing_ids = ade20k_thing_ids()
    instance_category = {sem_id: k + 1 for k, sem_id in enumerate(thing_ids)}  # the ADE instance numbering
    stuff_ids = [c["id"] for c in ADE20K_150_CATEGORIES if c["id"] != 0 and not c["isthing"]]
    # validation starts elsewhere in the cycles, so its few images show other classes than the
    # first training images
    start = 0 if split == "train" else 7
    stuff_cycle, thing_cycle = _RoundRobin(stuff_ids, start), _RoundRobin(thing_ids, 3 * start)
    void_rows = max(2, height // 16)
    for i in range(num_images):
        rng = np.random.default_rng([seed, _LAYOUT_CODES["ade20k"], _SPLIT_CODES[split], i])
        image, seg, stuff, things = _render_official(
            rng, height, width, max_things, min_things, void_rows if i % 4 == 3 else 0)
        semantic = np.zeros((height, width), dtype=np.uint8)
        instance = np.zeros((height, width, 3), dtype=np.uint8)
        for s in stuff:
            semantic[seg == s["id"]] = stuff_cycle.take()
        for index, s in enumerate(things, start=1):
            cat = thing_cycle.take()
            mask = seg == s["id"]
            semantic[mask] = cat
            instance[mask, 0] = instance_category[cat]
            instance[mask, 1] = index
        stem = f"ADE_{split}_{i + 1:08d}"
        Image.fromarray(image).save(os.path.join(image_dir, f"{stem}.jpg"), quality=_JPEG_QUALITY)
        save_label_png(os.path.join(label_dir, f"{stem}.png"), semantic)
        Image.fromarray(instance).save(os.path.join(instance_dir, f"{stem}.png"))


def _write_ade20k_semantic_split_files(root: str, dest: str) -> List[str]:
    """``<dest>/mya_<B>-<I>-ov.npy`` for every shipped identity-order ADE20K-semantic partition:
    the overlap membership of the generated training images (see the module docstring)."""
    folder = ADE20K_SPLIT_FOLDERS["train"]
    # the loader of myade20k_sem_seg_train lists the images in this order
    dicts = load_sem_seg(os.path.join(root, "annotations", folder), os.path.join(root, "images", folder),
                         gt_ext="png", image_ext="jpg")
    written = []
    for name in shipped_split_names():
        match = re.fullmatch(r"mya_(\d+)-(\d+)-ov", name)
        if not match:  # -b etc.: other class orders, not used by the scripts
            continue
        scenario = Scenario(list(range(1, 151)), int(match.group(1)), int(match.group(2)), "overlap", name=name)
        path = os.path.join(dest, f"{name}.npy")
        np.save(path, scenario.membership(dicts, num_workers=0))
        written.append(path)
    return written


def generate_ade20k(
    root: Optional[str] = None,
    num_train: int = 40,
    num_val: int = 4,
    size: Union[int, Sequence[int]] = 64,
    seed: int = 0,
    max_things: int = 4,
    min_things: int = 3,
    split_files: bool = True,
) -> Dict:
    """Write a small ADE20K stand-in in the official ``ADEChallengeData2016`` layout.

    Args:
        root: the ``ADEChallengeData2016`` folder (default ``$DETECTRON2_DATASETS/ADEChallengeData2016``;
            the registrations only find it there).
        num_train, num_val: images per split (JPEG). Every class is in the training set from 34
            training images on (with the default shape counts).
        size: ``S`` or ``(H, W)``, at least 32.
        seed: non-negative integer.
        max_things, min_things: shapes per image (at least ``min_things`` visible).
        split_files: also write ``mya_{100-10,100-50,50-50}-ov.npy`` into the parent of ``root``.
    Returns:
        ``{"train": paths, "val": paths, "split_files": [...], "missing_train_classes": [...]}``;
        ``paths`` = ``image_root``, ``sem_seg_root``, ``panoptic_root``, ``panoptic_json``.
    """
    height, width = _check_official_args(num_train, num_val, size, seed, max_things, min_things)
    root = os.path.abspath(root or default_root("ade20k"))
    _claim_folder(root, "ADE20K (ADEChallengeData2016)")
    prepare = _load_sibling("prepare_ade20k_pan_seg")
    out: Dict = {}
    for split, n in (("train", num_train), ("val", num_val)):
        _write_ade20k_split(root, split, n, height, width, seed, max_things, min_things)
        json_file = prepare.prepare_split(root, split, workers=1)
        folder = ADE20K_SPLIT_FOLDERS[split]
        out[split] = {
            "image_root": os.path.join(root, "images", folder),
            "sem_seg_root": os.path.join(root, "annotations", folder),
            "panoptic_root": os.path.join(root, f"myade20k_panoptic_{split}"),
            "panoptic_json": json_file,
        }
    with open(out["train"]["panoptic_json"]) as f:
        present = {s["category_id"] for a in json.load(f)["annotations"] for s in a["segments_info"]}
    out["missing_train_classes"] = _warn_uncovered("ADE20K", present, range(1, 151))
    out["split_files"] = _write_ade20k_semantic_split_files(root, os.path.dirname(root)) if split_files else []
    return out


# ------------------------------------------------------------------------------------- COCO
def _coco_categories() -> List[Dict]:
    return [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], "color": list(c["color"])}
            for c in COCO_CATEGORIES]


def _write_coco_split(root: str, split: str, num_images: int, height: int, width: int, seed: int,
                      max_things: int, min_things: int) -> Dict[str, str]:
    image_dir = os.path.join(root, f"{split}2017")
    pan_dir = os.path.join(root, f"panoptic_{split}2017")
    sem_dir = os.path.join(root, f"panoptic_semseg_{split}2017")
    ann_dir = os.path.join(root, "annotations")
    for d, ext in ((image_dir, "jpg"), (pan_dir, "png"), (sem_dir, "png")):
        _clear(d, f"{'[0-9]' * 12}.{ext}")
    os.makedirs(ann_dir, exist_ok=True)

    categories = _coco_categories()
    isthing = {c["id"]: c["isthing"] for c in categories}
    stuff_ids = [c["id"] for c in categories if not c["isthing"]]
    thing_ids = [c["id"] for c in categories if c["isthing"]]
    start = 0 if split == "train" else 7
    stuff_cycle, thing_cycle = _RoundRobin(stuff_ids, start), _RoundRobin(thing_ids, 3 * start)
    void_rows = max(2, height // 16)
    images, pan_annotations, instances = [], [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _LAYOUT_CODES["coco"], _SPLIT_CODES[split], i])
        image, seg, stuff, things = _render_official(
            rng, height, width, max_things, min_things, void_rows if i % 4 == 3 else 0)
        seg_to_cat = {s["id"]: stuff_cycle.take() for s in stuff}
        seg_to_cat.update({s["id"]: thing_cycle.take() for s in things})
        image_id = _COCO_FIRST_ID[split] + i
        stem = f"{image_id:012d}"
        Image.fromarray(image).save(os.path.join(image_dir, f"{stem}.jpg"), quality=_JPEG_QUALITY)
        save_panoptic_png(os.path.join(pan_dir, f"{stem}.png"), seg)
        segments = segments_info_from_id_map(seg, seg_to_cat, isthing)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height})
        # the official panoptic json has no "isthing" in segments_info
        pan_annotations.append({
            "image_id": image_id,
            "file_name": f"{stem}.png",
            "segments_info": [{k: v for k, v in s.items() if k != "isthing"} for s in segments],
        })
        for s in segments:
            if not s["isthing"]:
                continue
            rle = mask_util.encode(np.asfortranarray((seg == s["id"]).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            instances.append({
                "id": len(instances) + 1, "image_id": image_id, "category_id": s["category_id"],
                "iscrowd": 0, "area": s["area"], "bbox": s["bbox"], "segmentation": rle,
            })

    info = {"description": f"generated stand-in for COCO 2017 {split} (datasets/generate_synthetic.py)",
            "version": "1.0", "year": 2017}
    panoptic_json = os.path.join(ann_dir, f"panoptic_{split}2017.json")
    with open(panoptic_json, "w") as f:
        json.dump({"info": info, "licenses": [], "images": images, "annotations": pan_annotations,
                   "categories": [{"supercategory": c["name"], **c} for c in categories]}, f)
    with open(os.path.join(ann_dir, f"instances_{split}2017.json"), "w") as f:
        json.dump({"info": info, "licenses": [], "images": images, "annotations": instances,
                   "categories": [{"supercategory": c["name"], "id": c["id"], "name": c["name"]}
                                  for c in categories if c["isthing"]]}, f)
    return {"image_root": image_dir, "sem_seg_root": sem_dir, "panoptic_root": pan_dir,
            "panoptic_json": panoptic_json}


def generate_coco(
    root: Optional[str] = None,
    num_train: int = 40,
    num_val: int = 4,
    size: Union[int, Sequence[int]] = 64,
    seed: int = 0,
    max_things: int = 4,
    min_things: int = 3,
) -> Dict:
    """Write a small COCO 2017 panoptic stand-in in the official ``coco`` layout.

    Args:
        root: the ``coco`` folder (default ``$DETECTRON2_DATASETS/coco``).
        num_train, num_val: images per split (JPEG). Every one of the 133 categories is in the
            training set from 27 training images on (with the default shape counts).
        size, seed, max_things, min_things: as for :func:`generate_ade20k`.
    Returns:
        ``{"train": paths, "val": paths, "missing_train_classes": [...]}`` (COCO category ids).
    """
    height, width = _check_official_args(num_train, num_val, size, seed, max_things, min_things)
    root = os.path.abspath(root or default_root("coco"))
    _claim_folder(root, "COCO 2017")
    prepare = _load_sibling("prepare_coco_semantic_annos_from_panoptic_annos")
    out: Dict = {}
    for split, n in (("train", num_train), ("val", num_val)):
        out[split] = _write_coco_split(root, split, n, height, width, seed, max_things, min_things)
        prepare.prepare_split(root, split, workers=1)
    with open(out["train"]["panoptic_json"]) as f:
        present = {s["category_id"] for a in json.load(f)["annotations"] for s in a["segments_info"]}
    out["missing_train_classes"] = _warn_uncovered("COCO", present, [c["id"] for c in _coco_categories()])
    return out


_OFFICIAL_DEFAULTS = {"num_train": 40, "num_val": 4, "size": 64}
_SYNTHETIC_DEFAULTS = {"num_train": 200, "num_val": 50, "size": 128}


def generate_layout(layout: str = "synthetic", root: Optional[str] = None, **kwargs) -> Dict:
    """:func:`generate`, :func:`generate_ade20k` or :func:`generate_coco` by ``layout``."""
    functions = {"synthetic": generate, "ade20k": generate_ade20k, "coco": generate_coco}
    if layout not in functions:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return functions[layout](root, **kwargs)


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, default="synthetic",
                        help="synthetic (default): the 10-class synthetic set; ade20k / coco: small "
                             "stand-ins in the official ADEChallengeData2016 / coco layouts")
    parser.add_argument("--root", default=None,
                        help="output folder (default: $DETECTRON2_DATASETS/synthetic, "
                             "/ADEChallengeData2016 or /coco by --layout)")
    parser.add_argument("--num-train", type=int, default=None,
                        help="training images (default: 200 synthetic, 40 ade20k/coco)")
    parser.add_argument("--num-val", type=int, default=None,
                        help="validation images (default: 50 synthetic, 4 ade20k/coco)")
    parser.add_argument("--size", type=int, nargs="+", default=None,
                        help="S, or H W (default: 128 synthetic, 64 ade20k/coco)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-things", type=int, default=4)
    parser.add_argument("--no-split-files", action="store_true",
                        help="ade20k: do not write the mya_*-ov.npy step-membership files")
    args = parser.parse_args(argv)
    defaults = _SYNTHETIC_DEFAULTS if args.layout == "synthetic" else _OFFICIAL_DEFAULTS
    if args.num_train is None:
        args.num_train = defaults["num_train"]
    if args.num_val is None:
        args.num_val = defaults["num_val"]
    if args.size is None:
        args.size = [defaults["size"]]
    if len(args.size) not in (1, 2):
        parser.error("--size takes one (S) or two (H W) integers")
    if args.no_split_files and args.layout != "ade20k":
        parser.error("--no-split-files only applies to --layout ade20k")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    size: Tuple[int, ...] = (args.size[0], args.size[0]) if len(args.size) == 1 else tuple(args.size)
    root = args.root or default_root(args.layout)
    if args.layout == "synthetic":
        generate(root, args.num_train, args.num_val, size, args.seed, args.max_things)
    else:
        kwargs = dict(num_train=args.num_train, num_val=args.num_val, size=size, seed=args.seed,
                      max_things=args.max_things, min_things=min(3, args.max_things))
        if args.layout == "ade20k":
            kwargs["split_files"] = not args.no_split_files
        result = generate_layout(args.layout, root, **kwargs)
        for path in result.get("split_files", []):
            print(f"Wrote {path}")
    print(f"Wrote {args.num_train} training and {args.num_val} validation images to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
