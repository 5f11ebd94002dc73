"""The class-incremental scenario: the one place that knows the class order.

A scenario is defined by ``CONT.ORDER`` (the class ids, in the order they are learned),
``CONT.BASE_CLS`` (classes of step 0), ``CONT.INC_CLS`` (classes added by every later step) and
``CONT.MODE`` (``overlap`` / ``disjoint`` / ``sequential``). From these it answers:

* which classes step ``t`` introduces, and which have been seen after step ``t``;
* the *order position* of a class (``ORDER.index(c) + 1``), the label the model is trained on;
* the 256-entry look-up table that turns a dataset's contiguous ids into order positions for
  training or testing at step ``t`` (:meth:`Scenario.label_lut`);
* which training images belong to step ``t`` (:meth:`Scenario.membership`,
  :meth:`Scenario.step_indices`), with the on-disk cache ``$DETECTRON2_DATASETS/<TASK_NAME>.npy``.

Class ids and contiguous ids
----------------------------
``CONT.ORDER`` names classes by their *class id* (1..C, 0 = background/void, 255 = ignore).
Dataset dicts carry *contiguous ids*. For ADE20K (and the synthetic set) the two are equal. For
COCO, Detectron2's contiguous ids are 0-based (person = 0) while the official order "c" is a
permutation of 1..133. The official code compares them unshifted, so "person" is never trained
and order entry 133 never occurs (docs/official_behaviours.md#coco-ids). That is the default here; with
``CONT.COCO_CORRECT_IDS True`` the contiguous ids of a 0-based dataset are shifted by +1 so that
order entry ``k`` means COCO category ``k`` (class id = contiguous id + :attr:`id_offset`).

Shipped ADE20K-semantic partitions
----------------------------------
The official repository ships six step-membership matrices for the ADE20K *semantic* scenarios
(``mya_100-10-ov``, ``mya_100-50-ov``, ``mya_50-50-ov`` and the ``-b`` order variants). They are
image *partitions* (one step per image), not what the in-code overlap rule computes, and the
official runs use them because they sit in ``datasets/`` = the default ``$DETECTRON2_DATASETS``.
This project stores them losslessly in ``datasets/ade20k_semantic_splits/`` and
:meth:`Scenario.step_indices` falls back to them when the cache file is missing: the matrix is
rebuilt, checked against the dataset size and written to the cache path, after which the run is
exactly the official one. ``python -m continual.scenario install-splits [--dest DIR]`` writes them
in the official format (float64 ``[20210, steps]`` as ``<TASK_NAME>.npy``) ahead of time.
"""
import argparse
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager
from PIL import Image

from mask2former.data.datasets.register_custom import check_order_classes

from .config import task_name
from .io import atomic_write

__all__ = [
    "MODES",
    "IGNORE_LABEL",
    "LUT_SIZE",
    "SHIPPED_SPLITS_DIR",
    "Scenario",
    "dataset_uses_zero_based_ids",
    "step_index_cache_path",
    "shipped_split_path",
    "load_shipped_split",
    "install_splits",
    "main",
]

logger = logging.getLogger(__name__)

MODES = ("overlap", "disjoint", "sequential")
IGNORE_LABEL = 255
LUT_SIZE = 256
# datasets/ade20k_semantic_splits/<TASK_NAME>.step_index.npy in the repository
SHIPPED_SPLITS_DIR = Path(__file__).resolve().parents[1] / "datasets" / "ade20k_semantic_splits"
_SPLIT_SUFFIX = ".step_index.npy"
_ADE20K_NUM_CLASSES = 150


