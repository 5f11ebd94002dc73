"""Your own COCO-panoptic-format dataset, registered from a small description file.

A YAML (or JSON) file describes the dataset; ``DATASETS.CUSTOM_FILE path/to/file.yaml`` on the
command line of ``train_continual.py`` (or :func:`register_custom_dataset` in Python) registers
``<name>_panoptic_<split>`` for every split it lists::

    name: shapes                  # registers shapes_panoptic_train, shapes_panoptic_val
    root: shapes                  # relative paths are under $DETECTRON2_DATASETS; absolute paths work
    classes:                      # your class list (optional: default the train json's categories)
      - {id: 1, name: sky, isthing: false}
      - {id: 2, name: disc, isthing: true, color: [200, 40, 40]}
    splits:
      train: {images: images/train, panoptic: panoptic_train, json: panoptic_train.json}
      val:   {images: images/val, panoptic: panoptic_val, json: panoptic_val.json}

Class ids are the ``category_id`` values of the panoptic json (1..254; 0 is void / unlabeled).
They are also the ids of ``CONT.ORDER``: dataset id = contiguous id, as for ADE20K. Paths of a
split are relative to ``root``. Nothing is read at registration; the files are checked when a
split is loaded, and a class list that disagrees with the annotations stops the run with the file,
the image and the fix (:class:`ClassListMismatchError`): a segment whose category is not in the
class list, a class of the list that the json's ``categories`` lacks or names / marks as
thing or stuff differently. Classes of the list that no training image contains only give a
warning (their continual step may then have no images, which stops that step).
"""
import json
import logging
import os
from typing import Dict, List, Mapping, Optional

import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog_utils import DatasetFilesMissingError, load_panoptic_json, require_paths

__all__ = [
    "ClassListMismatchError", "register_custom_dataset", "load_dataset_description", "check_order_classes",
    "scenario_keys",
]

logger = logging.getLogger(__name__)

_SPLIT_KEYS = ("images", "panoptic", "json")


class ClassListMismatchError(ValueError):
    """The class list of a dataset description and its annotations disagree."""


def _fail(path: str, message: str):
    raise ValueError(f"dataset description {path}: {message}")


