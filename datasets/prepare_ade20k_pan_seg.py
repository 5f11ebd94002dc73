#!/usr/bin/env python3
"""Build the ADE20K panoptic annotations used by ``myade20k_panoptic_{train,val}``.

    python datasets/prepare_ade20k_pan_seg.py [--dataset-dir DIR] [--splits train val]
                                              [--catid-mapping FILE] [--workers N]
                                              [--output-dir OUT]

Input (``DIR`` defaults to ``$DETECTRON2_DATASETS/ADEChallengeData2016``)::

    images/{training,validation}/*.jpg
    annotations/{training,validation}/*.png           raw semantic labels: 0 = other, 1..150
    annotations_instance/{training,validation}/*.png  instance labels of the ADE20K instance
                                                      benchmark: R = instance category 1..100
                                                      (0 = none), G = instance index (0 = none)

Output (in ``DIR``, or in ``OUT`` when given)::

    myade20k_panoptic_{train,val}/<stem>.png   panoptic PNG, id2rgb(segment id), 0 = void
    myade20k_panoptic_{train,val}.json         COCO panoptic json (image_id = file stem)

How an image is converted (the rules of the official preparation script, which every published
ADE20K panoptic number is scored against; ``tools/check_preparation.py`` checks them against
recorded official output):

* stuff first: every class of the semantic labels, in increasing id order, that is neither 0
  ("other"), nor 255, nor a thing class becomes one segment covering all its pixels;
* then things: every instance index of the instance labels (green channel), in increasing order,
  becomes one segment painted over the stuff (index 0 = no instance); its class is the semantic id of its instance
  category (red channel), which must be the same for all its pixels. Thing-class pixels of the
  semantic labels that no instance covers stay void;
* ``area`` and ``bbox`` (``[x, y, width, height]``, integers) of a segment are measured on its
  own mask, *before* later segments are painted over it: a stuff segment keeps the area of its
  semantic region even where instances hide it, and a stuff segment that instances hide
  completely is still listed (panopticapi then counts it like any other ground-truth segment).
  ``iscrowd`` is 0.

So the json lists stuff segments (by class id) then thing segments (by instance index), and the
PNG shows each segment's visible pixels.

Category ids are the raw semantic ids, with ``void`` (id 0, stuff) listed first in the json.
The 100 thing classes are those of the ADE20K instance benchmark, and instance category ``k`` is
the ``k``-th thing class by increasing semantic id (8 bed, 9 window, 11 cabinet, ..., 150 flag).
This mapping is built in; ``--catid-mapping`` reads another one from a text file with a header
line and lines ``<instance id> <semantic id> [...]`` (the format of Mask2Former's
``ade20k_instance_catid_mapping.txt``); as in the official script, the classes it maps to are the
thing classes. ``ade20k_instance_imgCatIds.json`` is not needed: it only serves to build COCO
instance annotations, which ECLIPSE does not use.

Segment ids are numbered 1, 2, ... in each image in the order above (the official script draws
random ids and colours instead), so the output is deterministic. Every file is written to a
temporary name first and then renamed, so an interrupted run leaves no half-written file.

An input the official script cannot convert is an error naming the file: a semantic label above
150 other than 255, an instance whose pixels have several instance categories or one that is not
in the mapping (including 0), label images that are not 8-bit or whose size differs from the
image's.

Data prepared by earlier versions of this project (which measured areas on the final map and
dropped hidden stuff segments) differ from the official files and must
be prepared again; data prepared by the official ECLIPSE script can be used as it is.
"""
import argparse
import os
import sys
import tempfile
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

try:
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mask2former.data.datasets.catalog_utils import datasets_root
from mask2former.data.datasets.panoptic_files import mask_bbox, save_json, save_panoptic_png
from mask2former.data.datasets.register_ade20k_panoptic import (
    ADE20K_150_CATEGORIES,
    ADE20K_DATASET_DIR,
    ADE20K_SPLIT_FOLDERS,
    ade20k_thing_ids,
)

__all__ = [
    "convert_annotation",
    "prepare_split",
    "read_catid_mapping",
    "builtin_catid_mapping",
    "panoptic_categories",
    "list_images",
    "main",
]

INSTANCE_ANNOTATIONS_URL = "http://sceneparsing.csail.mit.edu/data/ChallengeData2017/annotations_instance.tar"
PREFIX = "myade20k"
VOID_LABELS = (0, 255)  # semantic labels that never become a segment
_CATEGORY_IDS = frozenset(c["id"] for c in ADE20K_150_CATEGORIES if c["id"] != 0)


def builtin_catid_mapping() -> Dict[int, int]:
    """Instance category (1..100) -> semantic category id of the thing class."""
    return {k + 1: sem_id for k, sem_id in enumerate(ade20k_thing_ids())}


