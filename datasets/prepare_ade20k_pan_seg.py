#!/usr/bin/env python3
"""Build the ADE20K panoptic annotations used by ``myade20k_panoptic_{train,val}``.

    python datasets/prepare_ade20k_pan_seg.py [--dataset-dir DIR] [--splits train val]
                                              [--catid-mapping FILE] [--workers N]

Input (``DIR`` defaults to ``$DETECTRON2_DATASETS/ADEChallengeData2016``)::

    images/{training,validation}/*.jpg
    annotations/{training,validation}/*.png           raw semantic labels: 0 = other, 1..150
    annotations_instance/{training,validation}/*.png  instance labels of the ADE20K instance
                                                      benchmark: R = instance category 1..100
                                                      (0 = none), G = instance index (0 = none)

Output::

    myade20k_panoptic_{train,val}/<stem>.png   panoptic PNG, id2rgb(segment id), 0 = void
    myade20k_panoptic_{train,val}.json         COCO panoptic json (image_id = file stem)

How an image is converted:

* every stuff class present in the semantic labels (not 0, not a thing class) becomes one
  segment; thing-class pixels of the semantic labels that no instance covers stay void;
* every instance of the instance labels becomes one thing segment painted over the stuff (the two
  annotations overlap a little); its class is the semantic id of its instance category;
* areas and boxes are measured on the final map, and segments left without pixels are dropped.

Category ids are the raw semantic ids, with ``void`` (id 0, stuff) listed first in the json.
The 100 thing classes are those of the ADE20K instance benchmark, and instance category ``k`` is
the ``k``-th thing class by increasing semantic id (8 bed, 9 window, 11 cabinet, ..., 150 flag).
This mapping is built in; ``--catid-mapping`` reads another one from a text file with a header
line and lines ``<instance id> <semantic id> [...]`` (the format of Mask2Former's
``ade20k_instance_catid_mapping.txt``). ``ade20k_instance_imgCatIds.json`` is not needed: it only
serves to build COCO instance annotations, which ECLIPSE does not use.

Segment ids are numbered 1, 2, ... in each image (stuff first, then instances), so the output is
deterministic.
"""
import argparse
import os
import sys
from multiprocessing import Pool
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

try:
    import mask2former  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mask2former.data.datasets.catalog_utils import datasets_root
from mask2former.data.datasets.panoptic_files import (
    save_json,
    save_panoptic_png,
    segments_info_from_id_map,
)
from mask2former.data.datasets.register_ade20k_panoptic import (
    ADE20K_150_CATEGORIES,
    ADE20K_DATASET_DIR,
    ADE20K_SPLIT_FOLDERS,
    ade20k_thing_ids,
)

__all__ = ["convert_annotation", "prepare_split", "read_catid_mapping", "builtin_catid_mapping", "main"]

INSTANCE_ANNOTATIONS_URL = "http://sceneparsing.csail.mit.edu/data/ChallengeData2017/annotations_instance.tar"
PREFIX = "myade20k"


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
        if mapping.get(ins_id, sem_id) != sem_id:
            raise ValueError(f"{path}:{number}: instance id {ins_id} maps to both {mapping[ins_id]} and {sem_id}")
        mapping[ins_id] = sem_id
    if not mapping:
        raise ValueError(f"{path} holds no mapping line")
    return mapping


