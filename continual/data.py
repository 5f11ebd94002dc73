"""Data loaders of one continual step: the step's images, labels remapped to order positions.

:class:`ContinualMapper` wraps any Detectron2 mapper and rewrites its targets with a look-up
table from :meth:`continual.scenario.Scenario.label_lut`. The builders select the images of step
``CONT.TASK`` for training (:func:`build_step_train_loader`) and use the whole validation set
for testing (:func:`build_step_test_loader`).
"""
import itertools
import logging
from typing import Callable, Optional

import numpy as np
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

from .accumulation import micro_batch_size
from .scenario import IGNORE_LABEL, LUT_SIZE, Scenario, step_index_cache_path

__all__ = [
    "ContinualMapper",
    "remap_labels",
    "remap_instances",
    "build_step_train_loader",
    "build_step_test_loader",
]

logger = logging.getLogger(__name__)


def remap_labels(labels: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``lut[labels]`` as int64, after checking that every label indexes the table.

    Args:
        labels: integer tensor of any shape (e.g. ``sem_seg`` [H, W] or ``gt_classes`` [N]).
        lut: int64 tensor [256].

    Returns:
        int64 tensor of the same shape.
    """
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= lut.numel()):
        raise ValueError(
            f"labels must lie in 0..{lut.numel() - 1} to be remapped; got "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return lut[labels]


def remap_instances(instances, lut: torch.Tensor):
    """Remap ``instances.gt_classes`` with ``lut`` and drop instances that become 0 or 255.

    Args:
        instances: :class:`detectron2.structures.Instances` with ``gt_classes`` int64 [N]
            (contiguous ids) and any per-instance fields (``gt_masks`` [N, H, W], ...).
        lut: int64 tensor [256].

    Returns:
        a new ``Instances`` with the kept M <= N instances, ``gt_classes`` [M] = order positions.
    """
    classes = remap_labels(instances.gt_classes, lut)
    keep = (classes != 0) & (classes != IGNORE_LABEL)
    kept = instances[keep]
    kept.gt_classes = classes[keep]
    return kept


def _with_background(instances, sem_seg):
    """``instances`` with the pixels of class 0 in ``sem_seg`` as a first instance of class 0."""
    from detectron2.structures import BitMasks, Instances

    if sem_seg is None:
        raise ValueError("a background class (MODEL.MASK_FORMER.TEST.MASK_BG True with SEMANTIC_ON) needs the "
                         "mapper's sem_seg to build the background target")
    bg = sem_seg == 0
    if not bool(bg.any()):
        return instances
    masks = instances.gt_masks
    tensor = masks.tensor if hasattr(masks, "tensor") else masks
    out = Instances(instances.image_size)
    out.gt_classes = torch.cat([instances.gt_classes.new_zeros(1), instances.gt_classes])
    stacked = torch.cat([bg[None].to(tensor.dtype), tensor])
    out.gt_masks = BitMasks(stacked) if hasattr(masks, "tensor") else stacked
    return out


class ContinualMapper:
    """Runs ``base_mapper`` and rewrites its targets for one step of a scenario.

    * ``instances.gt_classes``: contiguous id -> ``lut[id]``; instances mapped to 0 (hidden:
      background, old or future classes) or 255 are dropped.
    * ``sem_seg``: every pixel -> ``lut[value]`` (int64; 255 stays 255).

    * ``background`` (a background class: ``MASK_BG`` with semantic inference): the pixels that
      ``sem_seg`` maps to 0 (background, old and future classes) become one more instance of
      class 0, placed first.

    Args:
        base_mapper: a Detectron2 mapper (dataset dict -> model input dict, or None to skip).
        lut: int array [256] from :meth:`Scenario.label_lut`.
        background: add the background instance (training with a background class).
    """

    def __init__(self, base_mapper: Callable[[dict], Optional[dict]], lut, background: bool = False):
        lut = np.asarray(lut)
        if lut.shape != (LUT_SIZE,) or not np.issubdtype(lut.dtype, np.integer):
            raise ValueError(
                f"lut must be an integer array of shape ({LUT_SIZE},) from Scenario.label_lut, "
                f"got dtype {lut.dtype} and shape {lut.shape}"
            )
        self.base_mapper = base_mapper
        self.lut = torch.as_tensor(lut, dtype=torch.int64)
        self.background = background

    @property
    def is_train(self):
        """The wrapped mapper's ``is_train`` (None when it has none)."""
        return getattr(self.base_mapper, "is_train", None)

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        out = self.base_mapper(dataset_dict)
        if out is None:
            return None
        if "sem_seg" in out:
            out["sem_seg"] = remap_labels(out["sem_seg"], self.lut)
        if "instances" in out:
            out["instances"] = remap_instances(out["instances"], self.lut)
            if self.background:
                out["instances"] = _with_background(out["instances"], out.get("sem_seg"))
        return out

    def __repr__(self) -> str:
        return f"ContinualMapper({self.base_mapper!r})"


def _background_class(cfg) -> bool:
    mf = cfg.MODEL.MASK_FORMER
    return bool((mf.TEST.MASK_BG or mf.PER_PIXEL) and mf.TEST.SEMANTIC_ON)


def build_step_train_loader(cfg, mapper: Callable, scenario: Optional[Scenario] = None):
    """The training loader of step ``CONT.TASK``.

    The images are those of ``DATASETS.TRAIN`` (loaded like Detectron2 does, so their order
    matches the index cache) whose row of the step membership is 1 for ``CONT.TASK``; the
    membership comes from ``$DETECTRON2_DATASETS/<TASK_NAME>.npy``, a shipped ADE20K-semantic
    partition, or is computed and cached (:meth:`Scenario.step_indices`). Targets are remapped
    with the training look-up table of the step.

    Args:
        cfg: the run's config.
        mapper: the training mapper (e.g. the panoptic or semantic Mask2Former mapper).
        scenario: default ``Scenario.from_config(cfg)``.

    Returns:
        the loader of :func:`detectron2.data.build_detection_train_loader` (an infinite stream of
        batches of mapped dicts; with ``SOLVER.ACCUMULATE_STEPS A`` of micro-batches of
        ``IMS_PER_BATCH / (processes * A)`` images per process).
    """
    scenario = scenario or Scenario.from_config(cfg)
    step = cfg.CONT.TASK
    dicts = get_detection_dataset_dicts(
        list(cfg.DATASETS.TRAIN), filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    cache = step_index_cache_path(scenario)
    if comm.get_world_size() > 1:
        # one process computes and caches the membership, the others then read the cache
        if comm.is_main_process():
            indices = scenario.step_indices(dicts, step, cache_path=cache)
        comm.synchronize()
        if not comm.is_main_process():
            indices = scenario.step_indices(dicts, step, cache_path=cache)
    else:
        indices = scenario.step_indices(dicts, step, cache_path=cache)
    if len(indices) == 0:
        raise ValueError(
            f"step {step} of scenario {scenario.name} has no training images in "
            f"{list(cfg.DATASETS.TRAIN)} ({len(dicts)} images). Check CONT.ORDER/BASE_CLS/INC_CLS "
            f"against the dataset's class ids, and delete the cache {cache} if it is stale."
        )
    logger.info(
        "Step %d of %s: %d of %d training images, classes %s",
        step, scenario.name, len(indices), len(dicts), scenario.classes_of_step(step),
    )
    subset = [dicts[i] for i in indices]
    lut = scenario.label_lut(step, train=True)
    sampler = ResumableTrainingSampler(len(subset))
    # with SOLVER.ACCUMULATE_STEPS A the loader yields micro-batches: A of them per step
    world = comm.get_world_size()
    loader = build_detection_train_loader(
        cfg, mapper=ContinualMapper(mapper, lut, background=_background_class(cfg)), dataset=subset,
        sampler=sampler, total_batch_size=micro_batch_size(cfg, world) * world,
    )
    loader.resumable_sampler = sampler  # the trainer sets its start when resuming
    return loader


class ResumableTrainingSampler(torch.utils.data.Sampler):
    """Detectron2's infinite :class:`TrainingSampler`, able to skip what was consumed before a
    resume, so that a resumed step sees the same images in the same order as an uninterrupted
    one. Set :attr:`start` (indices of this process) before iteration begins."""

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None):
        self._sampler = TrainingSampler(size, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self):
        return itertools.islice(iter(self._sampler), self.start, None)


def build_step_test_loader(cfg, dataset_name: str, mapper: Callable, scenario: Optional[Scenario] = None):
    """The test loader of step ``CONT.TASK``: every image of ``dataset_name``, with the classes of
    steps ``0..CONT.TASK`` visible (as order positions) and later classes mapped to 0.

    Args:
        cfg: the run's config.
        dataset_name: a registered validation set.
        mapper: the test mapper.
        scenario: default ``Scenario.from_config(cfg, dataset_name)``.

    Returns:
        a :class:`torch.utils.data.DataLoader` with batch size 1.
    """
    scenario = scenario or Scenario.from_config(cfg, dataset_name)
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    lut = scenario.label_lut(cfg.CONT.TASK, train=False)
    return build_detection_test_loader(
        dicts, mapper=ContinualMapper(_FileNamingMapper(mapper, dataset_name), lut),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


class _FileNamingMapper:
    """Runs a test mapper; a file it cannot read raises ``UnreadableFileError`` naming the file
    (Detectron2's ``read_image`` errors do not), with what to do."""

    def __init__(self, base_mapper: Callable, dataset_name: str):
        self.base_mapper = base_mapper
        self.dataset_name = dataset_name

    @property
    def is_train(self):
        return getattr(self.base_mapper, "is_train", None)

    def __call__(self, dataset_dict: dict):
        import zlib

        from mask2former.data.dataset_mappers.file_reading import UnreadableFileError

        try:
            return self.base_mapper(dataset_dict)
        except UnreadableFileError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:
            path = getattr(e, "filename", None) or dataset_dict.get("file_name", "<unknown>")
            raise UnreadableFileError(
                path, f"validation image (or its annotation) of {self.dataset_name}", f"{type(e).__name__}: {e}",
                hint="The evaluation needs every validation image: replace the file with an intact copy, then "
                     "rerun the same command with --resume (a trained step keeps its weights and is only "
                     "evaluated again) or --eval-only.",
            ) from e