def load_dataset_description(path: str) -> Dict:
    """Read and validate a dataset description file (format: module docstring).

    Returns:
        ``{"name", "root", "classes" (list of dicts or None), "splits": {split: {images,
        panoptic, json}}, "path"}`` with absolute paths.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DATASETS.CUSTOM_FILE {path!r} does not exist")
    with open(path) as f:
        desc = yaml.safe_load(f) or {}
    if not isinstance(desc, dict):
        _fail(path, "must be a mapping with the keys name, root, splits and optionally classes")
    unknown = set(desc) - {"name", "root", "classes", "splits"}
    if unknown:
        _fail(path, f"unknown keys {sorted(unknown)}; the keys are name, root, classes, splits")
    name = desc.get("name")
    if not name or not isinstance(name, str) or any(c in name for c in " /"):
        _fail(path, f"'name' must be a word without spaces or slashes (got {name!r})")
    root = str(desc.get("root") or "")
    if not os.path.isabs(root):
        root = os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), root)
    splits = desc.get("splits")
    if not isinstance(splits, dict) or not splits:
        _fail(path, "'splits' must map split names (e.g. train, val) to {images, panoptic, json}")
    resolved = {}
    for split, entry in splits.items():
        missing = [k for k in _SPLIT_KEYS if not isinstance(entry, dict) or not entry.get(k)]
        if missing:
            _fail(path, f"split {split!r} lacks {missing}; each split needs images (image folder), "
                        "panoptic (folder of panoptic PNGs) and json (COCO panoptic json)")
        resolved[split] = {k: os.path.join(root, str(entry[k])) for k in _SPLIT_KEYS}
    classes = desc.get("classes")
    if classes is not None:
        classes = _check_classes(path, classes)
    return {"name": name, "root": root, "classes": classes, "splits": resolved, "path": os.path.abspath(path)}


def _check_classes(path: str, classes) -> List[Dict]:
    if not isinstance(classes, list) or not classes:
        _fail(path, "'classes' must be a non-empty list of {id, name, isthing[, color]}")
    out, seen = [], set()
    for c in classes:
        if not isinstance(c, dict) or not {"id", "name", "isthing"} <= set(c):
            _fail(path, f"class entry {c!r} needs id, name and isthing")
        cid = c["id"]
        if not isinstance(cid, int) or not 1 <= cid <= 254:
            _fail(path, f"class {c['name']!r} has id {cid!r}; ids must be integers in 1..254 "
                        "(0 is void, 255 ignore): renumber the categories of your json")
        if cid in seen:
            _fail(path, f"class id {cid} appears twice")
        seen.add(cid)
        color = c.get("color") or _default_color(cid)
        out.append({"id": cid, "name": str(c["name"]), "isthing": bool(c["isthing"]), "color": list(color)})
    return sorted(out, key=lambda c: c["id"])


def _default_color(cid: int) -> List[int]:
    return [(cid * 67) % 256, (cid * 151 + 80) % 256, (cid * 29 + 160) % 256]


def _classes_from_json(json_file: str) -> List[Dict]:
    with open(json_file) as f:
        cats = json.load(f).get("categories") or []
    cats = [c for c in cats if c.get("id", 0) != 0]  # a void entry, if any
    if not cats:
        raise ClassListMismatchError(
            f"{json_file} has no 'categories' and the dataset description has no 'classes': "
            "list your classes in one of them"
        )
    return _check_classes(json_file, [{"id": c["id"], "name": c.get("name", str(c["id"])),
                                        "isthing": bool(c.get("isthing", 0)), "color": c.get("color")}
                                       for c in cats])


def _metadata_fields(classes: List[Dict]) -> Dict:
    """Detectron2 class metadata with dataset id = contiguous id (void 0, gaps as ``unused_<id>``)."""
    by_id = {c["id"]: c for c in classes}
    size = max(by_id) + 1
    names = ["void"] + [by_id[i]["name"] if i in by_id else f"unused_{i}" for i in range(1, size)]
    colors = [[0, 0, 0]] + [by_id[i]["color"] if i in by_id else [0, 0, 0] for i in range(1, size)]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {c["id"]: c["id"] for c in classes if c["isthing"]},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["id"] for c in classes if not c["isthing"]},
    }


def _check_json_categories(desc: Dict, json_file: str, classes: List[Dict]) -> None:
    with open(json_file) as f:
        cats = {c["id"]: c for c in json.load(f).get("categories") or [] if "id" in c}
    problems = []
    for c in classes:
        j = cats.get(c["id"])
        if j is None:
            problems.append(f"class {c['id']} ({c['name']!r}) is not among the json's categories")
            continue
        if "name" in j and j["name"] != c["name"]:
            problems.append(f"class {c['id']} is {c['name']!r} in the class list but {j['name']!r} in the json")
        if "isthing" in j and bool(j["isthing"]) != c["isthing"]:
            problems.append(f"class {c['id']} ({c['name']!r}) is a {'thing' if c['isthing'] else 'stuff'} "
                            f"class in the class list but isthing={j['isthing']} in the json")
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ClassListMismatchError(
            f"the class list of {desc['path']} and the categories of {json_file} disagree:\n  {shown}\n"
            "The evaluation scores the json's categories, so make the two lists the same (or drop "
            "'classes' from the description to use the json's categories)."
        )


def _warn_absent_classes(name: str, dicts: List[Dict], classes: List[Dict]) -> None:
    present = {s["category_id"] for d in dicts for s in d["segments_info"]}
    absent = [f"{c['id']} ({c['name']})" for c in classes if c["id"] not in present]
    if absent:
        logger.warning("Dataset '%s': no image contains the classes %s of the class list; a continual "
                       "step made only of such classes has no training images", name, ", ".join(absent))


def register_custom_dataset(path: str) -> List[str]:
    """Register every split of the dataset description ``path`` as ``<name>_panoptic_<split>``.

    Registering the same file again (every process of a run does it) is harmless; a name that is
    already registered by something else raises.

    Returns:
        the registered dataset names.
    """
    desc = load_dataset_description(path)
    classes = desc["classes"]
    if classes is None:
        first = desc["splits"].get("train") or next(iter(desc["splits"].values()))
        if not os.path.isfile(first["json"]):
            raise DatasetFilesMissingError(
                f"{desc['name']} (classes)", [first["json"]], f"write your data as described in {path}",
                detail="The description has no 'classes', so they are read from this json.",
            )
        classes = _classes_from_json(first["json"])
    fields = _metadata_fields(classes)
    thing_map = fields["thing_dataset_id_to_contiguous_id"]
    stuff_map = fields["stuff_dataset_id_to_contiguous_id"]
    class_ids = sorted(c["id"] for c in classes)
    names = []
    for split, files in desc["splits"].items():
        name = f"{desc['name']}_panoptic_{split}"
        if name in DatasetCatalog.list():
            old = MetadataCatalog.get(name).get("dataset_description", None)
            if old != desc["path"]:
                raise ValueError(f"dataset {name!r} (from {path}) is already registered"
                                 + (f" by {old}" if old else "") + ": choose another 'name'")
            names.append(name)
            continue

        def load(name=name, files=files, split=split):
            prepare = f"write the files listed for split {split!r} in {desc['path']}"
            require_paths(name, [files["json"], files["images"], files["panoptic"]], prepare)
            _check_json_categories(desc, files["json"], classes)
            try:
                dicts = load_panoptic_json(name, files["json"], files["images"], files["panoptic"], None,
                                           thing_map, stuff_map, prepare, integer_image_ids=False)
            except ValueError as e:
                if "unknown category id" not in str(e):
                    raise
                raise ClassListMismatchError(
                    f"{e} It is not in the class list of {desc['path']} (ids {class_ids}): add the "
                    "class to 'classes' (and to CONT.ORDER if it should be learned), or fix the "
                    "annotation."
                ) from None
            if split == "train":
                _warn_absent_classes(name, dicts, classes)
            return dicts

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000,
            image_root=files["images"], panoptic_root=files["panoptic"], panoptic_json=files["json"],
            json_file=files["json"], dataset_description=desc["path"], class_ids=class_ids, **fields,
        )
        names.append(name)
    logger.info("Registered %s from %s (%d classes)", names, path, len(classes))
    return names


def check_order_classes(order, dataset_name: str) -> None:
    """For a dataset registered from a description file: every ``CONT.ORDER`` entry must be one of
    its classes. Other datasets are not checked (COCO's official order has an entry that never
    occurs on purpose)."""
    meta = MetadataCatalog.get(dataset_name)
    source = meta.get("dataset_description", None)
    if not source:
        return
    ids = set(meta.class_ids)
    unknown = [c for c in order if c not in ids]
    if unknown:
        raise ClassListMismatchError(
            f"CONT.ORDER has class ids {unknown} that are not classes of dataset '{dataset_name}' "
            f"(class list of {source}: ids {sorted(ids)}). Fix CONT.ORDER, or add the classes to "
            "the description."
        )


def scenario_keys(path: str) -> Dict[str, str]:
    """What ``script/custom.sh`` needs from a description: the dataset name, its class ids, the
    registered train / test names and ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (largest id + 1)."""
    desc = load_dataset_description(path)
    classes = desc["classes"]
    if classes is None:
        first = desc["splits"].get("train") or next(iter(desc["splits"].values()))
        classes = _classes_from_json(first["json"])
    for split in ("train", "val"):
        if split not in desc["splits"]:
            raise ValueError(f"dataset description {path}: script/custom.sh needs the splits 'train' "
                             f"and 'val' (found {sorted(desc['splits'])})")
    ids = sorted(c["id"] for c in classes)
    return {
        "DATASET_NAME": desc["name"],
        "CLASS_IDS": "[" + ",".join(str(i) for i in ids) + "]",
        "NUM_CLASSES": str(max(ids) + 1),
        "TRAIN_SET": f"{desc['name']}_panoptic_train",
        "TEST_SET": f"{desc['name']}_panoptic_val",
    }


def main(argv=None) -> int:
    """``python -m mask2former.data.datasets.register_custom keys FILE``: print
    :func:`scenario_keys` as ``KEY=VALUE`` lines; ``check FILE``: load every split and report."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mask2former.data.datasets.register_custom")
    parser.add_argument("command", choices=("keys", "check"))
    parser.add_argument("file", help="dataset description (YAML)")
    args = parser.parse_args(argv)
    if args.command == "keys":
        for key, value in scenario_keys(args.file).items():
            print(f"{key}={value}")
        return 0
    for name in register_custom_dataset(args.file):
        dicts = DatasetCatalog.get(name)
        print(f"{name}: {len(dicts)} images, "
              f"{sum(len(d['segments_info']) for d in dicts)} segments")
    return 0


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