class Scenario:
    """Class order, steps, label look-up tables and step membership of one continual scenario.

    Args:
        order: class ids in learning order (``CONT.ORDER``); unique, each in 1..254.
        base_classes: number of classes of step 0 (``CONT.BASE_CLS``).
        inc_classes: number of classes added by each later step (``CONT.INC_CLS``).
        mode: ``"overlap"``, ``"disjoint"`` or ``"sequential"`` (``CONT.MODE``).
        zero_based_ids: the dataset's contiguous ids start at 0 for a real class (COCO).
        correct_ids: with ``zero_based_ids``, shift contiguous ids by +1 before looking them up in
            ``order`` (``CONT.COCO_CORRECT_IDS``). Ignored for datasets that are not 0-based.
        name: the scenario name (``TASK_NAME``, e.g. ``mya_100-10-ov``); it selects the cache
            file and a shipped ADE20K-semantic partition, if one exists.
    """

    def __init__(
        self,
        order: Sequence[int],
        base_classes: int,
        inc_classes: int,
        mode: str = "overlap",
        *,
        zero_based_ids: bool = False,
        correct_ids: bool = False,
        name: Optional[str] = None,
    ):
        self.order: List[int] = _validate_order(order)
        if mode not in MODES:
            raise ValueError(f"CONT.MODE must be one of {list(MODES)}, got {mode!r}")
        self.mode = mode
        self.base_classes = int(base_classes)
        self.inc_classes = int(inc_classes)
        self.increments: List[int] = _increments(len(self.order), self.base_classes, self.inc_classes)
        self.zero_based_ids = bool(zero_based_ids)
        self.correct_ids = bool(correct_ids)
        self.name = name
        self._position: Dict[int, int] = {c: i + 1 for i, c in enumerate(self.order)}
        bounds = np.cumsum([0] + self.increments)
        self._step_bounds = [(int(bounds[t]), int(bounds[t + 1])) for t in range(len(self.increments))]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg, dataset_name: Optional[str] = None) -> "Scenario":
        """The scenario of ``cfg`` (``CONT.*``), after checking that ``CONT.TASK`` is one of its steps.

        Args:
            cfg: a config with the ``CONT`` keys (:func:`continual.config.add_continual_config`).
            dataset_name: the dataset whose ids the scenario will see; its metadata (or name)
                tells whether contiguous ids are 0-based. Default ``cfg.DATASETS.TRAIN[0]``.
        """
        if dataset_name is None:
            if not cfg.DATASETS.TRAIN:
                raise ValueError("DATASETS.TRAIN is empty: name the training set of the scenario")
            dataset_name = cfg.DATASETS.TRAIN[0]
        scenario = cls(
            cfg.CONT.ORDER,
            cfg.CONT.BASE_CLS,
            cfg.CONT.INC_CLS,
            cfg.CONT.MODE,
            zero_based_ids=dataset_uses_zero_based_ids(dataset_name),
            correct_ids=bool(cfg.CONT.get("COCO_CORRECT_IDS", False)),
            name=_cfg_task_name(cfg),
        )
        # a dataset registered from a description file: the order must name its classes
        check_order_classes(scenario.order, dataset_name)
        task = cfg.CONT.TASK
        if not isinstance(task, int) or not 0 <= task < scenario.num_steps:
            raise ValueError(
                f"CONT.TASK={task!r} is not a step of scenario {scenario.name!r} "
                f"(CONT.BASE_CLS={scenario.base_classes}, CONT.INC_CLS={scenario.inc_classes}, "
                f"len(CONT.ORDER)={len(scenario.order)}: {scenario.num_steps} steps); "
                f"valid values are 0..{scenario.num_steps - 1}"
            )
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if num_classes != len(scenario.order) + 1:
            logger.warning(
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES=%d but len(CONT.ORDER)=%d; the official code "
                "expects NUM_CLASSES = len(ORDER) + 1 (the classes plus background/void)",
                num_classes, len(scenario.order),
            )
        if scenario.zero_based_ids and not scenario.correct_ids:
            logger.warning(
                "Dataset %r has 0-based contiguous ids while CONT.ORDER uses 1-based class ids: "
                "as in the official code, contiguous id 0 is never trained and ORDER entry %d "
                "never occurs. Set CONT.COCO_CORRECT_IDS True to shift the ids by +1.",
                dataset_name, max(scenario.order),
            )
        return scenario

    # ------------------------------------------------------------------ class order
    @property
    def num_steps(self) -> int:
        """Number of steps, ``len(increments)``."""
        return len(self.increments)

    @property
    def id_offset(self) -> int:
        """Added to a contiguous id to get its class id: 1 for corrected 0-based datasets, else 0."""
        return 1 if (self.zero_based_ids and self.correct_ids) else 0

    def classes_of_step(self, step: int) -> List[int]:
        """Class ids introduced at ``step``: ``ORDER[sum(inc[:step]) : sum(inc[:step+1])]``."""
        start, end = self._step_bounds[self._check_step(step)]
        return self.order[start:end]

    def seen_classes(self, step: int) -> List[int]:
        """Class ids of steps ``0..step``, in order: ``ORDER[:sum(inc[:step+1])]``."""
        return self.order[: self._step_bounds[self._check_step(step)][1]]

    def order_position(self, class_id: int) -> int:
        """``ORDER.index(class_id) + 1``: the label of ``class_id`` in training targets."""
        try:
            return self._position[int(class_id)]
        except KeyError:
            raise KeyError(f"class id {class_id} is not in CONT.ORDER") from None

    def step_of_class(self, class_id: int) -> int:
        """The step that introduces ``class_id``."""
        position = self.order_position(class_id)
        for step, (start, end) in enumerate(self._step_bounds):
            if start < position <= end:
                return step
        raise AssertionError("unreachable: every order position lies in a step")

    def label_lut(self, step: int, train: bool) -> np.ndarray:
        """Look-up table from contiguous id to the target label at ``step``.

        Visible classes map to their order position. In training they are the classes of
        ``step`` (overlap, disjoint) or of steps ``0..step`` (sequential); at test time, those of
        steps ``0..step``. ``255`` stays ``255``; everything else (background, old classes in
        training, future classes) maps to 0, the official masking value.

        Returns:
            int64 array of shape [256], indexed by contiguous id.
        """
        step = self._check_step(step)
        if train and self.mode != "sequential":
            visible = self.classes_of_step(step)
        else:
            visible = self.seen_classes(step)
        lut = np.zeros(LUT_SIZE, dtype=np.int64)
        offset = self.id_offset
        for class_id in visible:
            contiguous = class_id - offset
            if 0 <= contiguous < IGNORE_LABEL:
                lut[contiguous] = self._position[class_id]
        lut[IGNORE_LABEL] = IGNORE_LABEL
        # at test time background (class id 0) is the label 0, which the masking value already
        # gives; nothing else to do for it
        return lut

    # ------------------------------------------------------------------ step membership
    def image_class_ids(self, dataset_dict: dict) -> np.ndarray:
        """Class ids present in one image (contiguous ids plus :attr:`id_offset`, 255 kept).

        Panoptic dicts: the ``category_id`` of every entry of ``segments_info`` (crowd included).
        Semantic dicts: the unique values of the ``sem_seg_file_name`` PNG (0 and 255 included).
        Instance dicts: the ``category_id`` of every entry of ``annotations``.

        Returns:
            int64 array [K] of unique ids.
        """
        if "segments_info" in dataset_dict:
            ids = _unique_ids(s["category_id"] for s in dataset_dict["segments_info"])
        elif "sem_seg_file_name" in dataset_dict:
            ids = _png_unique_values(dataset_dict["sem_seg_file_name"])
        elif "annotations" in dataset_dict:
            ids = _unique_ids(a["category_id"] for a in dataset_dict["annotations"])
        else:
            raise KeyError(
                f"dataset dict of {dataset_dict.get('file_name', '<unknown image>')!r} has none of "
                "'segments_info', 'sem_seg_file_name', 'annotations': cannot tell its classes"
            )
        if self.id_offset:
            ids = np.where(ids == IGNORE_LABEL, ids, ids + self.id_offset)
        return ids

    def membership(self, dataset_dicts: Sequence[dict], num_workers: int = 8) -> np.ndarray:
        """Which step(s) each image belongs to, by the official rules.

        * overlap: step ``t`` if any class of the image is a step-``t`` class.
        * disjoint / sequential: step ``t`` if some class is a step-``t`` class and every class
          is a class of steps ``0..t`` or 0 or 255.

        Args:
            dataset_dicts: N Detectron2 dataset dicts (see :meth:`image_class_ids`).
            num_workers: threads reading semantic PNGs (0 or 1: read in this thread).

        Returns:
            float64 0/1 array [N, num_steps] (the dtype of the official cache files).
        """
        dicts = list(dataset_dicts)
        if num_workers > 1 and len(dicts) > 1:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                class_sets = list(pool.map(self.image_class_ids, dicts, chunksize=64))
        else:
            class_sets = [self.image_class_ids(d) for d in dicts]

        present = np.zeros((len(dicts), LUT_SIZE), dtype=np.int32)
        for i, ids in enumerate(class_sets):
            outside = ids[(ids < 0) | (ids >= LUT_SIZE)]
            if outside.size:
                raise ValueError(
                    f"image {_describe(dicts[i])} has class ids {outside.tolist()} outside "
                    f"0..{LUT_SIZE - 1}; Scenario supports class ids 1..254 (0 = background, "
                    "255 = ignore)"
                )
            present[i, ids] = 1

        in_step = np.zeros((LUT_SIZE, self.num_steps), dtype=np.int32)
        allowed = np.zeros((LUT_SIZE, self.num_steps), dtype=np.int32)
        allowed[[0, IGNORE_LABEL], :] = 1
        for t in range(self.num_steps):
            in_step[self.classes_of_step(t), t] = 1
            allowed[self.seen_classes(t), t] = 1
        result = (present @ in_step) > 0
        if self.mode != "overlap":
            result &= (present @ (1 - allowed)) == 0
        return result.astype(np.float64)

    def step_indices(
        self,
        dataset_dicts: Sequence[dict],
        step: int,
        cache_path: Optional[str] = None,
        *,
        use_shipped_split: bool = True,
        num_workers: int = 8,
    ) -> np.ndarray:
        """Indices into ``dataset_dicts`` of the images of ``step``.

        The membership matrix comes from, in this order:

        1. ``cache_path`` if it exists (checked against the dataset size and the step count) and
           its record ``<cache_path>.source.json`` (written with it) shows it was computed from
           the same scenario and annotations (:meth:`membership_fingerprint`); otherwise the
           membership is recomputed with a warning. A cache without a record (e.g. an official
           one) is used as it is;
        2. the shipped ADE20K-semantic partition named :attr:`name`, if any and
           ``use_shipped_split``; it is then written to ``cache_path``;
        3. :meth:`membership`, then written to ``cache_path`` (atomically).

        Returns:
            int64 array [M] of sorted indices.
        """
        step = self._check_step(step)
        expected = (len(dataset_dicts), self.num_steps)
        matrix = None
        fingerprint = None
        if cache_path is not None:
            fingerprint = self.membership_fingerprint(dataset_dicts)
        if cache_path is not None and os.path.exists(cache_path):
            recorded = _read_cache_source(cache_path)
            if recorded is not None and recorded.get("fingerprint") != fingerprint:
                logger.warning(
                    "The step-index cache %s was computed from other data or another scenario than this "
                    "run's (%s; recorded: %s images, %s): the annotations changed since. Recomputing it.",
                    cache_path, self._describe_scenario(), recorded.get("num_images", "?"),
                    recorded.get("scenario", "?"),
                )
            else:
                matrix = _load_matrix(cache_path, expected, self._describe_scenario())
                if recorded is None:
                    logger.info(
                        "Loaded the step membership of %s from %s, which has no record of the data it was "
                        "computed from (%s); if the annotations changed since, delete it to recompute it.",
                        self._describe_scenario(), cache_path, _source_path(cache_path),
                    )
                else:
                    logger.info("Loaded the step membership of %s from %s", self._describe_scenario(), cache_path)
        if matrix is None and use_shipped_split and self.name and self.id_offset == 0:
            split = shipped_split_path(self.name)
            if split is not None:
                matrix = load_shipped_split(self.name, num_steps=self.num_steps)
                if matrix.shape != expected:
                    raise ValueError(
                        f"The shipped partition {split} has {matrix.shape[0]} rows (the ADE20K "
                        f"training images in load_sem_seg order) but the dataset has "
                        f"{expected[0]} images. It only applies to the full ADE20K training set; "
                        "register that, or call step_indices(..., use_shipped_split=False) to "
                        "compute the membership from the labels instead."
                    )
                logger.info("Using the shipped step partition %s for %s", split, self.name)
                if cache_path is not None:
                    _save_atomic(cache_path, matrix, self._cache_source(fingerprint, len(dataset_dicts)))
        if matrix is None:
            logger.info(
                "Computing the step membership of %d images for %s (can take minutes)",
                len(dataset_dicts), self._describe_scenario(),
            )
            matrix = self.membership(dataset_dicts, num_workers=num_workers)
            if cache_path is not None:
                _save_atomic(cache_path, matrix, self._cache_source(fingerprint, len(dataset_dicts)))
        return np.flatnonzero(matrix[:, step] == 1).astype(np.int64)

    def membership_fingerprint(self, dataset_dicts: Sequence[dict]) -> str:
        """A hash of what :meth:`membership` is computed from: the scenario (order, split, mode,
        id offset) and, per image in order, its file name and its labels (the ``category_id`` of
        ``segments_info`` / ``annotations``, or the size and modification time of its
        ``sem_seg_file_name``). Any change to the annotations changes it."""
        import hashlib

        h = hashlib.sha256()
        h.update(repr((self.order, self.increments, self.mode, self.id_offset, len(dataset_dicts))).encode())
        for d in dataset_dicts:
            if "segments_info" in d:
                labels = sorted((int(x["category_id"]), int(x.get("iscrowd", 0))) for x in d["segments_info"])
            elif "sem_seg_file_name" in d:
                try:
                    st = os.stat(d["sem_seg_file_name"])
                    labels = (d["sem_seg_file_name"], st.st_size, st.st_mtime_ns)
                except OSError:
                    labels = (d["sem_seg_file_name"], None)
            elif "annotations" in d:
                labels = sorted(int(a["category_id"]) for a in d["annotations"])
            else:
                labels = None
            h.update(repr((d.get("file_name"), labels)).encode())
            h.update(b"\n")
        return h.hexdigest()

    def _cache_source(self, fingerprint: Optional[str], num_images: int) -> dict:
        return {"fingerprint": fingerprint, "num_images": num_images, "scenario": self._describe_scenario()}

    # ------------------------------------------------------------------ helpers
    def _check_step(self, step: int) -> int:
        if not 0 <= int(step) < self.num_steps:
            raise ValueError(
                f"step {step} is not a step of {self._describe_scenario()}; valid steps are "
                f"0..{self.num_steps - 1}"
            )
        return int(step)

    def _describe_scenario(self) -> str:
        return (
            f"scenario {self.name or '<unnamed>'} (BASE_CLS={self.base_classes}, "
            f"INC_CLS={self.inc_classes}, len(ORDER)={len(self.order)}, mode={self.mode})"
        )

    def __repr__(self) -> str:
        return (
            f"Scenario(name={self.name!r}, mode={self.mode!r}, increments={self.increments}, "
            f"zero_based_ids={self.zero_based_ids}, correct_ids={self.correct_ids})"
        )


