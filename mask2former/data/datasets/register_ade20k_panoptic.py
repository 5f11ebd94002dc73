"""ADE20K panoptic (``myade20k_panoptic_{train,val}``) and the generic "ADE20K-panoptic layout".

A dataset in the ADE20K-panoptic layout lives in one folder under ``$DETECTRON2_DATASETS``::

    <dataset_dir>/
      images/{training,validation}/<stem>.<image_ext>
      annotations/{training,validation}/<stem>.png        raw semantic labels, 0 = void/other
      <prefix>_panoptic_{train,val}/<stem>.png              COCO panoptic PNGs (RGB ids, 0 = void)
      <prefix>_panoptic_{train,val}.json                    COCO panoptic json, categories void first

Category ids are the raw semantic ids (void = 0 first), and dataset id == contiguous id.
``register_panoptic_ade20k_layout`` registers such a dataset; ADE20K (``ADEChallengeData2016``,
prefix ``myade20k``) and the synthetic dataset (``synthetic``, prefix ``synthetic``) use it.
"""
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .catalog_utils import register_panoptic_json_dataset

__all__ = [
    "ADE20K_150_CATEGORIES",
    "ADE20K_DATASET_DIR",
    "ADE20K_PANOPTIC_PREPARE_COMMAND",
    "ADE20K_SPLIT_FOLDERS",
    "ade20k_thing_ids",
    "panoptic_layout_metadata",
    "register_panoptic_ade20k_layout",
]

ADE20K_DATASET_DIR = "ADEChallengeData2016"
# split name -> sub-folder name of images/ and annotations/
ADE20K_SPLIT_FOLDERS = {"train": "training", "val": "validation"}
ADE20K_PANOPTIC_PREPARE_COMMAND = "python datasets/prepare_ade20k_pan_seg.py"

# ---------------------------------------------------------------------------------------------
# Dataset facts about ADE20K (SceneParsing 150): names (shipped by detectron2, index = id - 1),
# the 100 thing categories (those of the ADE20K instance-segmentation benchmark) and the
# standard ADE20K palette. Ids are the raw annotation values: 0 = void/"other", 1..150 classes.
_ADE20K_THING_IDS = (
    8, 9, 11, 13, 15, 16, 19, 20, 21, 23, 24, 25, 28, 31, 32, 33, 34, 36, 37, 38,
    39, 40, 42, 43, 44, 45, 46, 48, 50, 51, 54, 56, 57, 58, 59, 63, 65, 66, 67, 68,
    70, 71, 72, 73, 74, 75, 76, 77, 79, 81, 82, 83, 84, 86, 87, 88, 89, 90, 91, 93,
    94, 96, 98, 99, 103, 104, 105, 108, 109, 111, 112, 113, 116, 117, 119, 120, 121, 122, 124, 125,
    126, 127, 128, 130, 131, 133, 134, 135, 136, 137, 138, 139, 140, 143, 144, 145, 147, 148, 149, 150,
)
_ADE20K_COLORS = (
    (0, 0, 0),  # void
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)


def _build_ade20k_categories() -> List[Dict]:
    names = ["void"] + list(ADE20K_SEM_SEG_CATEGORIES)
    things = set(_ADE20K_THING_IDS)
    assert len(names) == 151 and len(_ADE20K_COLORS) == 151 and len(things) == 100
    return [
        {"id": i, "name": name, "isthing": int(i in things), "color": list(_ADE20K_COLORS[i])}
        for i, name in enumerate(names)
    ]


#: The 151 ADE20K panoptic categories, void (id 0) first; ``id`` = raw semantic label value.
ADE20K_150_CATEGORIES: List[Dict] = _build_ade20k_categories()


def ade20k_thing_ids() -> List[int]:
    """The 100 thing category ids, ascending. The ADE20K instance annotations number their
    categories 1..100 in this order: instance category ``k`` is semantic id ``ade20k_thing_ids()[k-1]``."""
    return list(_ADE20K_THING_IDS)


def panoptic_layout_metadata(categories: Sequence[Dict]) -> Dict:
    """Class metadata of a dataset whose category ids equal the contiguous ids (void 0 first).

    Returns ``thing_classes``/``thing_colors`` (things only), ``stuff_classes``/``stuff_colors``
    (every category, void included), ``thing_dataset_id_to_contiguous_id`` (things) and
    ``stuff_dataset_id_to_contiguous_id`` (every category, so that the semantic evaluator sees
    all classes).
    """
    ids = [c["id"] for c in categories]
    if ids != list(range(len(categories))):
        raise ValueError(f"category ids must be 0..{len(categories) - 1} in order (void first), got {ids}")
    things = [c for c in categories if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [list(c["color"]) for c in things],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [list(c["color"]) for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: c["id"] for c in things},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["id"] for c in categories},
    }


def register_panoptic_ade20k_layout(
    name: str,
    *,
    dataset_dir: str,
    split: str,
    prefix: str,
    categories: Sequence[Dict],
    prepare_command: str,
    image_ext: str = "jpg",
    instances_json: Optional[str] = None,
    evaluator_type: str = "ade20k_panoptic_seg",
) -> None:
    """Register the panoptic dataset ``name`` stored in the ADE20K-panoptic layout.

    Nothing is read at registration; paths are resolved against ``$DETECTRON2_DATASETS`` when the
    dataset is loaded or a metadata path is read.

    Args:
        name: the dataset name, e.g. ``"myade20k_panoptic_train"``.
        dataset_dir: folder under the datasets root, e.g. ``"ADEChallengeData2016"``.
        split: ``"train"`` or ``"val"`` (sub-folders ``training``/``validation``).
        prefix: the panoptic files are ``<prefix>_panoptic_<split>{/,.json}``.
        categories: ``{"id", "name", "isthing", "color"}`` dicts, ids 0..K with void (0) first.
        prepare_command: the command that creates the files; quoted when they are missing.
        image_ext: extension of the images (used when the json has no ``images`` entry).
        instances_json: optional file name (in ``dataset_dir``) of a COCO instance json; only
            recorded as the ``json_file`` metadata, never read here.
        evaluator_type: the metadata ``evaluator_type``.
    """
    if split not in ADE20K_SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {sorted(ADE20K_SPLIT_FOLDERS)}, got {split!r}")
    folder = ADE20K_SPLIT_FOLDERS[split]
    paths = {
        "image_root": os.path.join(dataset_dir, "images", folder),
        "sem_seg_root": os.path.join(dataset_dir, "annotations", folder),
        "panoptic_root": os.path.join(dataset_dir, f"{prefix}_panoptic_{split}"),
        "panoptic_json": os.path.join(dataset_dir, f"{prefix}_panoptic_{split}.json"),
        "json_file": os.path.join(dataset_dir, instances_json) if instances_json else None,
    }
    register_panoptic_json_dataset(
        name, paths, panoptic_layout_metadata(categories), evaluator_type=evaluator_type,
        prepare_command=prepare_command, image_ext=image_ext,
    )


def _register_all_ade20k_panoptic() -> None:
    for split in ("train", "val"):
        register_panoptic_ade20k_layout(
            f"myade20k_panoptic_{split}",
            dataset_dir=ADE20K_DATASET_DIR,
            split=split,
            prefix="myade20k",
            categories=ADE20K_150_CATEGORIES,
            prepare_command=ADE20K_PANOPTIC_PREPARE_COMMAND,
            image_ext="jpg",
            instances_json=f"ade20k_instance_{split}.json",
        )


_register_all_ade20k_panoptic()