def read_catid_mapping(path: str) -> Dict[int, int]:
    """Read ``<instance id> <semantic id> ...`` lines (after one header line) into a dict."""
    mapping: Dict[int, int] = {}
    with open(path) as f:
        lines = f.read().splitlines()[1:]
    for number, line in enumerate(lines, start=2):
        fields = line.split()
        if not fields:
            continue
        try:
            ins_id, sem_id = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{number}: expected '<instance id> <semantic id> ...', got {line!r}")
        if not 1 <= ins_id <= 255:
            raise ValueError(f"{path}:{number}: instance id {ins_id} is not in 1..255 (the red channel of "
                             "the instance labels)")
        if sem_id not in _CATEGORY_IDS:
            raise ValueError(f"{path}:{number}: semantic id {sem_id} is not an ADE20K class (1..150)")
        if mapping.get(ins_id, sem_id) != sem_id:
            raise ValueError(f"{path}:{number}: instance id {ins_id} maps to both {mapping[ins_id]} and {sem_id}")
        mapping[ins_id] = sem_id
    if not mapping:
        raise ValueError(f"{path} holds no mapping line")
    return mapping


def panoptic_categories(catid_mapping: Optional[Dict[int, int]] = None) -> List[Dict]:
    """The json ``categories``: the 151 ADE20K classes (void first); the thing classes are the
    classes ``catid_mapping`` maps to (the built-in mapping gives the standard 100)."""
    things = set((catid_mapping or builtin_catid_mapping()).values())
    return [{**c, "isthing": int(c["id"] in things)} for c in ADE20K_150_CATEGORIES]


def _segment(seg_id: int, category_id: int, isthing: bool, mask: np.ndarray) -> Dict:
    return {
        "id": seg_id,
        "category_id": int(category_id),
        "iscrowd": 0,
        "isthing": int(isthing),
        "area": int(np.count_nonzero(mask)),
        "bbox": mask_bbox(mask),
    }


def convert_annotation(
    semantic: np.ndarray, instance: np.ndarray, catid_mapping: Dict[int, int], name: str = "image"
) -> Tuple[np.ndarray, List[Dict]]:
    """Combine the semantic and instance labels of one image into a panoptic annotation, with the
    rules of the module docstring.

    Args:
        semantic: uint8 [H, W] raw labels (0 = other).
        instance: uint8 [H, W, C>=2] instance labels (R = instance category, G = instance index).
        catid_mapping: instance category -> semantic id.
        name: the instance file, used in error messages.
    Returns:
        segment ids int32 [H, W] (0 = void; segment ``i`` of the list has id ``i + 1``) and the
        ``segments_info`` records (``id``, ``category_id``, ``iscrowd``, ``isthing``, ``area``,
        ``bbox``), stuff first. ``area``/``bbox`` describe a segment's whole region, hidden parts
        included, so a listed segment may have fewer (or no) pixels in the map.
    Raises:
        ValueError: an input the official script could not convert (see the module docstring).
    """
    if semantic.ndim != 2:
        raise ValueError(f"{name}: the semantic labels must be a single-channel image, got shape {semantic.shape}")
    if instance.ndim != 3 or instance.shape[2] < 2:
        raise ValueError(f"{name}: the instance annotation must be an RGB image, got shape {instance.shape}")
    if semantic.shape != instance.shape[:2]:
        raise ValueError(f"{name}: semantic {semantic.shape} and instance {instance.shape[:2]} sizes differ")
    for what, labels in (("semantic", semantic), ("instance", instance)):
        if labels.dtype != np.uint8:
            raise ValueError(f"{name}: the {what} labels must be 8-bit, got {labels.dtype}")
    thing_ids = set(catid_mapping.values())

    id_map = np.zeros(semantic.shape, dtype=np.int32)
    segments: List[Dict] = []
    for cat in np.unique(semantic).tolist():
        if cat in VOID_LABELS or cat in thing_ids:
            continue
        if cat not in _CATEGORY_IDS:
            raise ValueError(f"{name}: semantic label {cat} is not an ADE20K class (1..150; 0 and 255 are void)")
        mask = semantic == cat
        segments.append(_segment(len(segments) + 1, cat, False, mask))
        id_map[mask] = len(segments)

    ins_cat, ins_index = instance[..., 0], instance[..., 1]
    for index in np.unique(ins_index).tolist():
        if index == 0:
            continue
        mask = ins_index == index
        cats = np.unique(ins_cat[mask]).tolist()
        if len(cats) != 1 or cats[0] not in catid_mapping:
            raise ValueError(
                f"{name}: instance {index} (green channel) has instance categories {cats} (red channel); "
                f"expected exactly one of the mapping ({min(catid_mapping)}..{max(catid_mapping)}). "
                "Is this an ADE20K instance annotation (annotations_instance/)?"
            )
        segments.append(_segment(len(segments) + 1, catid_mapping[cats[0]], True, mask))
        id_map[mask] = len(segments)  # painted over the stuff; instances never overlap each other
    return id_map, segments