# ---------------------------------------------------------------------- module helpers
def _validate_order(order: Sequence[int]) -> List[int]:
    values = [int(c) for c in order]
    if not values:
        raise ValueError("CONT.ORDER is empty")
    bad = [c for c in values if c in (0, IGNORE_LABEL)]
    if bad:
        raise ValueError(
            f"CONT.ORDER must not contain 0 (background) or 255 (ignore); found {sorted(set(bad))}"
        )
    out_of_range = [c for c in values if not 0 < c < IGNORE_LABEL]
    if out_of_range:
        raise ValueError(f"CONT.ORDER entries must lie in 1..254; found {sorted(set(out_of_range))}")
    seen, dupes = set(), set()
    for c in values:
        (dupes if c in seen else seen).add(c)
    if dupes:
        raise ValueError(f"CONT.ORDER has duplicate class ids {sorted(dupes)}")
    return values


def _increments(num_classes: int, base: int, inc: int) -> List[int]:
    desc = f"(CONT.BASE_CLS={base}, CONT.INC_CLS={inc}, len(CONT.ORDER)={num_classes})"
    if base <= 0:
        raise ValueError(f"CONT.BASE_CLS must be positive {desc}")
    if base > num_classes:
        raise ValueError(f"CONT.BASE_CLS is larger than the number of classes in CONT.ORDER {desc}")
    rest = num_classes - base
    if rest == 0:
        return [base]
    if inc <= 0:
        raise ValueError(
            f"CONT.INC_CLS must be positive when CONT.ORDER has classes after the base step {desc}"
        )
    if rest % inc:
        raise ValueError(
            f"len(CONT.ORDER) - CONT.BASE_CLS = {rest} is not a multiple of CONT.INC_CLS {desc}; "
            "fix BASE_CLS/INC_CLS or the order"
        )
    return [base] + [inc] * (rest // inc)


def _cfg_task_name(cfg) -> str:
    if cfg.get("TASK_NAME"):
        return cfg.TASK_NAME
    return task_name(cfg)


def dataset_uses_zero_based_ids(dataset_name: str) -> bool:
    """Whether contiguous id 0 of ``dataset_name`` is a real class (COCO) rather than void/background.

    Decided from the metadata's ``{thing,stuff}_dataset_id_to_contiguous_id`` when present
    (0-based iff contiguous 0 comes from a dataset id other than 0), else from the name
    (``coco*``).
    """
    meta = MetadataCatalog.get(dataset_name)
    mapping = {}
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        mapping.update(getattr(meta, key, None) or {})
    if mapping:
        sources = [dataset_id for dataset_id, contiguous in mapping.items() if contiguous == 0]
        return bool(sources) and sources[0] != 0
    return dataset_name.lower().startswith("coco")


def step_index_cache_path(scenario: Scenario, root: Optional[str] = None) -> str:
    """``<root>/<TASK_NAME>.npy``, root defaulting to ``$DETECTRON2_DATASETS`` (or ``datasets``).

    With corrected COCO ids the membership differs from the official one, so the file becomes
    ``<TASK_NAME>.correct-ids.npy`` and never collides with an official cache.
    """
    if not scenario.name:
        raise ValueError("the scenario has no name (TASK_NAME): cannot name its step-index cache")
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    stem = scenario.name + (".correct-ids" if scenario.id_offset else "")
    return os.path.join(root, stem + ".npy")


def shipped_split_path(name: str) -> Optional[Path]:
    """The shipped partition file of scenario ``name`` (e.g. ``mya_100-10-ov``), or None."""
    path = SHIPPED_SPLITS_DIR / f"{name}{_SPLIT_SUFFIX}"
    return path if path.is_file() else None


def shipped_split_names() -> List[str]:
    """Names of the scenarios that have a shipped partition."""
    return sorted(p.name[: -len(_SPLIT_SUFFIX)] for p in SHIPPED_SPLITS_DIR.glob(f"*{_SPLIT_SUFFIX}"))


def _steps_from_name(name: str) -> Optional[int]:
    match = re.match(r"^mya_(\d+)-(\d+)-", name)
    if not match:
        return None
    base, inc = int(match.group(1)), int(match.group(2))
    return 1 + (_ADE20K_NUM_CLASSES - base) // inc


def load_shipped_split(name: str, num_steps: Optional[int] = None) -> np.ndarray:
    """The shipped partition of ``name`` as the official membership matrix.

    The file holds the step of each image (int8, -1 = no step). Rows without a step stay all zero.

    Args:
        name: scenario name, e.g. ``mya_100-10-ov``.
        num_steps: columns of the result; default from the name (150 ADE20K classes).

    Returns:
        float64 0/1 array [20210, num_steps].
    """
    path = shipped_split_path(name)
    if path is None:
        raise FileNotFoundError(
            f"no shipped partition for {name!r} in {SHIPPED_SPLITS_DIR}; available: {shipped_split_names()}"
        )
    step_of_image = np.load(path)
    if step_of_image.ndim != 1:
        raise ValueError(f"{path} must hold a 1-d step-per-image vector, got shape {step_of_image.shape}")
    if num_steps is None:
        num_steps = _steps_from_name(name) or int(step_of_image.max()) + 1
    if step_of_image.max() >= num_steps or step_of_image.min() < -1:
        raise ValueError(
            f"{path} assigns images to steps {int(step_of_image.min())}..{int(step_of_image.max())} "
            f"but the scenario has {num_steps} steps; it belongs to another scenario"
        )
    matrix = np.zeros((len(step_of_image), num_steps), dtype=np.float64)
    rows = np.flatnonzero(step_of_image >= 0)
    matrix[rows, step_of_image[rows].astype(np.int64)] = 1.0
    return matrix


def install_splits(dest: Optional[str] = None, overwrite: bool = False) -> List[str]:
    """Write every shipped partition as ``<dest>/<name>.npy`` in the official format.

    Args:
        dest: target folder; default ``$DETECTRON2_DATASETS`` (or ``datasets``).
        overwrite: replace files that exist already (otherwise they are left alone).

    Returns:
        the paths written.
    """
    dest = dest or os.getenv("DETECTRON2_DATASETS", "datasets")
    written = []
    for name in shipped_split_names():
        target = os.path.join(dest, f"{name}.npy")
        if os.path.exists(target) and not overwrite:
            logger.info("%s exists; left unchanged (pass --overwrite to replace it)", target)
            continue
        _save_atomic(target, load_shipped_split(name))
        written.append(target)
    return written


def _unique_ids(ids: Iterable[int]) -> np.ndarray:
    return np.unique(np.asarray(list(ids), dtype=np.int64))


def _png_unique_values(path: str) -> np.ndarray:
    with PathManager.open(path, "rb") as f:
        array = np.asarray(Image.open(f))
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=LUT_SIZE)).astype(np.int64)
    return np.unique(array).astype(np.int64)


