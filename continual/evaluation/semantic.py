"""mIoU for continual semantic segmentation, split into base / old / new / novel (docs/official_behaviours.md#semantic-miou).

Classes are **order positions**: index 0 is the background (ADE "other" and every class not seen
yet, as remapped by the continual data wrapper), 1..C the classes seen so far. The semantic splits
therefore follow the class order by construction (unlike the panoptic per-class list).
"""
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.evaluation.evaluator import DatasetEvaluator
from detectron2.utils import comm

from ..io import atomic_write
from .panoptic import SPLITS, split_metrics
from .results import append_official_per_class_csv

__all__ = ["ContinualSemSegEvaluator", "confusion_matrix", "semantic_metrics"]

logger = logging.getLogger(__name__)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """Counts ``[pred, gt]`` of shape ``(N+1, N+1)`` with ``N = num_classes``.

    ``gt == ignore_label`` goes to the extra row/column ``N``. ``pred`` must lie in ``[0, N)`` and
    ``gt`` in ``[0, N)`` or be ``ignore_label``.
    """
    pred = np.asarray(pred, dtype=np.int64)
    gt = np.array(gt, dtype=np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    ignore = gt == ignore_label
    gt[ignore] = num_classes
    bad = (~ignore) & ((gt < 0) | (gt >= num_classes))
    if bad.any():
        raise ValueError(
            f"ground-truth labels {sorted(np.unique(gt[bad]).tolist())} are outside 0..{num_classes - 1} "
            f"and not the ignore label {ignore_label} (is sem_seg remapped to order positions?)"
        )
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in 0..{num_classes - 1}")
    n = num_classes + 1
    return np.bincount(n * pred.reshape(-1) + gt.reshape(-1), minlength=n * n).reshape(n, n)


def semantic_metrics(conf: np.ndarray, base: int, inc: int, step: int) -> Dict[str, object]:
    """Metrics of a ``(N+1, N+1)`` ``[pred, gt]`` confusion matrix (last row/column = ignore).

    Per class ``c`` (float32, as the official code): ``acc_c = tp/gt`` and
    ``IoU_c = tp/(gt + pred - tp)``, both NaN where the class has no GT pixel.

    * ``mIoU``: Σ IoU over classes with GT pixels / number of classes with GT **or** predicted
      pixels; class 0 (background) included, as the official code.
    * ``mIoU_no_bg``: the same over classes 1..C only.
    * ``mIoU_base/old/new/novel``: :func:`split_metrics` of the IoU list (offset 1); NaN of a
      class without GT pixels propagates, as the official ``np.sum``.
    * ``fwIoU`` (GT-frequency weighted), ``fgIoU`` (foreground/background agreement),
      ``mACC``, ``pACC``.

    Returns fractions (not percent) plus the ``iou`` and ``acc`` arrays.
    """
    conf = np.asarray(conf, dtype=np.int64)
    valid = conf[:-1, :-1]
    tp = valid.diagonal().astype(np.float32)
    pos_gt = valid.sum(axis=0).astype(np.float32)
    pos_pred = valid.sum(axis=1).astype(np.float32)
    n = tp.shape[0]

    has_gt = pos_gt > 0
    seen = (pos_gt + pos_pred) > 0
    acc = np.full(n, np.nan, dtype=np.float32)
    iou = np.full(n, np.nan, dtype=np.float32)
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    iou[has_gt] = tp[has_gt] / (pos_gt + pos_pred - tp)[has_gt]

    def _ratio(num, den):
        return float(num) / float(den) if den > 0 else float("nan")

    total_gt = float(np.sum(pos_gt))
    out = {
        "mIoU": _ratio(np.sum(iou[has_gt]), np.sum(seen)),
        "mIoU_no_bg": _ratio(np.sum(iou[1:][has_gt[1:]]), np.sum(seen[1:])),
        "fwIoU": float(np.sum(iou[has_gt] * (pos_gt[has_gt] / total_gt))) if total_gt > 0 else float("nan"),
        "fgIoU": _ratio(np.sum(valid[1:, 1:]) + valid[0, 0], np.sum(valid)),
        "mACC": _ratio(np.sum(acc[has_gt]), np.sum(has_gt)),
        "pACC": _ratio(np.sum(tp), total_gt),
    }
    split = split_metrics(iou, base, inc, step, offset=1)
    for name in SPLITS:
        out[f"mIoU_{name}"] = split[name]
    out["iou"] = iou
    out["acc"] = acc
    return out


class ContinualSemSegEvaluator(DatasetEvaluator):
    """Confusion-matrix semantic metrics of a continual model (docs/official_behaviours.md#semantic-miou).

    Prediction = argmax over the ``C+1`` channels of ``output["sem_seg"]``; GT =
    ``input["sem_seg"]`` (order positions, 0 background, ``ignore_label`` ignored) at the same,
    test-resized resolution. Must be called on every process. Results (main process only)::

        {"sem_seg": {"mIoU", "mIoU_no_bg", "mIoU_base", "mIoU_old", "mIoU_new", "mIoU_novel",
                     "fwIoU", "fgIoU", "mACC", "pACC", "IoU-<i>", "ACC-<i>" for i in 0..C}}

    in percent; ``i`` is the order position (0 = background); NaN for classes without GT pixels.

    Args:
        dataset_name: kept for logging.
        num_classes_seen: ``C = C0 + T·Cinc``; the matrix has ``N = 1 + C`` classes.
        base_classes, inc_classes, step: ``C0``, ``Cinc``, ``T``.
        ignore_label: GT value excluded from every metric.
        output_dir: where the official evaluator's files are written (pass
            ``<OUTPUT_DIR>/inference``); nothing is written when ``None``:
            ``sem_seg_evaluation.pth`` (the result dict), ``sem_seg_predictions.json`` (every
            predicted class of every image as an RLE, see :meth:`encode_prediction`) and, with
            ``per_class_csv_name``, the per-class rows of ``iou.csv`` and ``acc.csv``.
        per_class_csv_name: run name (``cfg.NAME``; :meth:`from_config` sets it) under which
            the per-class IoU / accuracy are appended to ``output_dir/iou.csv`` and ``acc.csv``.
        category_ids: order position -> ``category_id`` written to ``sem_seg_predictions.json``;
            ``None``: the position itself (the official code maps through the metadata's
            ``stuff_dataset_id_to_contiguous_id`` when the dataset has one, which the ADE20K
            semantic datasets do not).
    """

    def __init__(
        self,
        dataset_name: str,
        num_classes_seen: int,
        base_classes: int,
        inc_classes: int,
        step: int,
        ignore_label: int = 255,
        output_dir: Optional[str] = None,
        *,
        per_class_csv_name: Optional[str] = None,
        category_ids: Optional[Dict[int, int]] = None,
    ):
        expected = base_classes + step * inc_classes
        if num_classes_seen != expected:
            raise ValueError(
                f"num_classes_seen={num_classes_seen} but base {base_classes} + step {step} x inc "
                f"{inc_classes} = {expected}"
            )
        self._dataset_name = dataset_name
        self._num_classes = 1 + int(num_classes_seen)
        self._base = int(base_classes)
        self._inc = int(inc_classes)
        self._step = int(step)
        self._ignore_label = int(ignore_label)
        self._output_dir = output_dir
        self._csv_name = per_class_csv_name
        self._category_ids = None if category_ids is None else {int(k): int(v) for k, v in category_ids.items()}
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None, **kwargs):
        """Build from ``cfg.CONT`` (BASE_CLS, INC_CLS, TASK); the ignore label comes from the
        dataset metadata when it has one."""
        c = cfg.CONT
        meta = MetadataCatalog.get(dataset_name)
        kwargs.setdefault("ignore_label", getattr(meta, "ignore_label", 255))
        if output_dir:
            kwargs.setdefault("per_class_csv_name", cfg.NAME)
        if "category_ids" not in kwargs and hasattr(meta, "stuff_dataset_id_to_contiguous_id"):
            kwargs["category_ids"] = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
        return cls(
            dataset_name, c.BASE_CLS + c.TASK * c.INC_CLS, c.BASE_CLS, c.INC_CLS, c.TASK,
            output_dir=output_dir, **kwargs,
        )

    def reset(self):
        n = self._num_classes + 1
        self._conf_matrix = np.zeros((n, n), dtype=np.int64)
        self._predictions = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            logits = out["sem_seg"]
            if logits.shape[0] != self._num_classes:
                raise ValueError(
                    f"sem_seg has {logits.shape[0]} channels, expected 1 + {self._num_classes - 1}"
                )
            pred = logits.argmax(dim=0).cpu().numpy()
            gt = inp["sem_seg"]
            gt = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            self._conf_matrix += confusion_matrix(pred, gt, self._num_classes, self._ignore_label)
            if self._output_dir:
                self._predictions.extend(self.encode_prediction(pred, inp.get("file_name", inp.get("image_id"))))

    def encode_prediction(self, pred: np.ndarray, file_name) -> list:
        """One entry per predicted class of an image, as the official ``sem_seg_predictions.json``
        (COCO stuff results format): ``{"file_name", "category_id", "segmentation"}`` with the
        mask as a COCO RLE whose ``counts`` is a string."""
        import pycocotools.mask as mask_util

        entries = []
        for label in np.unique(pred):
            label = int(label)
            if self._category_ids is None:
                category_id = label
            elif label in self._category_ids:
                category_id = self._category_ids[label]
            else:
                raise ValueError(
                    f"predicted class {label} has no category id in the metadata of {self._dataset_name} "
                    "(stuff_dataset_id_to_contiguous_id)"
                )
            rle = mask_util.encode(np.asfortranarray((pred == label).astype(np.uint8)[:, :, None]))[0]
            rle["counts"] = rle["counts"].decode("utf-8")
            entries.append({"file_name": file_name, "category_id": category_id, "segmentation": rle})
        return entries

    def evaluate(self):
        comm.synchronize()
        matrices = comm.gather(self._conf_matrix, dst=0)
        predictions = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        conf = np.sum(np.stack(matrices), axis=0)
        if self._output_dir:
            with atomic_write(os.path.join(self._output_dir, "sem_seg_predictions.json")) as f:
                json.dump(list(itertools.chain(*predictions)), f)

        m = semantic_metrics(conf, self._base, self._inc, self._step)
        res = OrderedDict()
        for key in ("mIoU", "mIoU_no_bg", "mIoU_base", "mIoU_old", "mIoU_new", "mIoU_novel",
                    "fwIoU", "fgIoU", "mACC", "pACC"):
            res[key] = 100.0 * m[key]
        cls_iou = [100.0 * float(v) for v in m["iou"]]
        cls_acc = [100.0 * float(v) for v in m["acc"]]
        for i, v in enumerate(cls_iou):
            res[f"IoU-{i}"] = v
        for i, v in enumerate(cls_acc):
            res[f"ACC-{i}"] = v

        if self._output_dir:
            with atomic_write(os.path.join(self._output_dir, "sem_seg_evaluation.pth"), binary=True) as f:
                torch.save(dict(res), f)
            if self._csv_name is not None:
                # printed as the official float32 values (e.g. 66.66667, nan)
                append_official_per_class_csv(
                    self._output_dir, self._csv_name, self._step,
                    [np.float32(100) * v for v in m["iou"]], [np.float32(100) * v for v in m["acc"]],
                )
        logger.info("Semantic segmentation evaluation (%s): %s", self._dataset_name,
                    {k: v for k, v in res.items() if "-" not in k})
        return OrderedDict({"sem_seg": res})

    @property
    def confusion(self) -> np.ndarray:
        """The accumulated ``[pred, gt]`` matrix of this process (before gathering)."""
        return self._conf_matrix