def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` into a temporary file next to ``path``, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{root}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_labels(path: str, what: str) -> np.ndarray:
    with Image.open(path) as img:
        if what == "instance" and img.mode not in ("RGB", "RGBA"):
            raise ValueError(f"{path}: the instance labels must be an RGB PNG (R = instance category, "
                             f"G = instance index), got mode {img.mode!r}")
        labels = np.asarray(img)
    if what == "semantic" and labels.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label image, got shape {labels.shape}")
    if labels.dtype != np.uint8:
        raise ValueError(f"{path}: the {what} labels must be an 8-bit PNG, got {labels.dtype}")
    return labels


def _convert_one(job) -> Tuple[Dict, Dict]:
    image_id, image_file, semantic_file, instance_file, out_file, mapping = job
    with Image.open(image_file) as img:
        width, height = img.size
    semantic = _read_labels(semantic_file, "semantic")
    instance = _read_labels(instance_file, "instance")
    for f, labels in ((semantic_file, semantic), (instance_file, instance)):
        if labels.shape[:2] != (height, width):
            raise ValueError(f"{f}: size {labels.shape[:2]} differs from image {image_file} ({height}, {width})")
    id_map, segments = convert_annotation(semantic, instance, mapping, name=instance_file)
    _atomic_write(out_file, lambda tmp: save_panoptic_png(tmp, id_map))
    image = {"id": image_id, "file_name": os.path.basename(image_file), "width": width, "height": height}
    annotation = {"image_id": image_id, "file_name": os.path.basename(out_file), "segments_info": segments}
    return image, annotation


def list_images(image_dir: str) -> List[Tuple[str, str]]:
    """``(image_id, file name)`` of the ``*.jpg`` images of a folder, in the official order (sorted
    file names; the id is the name up to its first dot)."""
    names = sorted(f for f in os.listdir(image_dir) if f.endswith(".jpg") and not f.startswith("."))
    out, seen = [], {}
    for f in names:
        image_id = f.split(".")[0]
        if image_id in seen:
            raise ValueError(f"{os.path.join(image_dir, f)} and {seen[image_id]} have the same image id "
                             f"{image_id!r} (the name up to its first dot); rename one of them")
        seen[image_id] = f
        out.append((image_id, f))
    return out


def prepare_split(dataset_dir: str, split: str, catid_mapping: Optional[Dict[int, int]] = None,
                  workers: int = 1, output_dir: Optional[str] = None) -> str:
    """Convert one split; returns the path of the written json.

    Args:
        dataset_dir: the ``ADEChallengeData2016`` folder.
        output_dir: where ``myade20k_panoptic_<split>{/,.json}`` go (default ``dataset_dir``).
    Raises:
        FileNotFoundError: an input folder or an image's annotation is missing (the message says
            what to download).
        ValueError: an annotation the official script could not convert.
    """
    mapping = catid_mapping or builtin_catid_mapping()
    folder = ADE20K_SPLIT_FOLDERS[split]
    image_dir = os.path.join(dataset_dir, "images", folder)
    semantic_dir = os.path.join(dataset_dir, "annotations", folder)
    instance_dir = os.path.join(dataset_dir, "annotations_instance", folder)
    for d, what in (
        (image_dir, "the ADE20K images (ADEChallengeData2016.zip)"),
        (semantic_dir, "the ADE20K semantic annotations (ADEChallengeData2016.zip)"),
        (instance_dir, f"the instance annotations: download {INSTANCE_ANNOTATIONS_URL} and extract it "
                       f"so that {os.path.join(dataset_dir, 'annotations_instance')}/{{training,validation}}/ exist"),
    ):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"Missing folder {d}: it should hold {what}. See datasets/README.md.")

    images = list_images(image_dir)
    if not images:
        raise FileNotFoundError(f"No .jpg image in {image_dir}. See datasets/README.md.")
    output_dir = output_dir or dataset_dir
    out_dir = os.path.join(output_dir, f"{PREFIX}_panoptic_{split}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for image_id, image_name in images:
        semantic_file = os.path.join(semantic_dir, image_id + ".png")
        instance_file = os.path.join(instance_dir, image_id + ".png")
        for f in (semantic_file, instance_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"Missing annotation {f} for image {image_name}")
        jobs.append((image_id, os.path.join(image_dir, image_name), semantic_file, instance_file,
                     os.path.join(out_dir, image_id + ".png"), mapping))

    if workers > 1:
        with Pool(workers) as pool:
            results = list(pool.imap(_convert_one, jobs, chunksize=16))
    else:
        results = [_convert_one(job) for job in jobs]
    json_file = os.path.join(output_dir, f"{PREFIX}_panoptic_{split}.json")
    categories = panoptic_categories(mapping)
    _atomic_write(json_file, lambda tmp: save_json(tmp, [r[0] for r in results], [r[1] for r in results],
                                                   categories))
    return json_file


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default=None,
                        help="ADEChallengeData2016 folder (default: $DETECTRON2_DATASETS/ADEChallengeData2016)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--catid-mapping", default=None,
                        help="optional instance-to-semantic category mapping file (default: built in)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--output-dir", default=None,
                        help="where to write myade20k_panoptic_{train,val}[.json] (default: the dataset folder)")
    args = parser.parse_args(argv)
    dataset_dir = args.dataset_dir or os.path.join(datasets_root(), ADE20K_DATASET_DIR)
    mapping = read_catid_mapping(args.catid_mapping) if args.catid_mapping else None
    for split in args.splits:
        json_file = prepare_split(dataset_dir, split, mapping, workers=args.workers, output_dir=args.output_dir)
        print(f"Wrote {json_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