def _describe(dataset_dict: dict) -> str:
    for key in ("sem_seg_file_name", "pan_seg_file_name", "file_name", "image_id"):
        if key in dataset_dict:
            return repr(dataset_dict[key])
    return "<unnamed>"


def _load_matrix(path: str, expected_shape, scenario_desc: str) -> np.ndarray:
    fix = (
        "It was written for another dataset or scenario (or is a partial file): delete it and "
        "it is recomputed on the next run, or point DETECTRON2_DATASETS at another folder."
    )
    try:
        matrix = np.load(path)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot read the step-index cache {path} ({e}). {fix}") from e
    if matrix.shape != tuple(expected_shape):
        raise ValueError(
            f"the step-index cache {path} has shape {matrix.shape}, but {scenario_desc} on this "
            f"dataset needs {tuple(expected_shape)} (images, steps). {fix}"
        )
    if not np.isin(matrix, (0, 1)).all():
        raise ValueError(f"the step-index cache {path} holds values other than 0/1. {fix}")
    return matrix


def _source_path(cache_path: str) -> str:
    """``<cache>.source.json``: what a step-index cache was computed from."""
    return cache_path + ".source.json"


def _read_cache_source(cache_path: str) -> Optional[dict]:
    import json

    try:
        with open(_source_path(cache_path)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable record: treated as not matching
    return data if isinstance(data, dict) else {}


def _save_atomic(path: str, array: np.ndarray, source: Optional[dict] = None) -> None:
    """``np.save`` through a temporary file in the same folder and ``os.replace``, then the record
    of what it was computed from (``source``, if given); a cache that cannot be written is only a
    warning (the membership is recomputed next time)."""
    import json

    try:
        if os.path.exists(_source_path(path)):
            os.remove(_source_path(path))  # never leave a record that describes another matrix
        with atomic_write(path, binary=True) as f:
            np.save(f, array)
        if source is not None:
            with atomic_write(_source_path(path)) as f:
                json.dump(source, f, indent=1)
    except OSError as e:
        logger.warning("cannot write the step-index cache %s (%s); continuing without it", path, e)
        return
    logger.info("Saved the step membership to %s", path)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``python -m continual.scenario install-splits [--dest DIR] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m continual.scenario", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser(
        "install-splits",
        help="write the shipped ADE20K-semantic partitions as <TASK_NAME>.npy (official format)",
    )
    install.add_argument(
        "--dest", default=None, help="target folder (default: $DETECTRON2_DATASETS or ./datasets)"
    )
    install.add_argument("--overwrite", action="store_true", help="replace existing files")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command == "install-splits":
        written = install_splits(args.dest, overwrite=args.overwrite)
        for path in written:
            print(path)
        if not written:
            print("nothing written (all files exist; use --overwrite to replace them)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