def convert_annotation(
    semantic: np.ndarray, instance: np.ndarray, catid_mapping: Dict[int, int], name: str = "image"
) -> Tuple[np.ndarray, List[Dict]]:
    """Combine the semantic and instance labels of one image into a panoptic annotation.

    Args:
        semantic: uint8 [H, W] raw labels (0 = other).
        instance: uint8 [H, W, 3] instance labels (R = instance category, G = instance index).
        catid_mapping: instance category -> semantic id.
        name: used in error messages.
    Returns:
        segment ids int32 [H, W] (0 = void) and the ``segments_info`` records.
    """
    if instance.ndim != 3 or instance.shape[2] < 2:
        raise ValueError(f"{name}: the instance annotation must be an RGB image, got shape {instance.shape}")
    if semantic.shape != instance.shape[:2]:
        raise ValueError(f"{name}: semantic {semantic.shape} and instance {instance.shape[:2]} sizes differ")
    thing_ids = set(catid_mapping.values())
    isthing = {c["id"]: c["isthing"] for c in ADE20K_150_CATEGORIES}

    id_map = np.zeros(semantic.shape, dtype=np.int32)
    seg_to_cat: Dict[int, int] = {}
    for cat in np.unique(semantic).tolist():
        if cat in (0, 255) or cat in thing_ids:
            continue
        if cat not in isthing:
            raise ValueError(f"{name}: semantic label {cat} is not an ADE20K class")
        seg_id = len(seg_to_cat) + 1
        id_map[semantic == cat] = seg_id
        seg_to_cat[seg_id] = cat

    ins_cat, ins_index = instance[..., 0], instance[..., 1]
    for index in np.unique(ins_index).tolist():
        if index == 0:
            continue
        mask = ins_index == index
        cats = np.unique(ins_cat[mask]).tolist()
        if len(cats) != 1 or cats[0] not in catid_mapping:
            raise ValueError(
                f"{name}: instance {index} has instance categories {cats}; expected exactly one of "
                f"1..{max(catid_mapping)}"
            )
        seg_id = len(seg_to_cat) + 1
        id_map[mask] = seg_id
        seg_to_cat[seg_id] = catid_mapping[cats[0]]
    return id_map, segments_info_from_id_map(id_map, seg_to_cat, isthing)


def _convert_one(job) -> Tuple[Dict, Dict]:
    stem, image_file, semantic_file, instance_file, out_file, mapping = job
    with Image.open(image_file) as img:
        width, height = img.size
    semantic = np.asarray(Image.open(semantic_file))
    instance = np.asarray(Image.open(instance_file).convert("RGB"))
    if semantic.ndim != 2:
        raise ValueError(f"{semantic_file}: expected a single-channel label image, got shape {semantic.shape}")
    if semantic.shape != (height, width):
        raise ValueError(f"{semantic_file}: size {semantic.shape} differs from image {image_file} ({height}, {width})")
    id_map, segments = convert_annotation(semantic, instance, mapping, name=instance_file)
    save_panoptic_png(out_file, id_map)
    image = {"id": stem, "file_name": os.path.basename(image_file), "width": width, "height": height}
    annotation = {"image_id": stem, "file_name": os.path.basename(out_file), "segments_info": segments}
    return image, annotation


def prepare_split(dataset_dir: str, split: str, catid_mapping: Optional[Dict[int, int]] = None,
                  workers: int = 1) -> str:
    """Convert one split; returns the path of the written json.

    Raises:
        FileNotFoundError: an input folder or an image's annotation is missing (the message says
            what to download).
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

    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not stems:
        raise FileNotFoundError(f"No .jpg image in {image_dir}. See datasets/README.md.")
    out_dir = os.path.join(dataset_dir, f"{PREFIX}_panoptic_{split}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for stem in stems:
        semantic_file = os.path.join(semantic_dir, stem + ".png")
        instance_file = os.path.join(instance_dir, stem + ".png")
        for f in (semantic_file, instance_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"Missing annotation {f} for image {stem}.jpg")
        jobs.append((stem, os.path.join(image_dir, stem + ".jpg"), semantic_file, instance_file,
                     os.path.join(out_dir, stem + ".png"), mapping))

    if workers > 1:
        with Pool(workers) as pool:
            results = list(pool.imap(_convert_one, jobs, chunksize=16))
    else:
        results = [_convert_one(job) for job in jobs]
    json_file = os.path.join(dataset_dir, f"{PREFIX}_panoptic_{split}.json")
    save_json(json_file, [r[0] for r in results], [r[1] for r in results], ADE20K_150_CATEGORIES)
    return json_file


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", default=None,
                        help="ADEChallengeData2016 folder (default: $DETECTRON2_DATASETS/ADEChallengeData2016)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--catid-mapping", default=None,
                        help="optional instance-to-semantic category mapping file (default: built in)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    dataset_dir = args.dataset_dir or os.path.join(datasets_root(), ADE20K_DATASET_DIR)
    mapping = read_catid_mapping(args.catid_mapping) if args.catid_mapping else None
    for split in args.splits:
        json_file = prepare_split(dataset_dir, split, mapping, workers=args.workers)
        print(f"Wrote {json_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
