"""Helpers shared by the dataset registrations: the datasets root, load-time file checks with
actionable errors, metadata whose paths follow ``$DETECTRON2_DATASETS``, and a panoptic loader.

Registration happens when :mod:`mask2former` is imported and never touches the disk. Every path
is resolved against ``$DETECTRON2_DATASETS`` (default ``datasets``, relative to the current
directory) at the moment it is used: when ``DatasetCatalog.get(name)`` loads the dataset, or
when a path field of ``MetadataCatalog.get(name)`` (``image_root``, ``panoptic_root``,
``panoptic_json``, ...) is read. Changing the variable later (as the tests do) therefore moves
the dataset and its metadata together.
"""
import json
import logging
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets import load_sem_seg

__all__ = [
    "README_HINT",
    "DatasetFilesMissingError",
    "RootRelativeMetadata",
    "datasets_root",
    "describe_datasets_root",
    "register_root_relative_metadata",
    "require_paths",
    "load_panoptic_json",
    "load_semantic_pairs",
    "register_panoptic_json_dataset",
]

logger = logging.getLogger(__name__)

README_HINT = "datasets/README.md"


def datasets_root() -> str:
    """The datasets root: ``$DETECTRON2_DATASETS`` with ``~`` expanded, default ``datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def describe_datasets_root() -> str:
    """One sentence saying what ``$DETECTRON2_DATASETS`` is and where it points."""
    value = os.getenv("DETECTRON2_DATASETS")
    resolved = os.path.abspath(datasets_root())
    if value is None:
        return (
            "DETECTRON2_DATASETS is not set, so the datasets root is the default 'datasets' "
            f"relative to the current directory ({resolved})."
        )
    return f"DETECTRON2_DATASETS={value!r} (resolved to {resolved})."


class DatasetFilesMissingError(FileNotFoundError):
    """A registered dataset was loaded but some of its files or folders do not exist.

    Attributes:
        dataset_name: the registered name.
        missing: the missing paths (the first one is also ``filename``).
        prepare_command: the command that creates the files.
    """

    def __init__(self, dataset_name: str, missing: Sequence[str], prepare_command: str, detail: str = ""):
        self.dataset_name = dataset_name
        self.missing = list(missing)
        self.prepare_command = prepare_command
        shown = "\n".join(f"  {p}" for p in self.missing[:5])
        if len(self.missing) > 5:
            shown += f"\n  ... and {len(self.missing) - 5} more"
        message = (
            f"Dataset '{dataset_name}' cannot be loaded: missing file(s) or folder(s):\n{shown}\n"
            + (f"{detail}\n" if detail else "")
            + f"{describe_datasets_root()}\n"
            f"Prepare it with:\n  {prepare_command}\n"
            f"(see {README_HINT} for the expected layout)."
        )
        super().__init__(message)
        self.filename = self.missing[0] if self.missing else None

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        return self.args[0]


def _outermost_missing(path: str) -> str:
    # report ".../ADEChallengeData2016" rather than each file inside a folder that is not there
    root = os.path.normpath(datasets_root())
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    while parent and parent != path and not os.path.exists(parent):
        path, parent = parent, os.path.dirname(parent)
        if path == root:
            break
    return path


def require_paths(dataset_name: str, paths: Iterable[str], prepare_command: str) -> None:
    """Raise :class:`DatasetFilesMissingError` naming what is missing among ``paths`` (a missing
    folder is named once instead of every path below it)."""
    missing = []
    for p in paths:
        if not os.path.exists(p):
            top = _outermost_missing(p)
            if top not in missing:
                missing.append(top)
    if missing:
        raise DatasetFilesMissingError(dataset_name, missing, prepare_command)


class RootRelativeMetadata(Metadata):
    """Detectron2 metadata whose path fields are stored relative to the datasets root and
    joined with ``$DETECTRON2_DATASETS`` each time they are read.

    The fields behave like ordinary (read-only) metadata: ``meta.panoptic_json``,
    ``meta.get("image_root")`` and ``meta.as_dict()`` all return absolute-or-root-relative
    paths under the current root. Setting a path field to a different value raises, as for
    any detectron2 metadata field.
    """

    def __init__(self, name: str = "N/A", relative_paths: Optional[Mapping[str, Optional[str]]] = None):
        # the defaults let pickle/copy rebuild the object (they restore __dict__ afterwards)
        super().__init__(name=name)
        self.__dict__["_relative_paths"] = dict(relative_paths or {})

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        relative = self.__dict__.get("_relative_paths", {})
        if key in relative:
            value = relative[key]
            return None if value is None else os.path.join(datasets_root(), value)
        return super().__getattr__(key)

    def as_dict(self) -> Dict:
        out = {k: v for k, v in self.__dict__.items() if k != "_relative_paths"}
        out.update({k: getattr(self, k) for k in self.__dict__.get("_relative_paths", {})})
        return out


def register_root_relative_metadata(name: str, relative_paths: Mapping[str, Optional[str]], **fields):
    """Put a :class:`RootRelativeMetadata` for ``name`` into ``MetadataCatalog`` and set
    ``fields`` on it. Fields already set on an existing entry for ``name`` are kept."""
    meta = RootRelativeMetadata(name, relative_paths)
    existing = MetadataCatalog.get(name) if name in MetadataCatalog.list() else None
    if existing is not None:
        for key, value in existing.__dict__.items():
            if key != "name" and key not in relative_paths:
                meta.set(**{key: value})
    MetadataCatalog[name] = meta
    meta.set(**fields)
    return meta


def _list_names(folder: str) -> set:
    return set(os.listdir(folder))


def _read_panoptic_json(dataset_name: str, json_file: str, prepare_command: str) -> Dict:
    """The parsed panoptic json, checked to be a COCO-panoptic dict; errors name the file."""
    fix = f"Prepare it again ({prepare_command}) or restore it from the dataset archive."
    try:
        with open(json_file) as f:
            info = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"Dataset '{dataset_name}': {json_file} is not valid JSON ({e}); it is probably "
                         f"truncated or not the panoptic annotation file. {fix}") from None
    if not isinstance(info, dict) or not isinstance(info.get("annotations"), list):
        raise ValueError(f"Dataset '{dataset_name}': {json_file} is not a COCO-panoptic annotation file (expected a "
                         f"dict with an 'annotations' list, got {type(info).__name__}"
                         f"{' without annotations' if isinstance(info, dict) else ''}). {fix}")
    for i, ann in enumerate(info["annotations"]):
        missing = [k for k in ("file_name", "image_id", "segments_info") if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise ValueError(f"Dataset '{dataset_name}': annotation {i} of {json_file} lacks {missing}. {fix}")
    return info


def load_panoptic_json(
    dataset_name: str,
    json_file: str,
    image_root: str,
    panoptic_root: str,
    sem_seg_root: Optional[str],
    thing_dataset_id_to_contiguous_id: Mapping[int, int],
    stuff_dataset_id_to_contiguous_id: Mapping[int, int],
    prepare_command: str,
    image_ext: str = "jpg",
    integer_image_ids: bool = False,
) -> List[Dict]:
    """Read a COCO-format panoptic json into detectron2 dataset dicts.

    Each dict has ``file_name``, ``image_id``, ``pan_seg_file_name``, ``segments_info`` (with
    contiguous ``category_id`` and a bool ``isthing``) and, when ``sem_seg_root`` is given,
    ``sem_seg_file_name`` (same file name as the panoptic PNG).

    Args:
        dataset_name: the registered name (used in error messages).
        json_file, image_root, panoptic_root, sem_seg_root: the files of the dataset.
        thing_dataset_id_to_contiguous_id, stuff_dataset_id_to_contiguous_id: category maps
            (thing first, as in detectron2: a category in the thing map is a thing).
        prepare_command: the command that creates missing files (for the error message).
        image_ext: image extension used when the json has no ``images`` entry for an image.
        integer_image_ids: convert ``image_id`` to int (COCO) instead of keeping it (ADE: the
            file stem string).
    Raises:
        DatasetFilesMissingError: a folder, the json or any referenced file is missing, or the
            json lists no image.
        ValueError: a segment has a category id that is in neither map.
    """
    folders = [image_root, panoptic_root] + ([sem_seg_root] if sem_seg_root else [])
    require_paths(dataset_name, [json_file] + folders, prepare_command)
    info = _read_panoptic_json(dataset_name, json_file, prepare_command)

    image_files = {img["id"]: img["file_name"] for img in info.get("images", [])}
    image_names, pan_names = _list_names(image_root), _list_names(panoptic_root)
    sem_names = _list_names(sem_seg_root) if sem_seg_root else set()

    dicts, missing = [], []
    for ann in info.get("annotations", []):
        stem = os.path.splitext(ann["file_name"])[0]
        image_name = image_files.get(ann["image_id"], f"{stem}.{image_ext}")
        record = {
            "file_name": os.path.join(image_root, image_name),
            "image_id": int(ann["image_id"]) if integer_image_ids else ann["image_id"],
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
        }
        if image_name not in image_names:
            missing.append(record["file_name"])
        if ann["file_name"] not in pan_names:
            missing.append(record["pan_seg_file_name"])
        if sem_seg_root:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, ann["file_name"])
            if ann["file_name"] not in sem_names:
                missing.append(record["sem_seg_file_name"])
        segments = []
        for seg in ann["segments_info"]:
            seg = dict(seg)
            cat = seg["category_id"]
            if cat in thing_dataset_id_to_contiguous_id:
                seg["category_id"], seg["isthing"] = thing_dataset_id_to_contiguous_id[cat], True
            elif cat in stuff_dataset_id_to_contiguous_id:
                seg["category_id"], seg["isthing"] = stuff_dataset_id_to_contiguous_id[cat], False
            else:
                raise ValueError(
                    f"Dataset '{dataset_name}': image {ann['image_id']!r} in {json_file} has a "
                    f"segment with unknown category id {cat}."
                )
            segments.append(seg)
        record["segments_info"] = segments
        dicts.append(record)

    if missing:
        raise DatasetFilesMissingError(
            dataset_name, missing, prepare_command, detail=f"(files listed in {json_file})"
        )
    if not dicts:
        raise DatasetFilesMissingError(
            dataset_name, [json_file], prepare_command,
            detail="The json exists but lists no annotated image; it is probably incomplete.",
        )
    logger.info("Loaded %d images of '%s' from %s", len(dicts), dataset_name, json_file)
    return dicts


def register_panoptic_json_dataset(
    name: str,
    relative_paths: Mapping[str, Optional[str]],
    classes: Mapping,
    *,
    evaluator_type: str,
    prepare_command: str,
    image_ext: str = "jpg",
    integer_image_ids: bool = False,
) -> RootRelativeMetadata:
    """Register a COCO-format panoptic dataset: its metadata (``relative_paths`` with
    ``image_root``, ``panoptic_root``, ``panoptic_json``, ``sem_seg_root`` and optionally
    ``json_file``; the ``classes`` fields with both id maps; ignore label 255, label divisor
    1000) and a loader (:func:`load_panoptic_json`) that reads the files when the dataset is
    used. Returns the metadata."""
    meta = register_root_relative_metadata(
        name, relative_paths, evaluator_type=evaluator_type, ignore_label=255, label_divisor=1000, **classes
    )

    def load():
        return load_panoptic_json(
            name,
            meta.panoptic_json,
            meta.image_root,
            meta.panoptic_root,
            meta.sem_seg_root,
            classes["thing_dataset_id_to_contiguous_id"],
            classes["stuff_dataset_id_to_contiguous_id"],
            prepare_command,
            image_ext=image_ext,
            integer_image_ids=integer_image_ids,
        )

    DatasetCatalog.register(name, load)
    return meta


def load_semantic_pairs(
    dataset_name: str, sem_seg_root: str, image_root: str, prepare_command: str,
    gt_ext: str = "png", image_ext: str = "jpg",
) -> List[Dict]:
    """:func:`detectron2.data.datasets.load_sem_seg` with load-time checks: missing folders, an
    empty folder or no matching image/label pair raise :class:`DatasetFilesMissingError`."""
    require_paths(dataset_name, [image_root, sem_seg_root], prepare_command)
    for folder, ext in ((sem_seg_root, gt_ext), (image_root, image_ext)):
        if not any(name.endswith(ext) for name in os.listdir(folder)):
            raise DatasetFilesMissingError(
                dataset_name, [os.path.join(folder, f"*.{ext}")], prepare_command,
                detail=f"The folder {folder} exists but holds no .{ext} file.",
            )
    dicts = load_sem_seg(sem_seg_root, image_root, gt_ext=gt_ext, image_ext=image_ext)
    if not dicts:
        raise DatasetFilesMissingError(
            dataset_name, [image_root, sem_seg_root], prepare_command,
            detail="No image in the image folder has a label file with the same name.",
        )
    return dicts
