"""Panoptic Quality for continual panoptic segmentation, split into base / old / new / novel.

The model labels segments with **order positions** (1-based indices into ``CONT.ORDER``). Before
scoring, each position ``p`` becomes the dataset's contiguous class id ``ORDER[p-1]`` and then the
dataset category id of the metadata. PQ is computed by panopticapi against the dataset's original
panoptic json, which lists every class, so classes not seen yet count as false negatives
(docs/official_behaviours.md#panoptic-all-against-the-full-json).

Base / novel split, as released (docs/official_behaviours.md#base-novel-split)
---------------------------------------------------------------------------
The official evaluator takes the per-class PQ list in the category order of the GT json (for ADE:
void, 1, ..., 150) and slices it **by position in that list**: base = entries ``1 .. C0``,
novel = everything after. That is right only when ``CONT.ORDER`` is the identity (every ADE
script). For any other order the "base" numbers are those of the first dataset ids, not of the
classes that were trained in step 0. :func:`split_metrics` reproduces this (the default of
:class:`ContinualPanopticEvaluator`); :func:`per_class_in_order` rearranges the list into class
order first, which gives the intended split for any order (``split_by_order=True``).
"""
import contextlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.evaluation.evaluator import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb
from tabulate import tabulate

from ..scenario import Scenario

from ..io import atomic_write

__all__ = [
    "ContinualPanopticEvaluator",
    "split_metrics",
    "per_class_in_order",
    "split_bounds",
]

logger = logging.getLogger(__name__)

SPLITS = ("base", "old", "new", "novel")


def split_bounds(base: int, inc: int, step: int, offset: int = 1) -> Dict[str, int]:
    """List indices of the official split (docs/official_behaviours.md#base-novel-split), for a per-class list whose first
    ``offset`` entries precede the first class.

    Returns ``base_end`` (= ``offset + base``), ``old_end`` (``base_end + (step-1)·inc`` at
    step > 0, else ``base_end``) and the denominators ``old_den``, ``new_den``, ``novel_den``.
    ``new_den`` at step 0 is ``offset + base`` (the official code divides by its
    ``base_classes = 1 + C0`` there); it only matters when entries after the base classes are
    non-zero, which cannot happen with a model that only knows the base classes.
    """
    if base < 1:
        raise ValueError(f"base must be >= 1, got {base}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step > 0 and inc < 1:
        raise ValueError(f"inc must be >= 1 at step {step}, got {inc}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    base_end = offset + base
    old_end = base_end + (step - 1) * inc if step > 0 else base_end
    return {
        "base_end": base_end,
        "old_end": old_end,
        "old_den": old_end - offset,
        "new_den": inc if step > 0 else offset + base,
        "novel_den": inc * step,
    }


def split_metrics(
    per_class_values: Sequence[float], base: int, inc: int, step: int, offset: int = 1
) -> Dict[str, float]:
    """Base / old / new / novel averages of a per-class list, exactly as the official evaluators.

    Args:
        per_class_values: one value per class; the first ``offset`` entries are not classes
            (void / background), then the classes in list order. The list may run past the
            ``C0 + step·Cinc`` classes seen so far (unseen classes), those entries are included
            in the new / novel **sums** (they are 0 for classes the model cannot predict).
        base, inc, step: ``C0``, ``Cinc`` and ``T``.
        offset: number of leading non-class entries (1 in the official code, always).

    Returns ``{"base", "old", "new", "novel"}`` (same scale as the input):

    * base  = mean of ``v[offset : offset+C0]``
    * old   = mean of ``v[offset : old_end]`` with ``old_end = offset + C0 + (T-1)·Cinc``
      (at T = 0, ``old_end = offset + C0`` so old = base)
    * new   = Σ ``v[old_end:]`` / Cinc   (at T = 0: / (offset + C0))
    * novel = Σ ``v[offset+C0:]`` / (Cinc·T)   (0 at T = 0)

    NaN entries propagate (plain sums, as the official ``np.sum``).
    """
    b = split_bounds(base, inc, step, offset)
    v = np.asarray(per_class_values, dtype=np.float64)
    return {
        "base": float(np.sum(v[offset : b["base_end"]]) / base),
        "old": float(np.sum(v[offset : b["old_end"]]) / b["old_den"]),
        "new": float(np.sum(v[b["old_end"] :]) / b["new_den"]),
        "novel": float(np.sum(v[b["base_end"] :]) / b["novel_den"]) if step > 0 else 0.0,
    }


def _contiguous_to_dataset_ids(metadata) -> Dict[int, int]:
    """Contiguous id -> dataset category id; thing entries win where both maps list an id."""
    out = {}
    for dataset_id, contiguous in getattr(metadata, "stuff_dataset_id_to_contiguous_id", {}).items():
        out[int(contiguous)] = int(dataset_id)
    for dataset_id, contiguous in getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).items():
        out[int(contiguous)] = int(dataset_id)
    return out


def per_class_in_order(
    per_class: Mapping[int, float],
    order: Sequence[int],
    contiguous_to_dataset_id: Mapping[int, int],
    missing_value: float = 0.0,
) -> List[float]:
    """Rearrange per-category values into class-order positions (the corrected split).

    Args:
        per_class: dataset category id -> value (e.g. panopticapi's ``per_class`` PQ).
        order: ``CONT.ORDER``, dataset contiguous ids; position ``k`` (0-based) is order
            position ``k+1``.
        contiguous_to_dataset_id: contiguous id -> dataset category id.
        missing_value: used for order entries without a category in ``per_class`` (e.g. COCO's
            order entry 133, which names no class).

    Returns ``[missing_value] + [value of ORDER[0], value of ORDER[1], ...]``: entry 0 stands for
    the background so the list can be passed to :func:`split_metrics` with ``offset=1``.
    """
    out = [float(missing_value)]
    for c in order:
        dataset_id = contiguous_to_dataset_id.get(int(c))
        out.append(float(per_class.get(dataset_id, missing_value)) if dataset_id is not None else float(missing_value))
    return out


class ContinualPanopticEvaluator(DatasetEvaluator):
    """PQ / SQ / RQ of a continual panoptic model, overall, things / stuff and per split.

    Must be called on every process (it gathers predictions). Results (only on the main process)::

        {"panoptic_seg": {
            "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st",
            "PQ_base", "SQ_base", "RQ_base", "PQ_old", ..., "PQ_new", ..., "PQ_novel", ...,
            "TP_base", "FP_base", "FN_base", "TP_novel", "FP_novel", "FN_novel", "TP", "FP", "FN",
            "PQ-<category id>", "SQ-<category id>", "RQ-<category id>",  # every GT category
        }}

    ``TP/FP/FN_base`` and ``_novel`` are the official keys, split like ``PQ_base`` /
    ``PQ_novel``; they (and ``TP/FP/FN`` of all categories) are the segment counts of the
    panopticapi matching (the official evaluator reads per-class counts that panopticapi does not
    return, so it always reports 0).

    All values are floats, in percent except the segment counts. The per-class values are flat keys (with ``-`` so that
    detectron2's ``print_csv_format`` skips them and ``EvalHook`` receives scalars); the same
    values as lists in GT-json category order are in :attr:`per_class` after ``evaluate``.

    Args:
        dataset_name: a registered dataset whose metadata has ``panoptic_json``,
            ``panoptic_root``, ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id``.
        order: ``CONT.ORDER`` (contiguous ids). ``None`` means the identity ``1..C``.
        base_classes, inc_classes, step: ``C0``, ``Cinc``, ``T``.
        output_dir: where ``predictions.json`` is written (pass ``<OUTPUT_DIR>/inference``, as
            detectron2 evaluators expect); nothing is kept when ``None``.
        split_by_order: ``False`` (default) reproduces the official split by dataset index;
            ``True`` splits by ``order`` (correct for non-identity orders).
    """

    def __init__(
        self,
        dataset_name: str,
        order: Optional[Sequence[int]],
        base_classes: int,
        inc_classes: int,
        step: int,
        output_dir: Optional[str] = None,
        *,
        split_by_order: bool = False,
    ):
        split_bounds(base_classes, inc_classes, step)  # validates
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._base = int(base_classes)
        self._inc = int(inc_classes)
        self._step = int(step)
        self._num_seen = self._base + self._step * self._inc
        self._order = [int(c) for c in order] if order is not None else list(range(1, self._num_seen + 1))
        if len(self._order) < self._num_seen:
            raise ValueError(
                f"order has {len(self._order)} entries but step {step} has seen {self._num_seen} classes"
            )
        self._split_by_order = bool(split_by_order)
        self._output_dir = output_dir
        self._thing_contiguous = {
            int(v) for v in self._metadata.thing_dataset_id_to_contiguous_id.values()
        }
        self._thing_to_dataset = {
            int(v): int(k) for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()
        }
        self._stuff_to_dataset = {
            int(v): int(k) for k, v in self._metadata.stuff_dataset_id_to_contiguous_id.items()
        }
        self.per_class: Optional[Dict[str, list]] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None, **kwargs):
        """Build from ``cfg.CONT`` (ORDER, BASE_CLS, INC_CLS, TASK). The order is expressed in the
        dataset's contiguous ids (they differ from the class ids only for COCO with
        ``CONT.COCO_CORRECT_IDS``)."""
        scenario = Scenario.from_config(cfg, dataset_name)
        return cls(
            dataset_name,
            [c - scenario.id_offset for c in scenario.order],
            cfg.CONT.BASE_CLS,
            cfg.CONT.INC_CLS,
            cfg.CONT.TASK,
            output_dir=output_dir,
            **kwargs,
        )

    def reset(self):
        self._predictions = []

    # -- id conversion ------------------------------------------------------------------------
    def order_position_to_dataset(self, position: int):
        """Order position (1-based) -> ``(dataset category id, isthing)``."""
        position = int(position)
        if not 1 <= position <= len(self._order):
            raise ValueError(f"order position {position} outside 1..{len(self._order)}")
        contiguous = self._order[position - 1]
        isthing = contiguous in self._thing_contiguous
        table = self._thing_to_dataset if isthing else self._stuff_to_dataset
        if contiguous not in table:
            # the official code fails here too (COCO order entry 133, docs/official_behaviours.md#coco-ids)
            raise KeyError(
                f"order position {position} is class {contiguous}, which has no "
                f"{'thing' if isthing else 'stuff'} category in the metadata of {self._dataset_name}"
            )
        return table[contiguous], isthing

    def _convert_segments(self, segments_info):
        out = []
        for seg in segments_info:
            dataset_id, isthing = self.order_position_to_dataset(seg["category_id"])
            out.append({"id": int(seg["id"]), "category_id": int(dataset_id), "isthing": bool(isthing)})
        return out

    def _segments_from_label_map(self, panoptic_img):
        """Segments of a ``category·label_divisor + instance`` map (-1 = void); returns the
        segments and the map shifted by +1 so that 0 is void, as panopticapi expects."""
        divisor = getattr(self._metadata, "label_divisor", 1000)
        segments = []
        for label in np.unique(panoptic_img):
            if label == -1:
                continue
            dataset_id, isthing = self.order_position_to_dataset(int(label) // divisor)
            segments.append({"id": int(label) + 1, "category_id": int(dataset_id), "isthing": bool(isthing)})
        return segments, panoptic_img + 1

    # -- DatasetEvaluator -----------------------------------------------------------------------
    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            panoptic_img, segments_info = out["panoptic_seg"]
            if hasattr(panoptic_img, "cpu"):
                panoptic_img = panoptic_img.cpu().numpy()
            panoptic_img = np.asarray(panoptic_img)
            if segments_info is None:
                segments, panoptic_img = self._segments_from_label_map(panoptic_img)
            else:
                segments = self._convert_segments(segments_info)
            if "file_name" in inp:
                stem = os.path.splitext(os.path.basename(inp["file_name"]))[0]
            else:
                stem = str(inp["image_id"])
            with io.BytesIO() as buf:
                Image.fromarray(id2rgb(panoptic_img.astype(np.int64))).save(buf, format="PNG")
                png = buf.getvalue()
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "file_name": stem + ".png",
                    "png_string": png,
                    "segments_info": segments,
                }
            )

    def evaluate(self):
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
        if not comm.is_main_process():
            return None

        gt_json = PathManager.get_local_path(self._metadata.panoptic_json)
        gt_folder = PathManager.get_local_path(self._metadata.panoptic_root)
        with open(gt_json, "r") as f:
            pred_json = json.load(f)
        pred_json["annotations"] = [
            {k: v for k, v in p.items() if k != "png_string"} for p in predictions
        ]

        with tempfile.TemporaryDirectory(prefix="panoptic_eval") as pred_dir:
            for p in predictions:
                with open(os.path.join(pred_dir, p["file_name"]), "wb") as f:
                    f.write(p["png_string"])
            pred_json_file = os.path.join(pred_dir, "predictions.json")
            with open(pred_json_file, "w") as f:
                json.dump(pred_json, f)
            if self._output_dir:
                with atomic_write(os.path.join(self._output_dir, "predictions.json")) as f:
                    json.dump(pred_json, f)
            with contextlib.redirect_stdout(io.StringIO()):
                pq_res = pq_compute_with_counts(gt_json, pred_json_file, gt_folder, pred_dir)

        res = self.results_from_pq(pq_res)
        _log_table(pq_res)
        return OrderedDict({"panoptic_seg": res})

    def results_from_pq(self, pq_res) -> "OrderedDict[str, float]":
        """The result dict of :meth:`evaluate` from a ``pq_compute`` result (also sets
        :attr:`per_class`)."""
        res = OrderedDict()
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for metric in ("PQ", "SQ", "RQ"):
                res[metric + suffix] = 100.0 * float(pq_res[group][metric.lower()])

        per_class = pq_res["per_class"]  # GT-json category order (dict insertion order)
        category_ids = [int(c) for c in per_class.keys()]
        lists = {m: [float(per_class[c][m.lower()]) for c in per_class] for m in ("PQ", "SQ", "RQ")}
        if self._split_by_order:
            c2d = _contiguous_to_dataset_ids(self._metadata)
            split_input = {
                m: per_class_in_order(
                    {c: per_class[c][m.lower()] for c in per_class}, self._order, c2d
                )
                for m in lists
            }
        else:
            split_input = lists
        for metric in ("PQ", "SQ", "RQ"):
            s = split_metrics(split_input[metric], self._base, self._inc, self._step, offset=1)
            for name in SPLITS:
                res[f"{metric}_{name}"] = 100.0 * s[name]
        counts = {m: [int(per_class[c].get(m.lower(), 0)) for c in per_class] for m in ("TP", "FP", "FN")}
        if self._split_by_order:
            c2d = _contiguous_to_dataset_ids(self._metadata)
            counts = {m: per_class_in_order(dict(zip(per_class, v)), self._order, c2d) for m, v in counts.items()}
        first_novel = 1 + self._base
        for m, values in counts.items():
            res[f"{m}_base"] = float(np.sum(values[1:first_novel]))
            res[f"{m}_novel"] = float(np.sum(values[first_novel:])) if self._step > 0 else 0.0
            if m.lower() in pq_res["All"]:
                res[m] = float(pq_res["All"][m.lower()])
        for cid, pq, sq, rq in zip(category_ids, lists["PQ"], lists["SQ"], lists["RQ"]):
            res[f"PQ-{cid}"] = 100.0 * pq
            res[f"SQ-{cid}"] = 100.0 * sq
            res[f"RQ-{cid}"] = 100.0 * rq
        self.per_class = {
            "category_id": category_ids,
            "PQ": [100.0 * v for v in lists["PQ"]],
            "SQ": [100.0 * v for v in lists["SQ"]],
            "RQ": [100.0 * v for v in lists["RQ"]],
        }
        return res


def pq_compute_with_counts(gt_json_file: str, pred_json_file: str, gt_folder: str, pred_folder: str) -> Dict:
    """panopticapi's ``pq_compute`` (the same matching and the same numbers), whose per-class
    entries and ``"All"`` entry also carry the segment counts ``tp``, ``fp`` and ``fn``."""
    from panopticapi.evaluation import pq_compute_multi_core

    with open(gt_json_file, "r") as f:
        gt = json.load(f)
    with open(pred_json_file, "r") as f:
        pred = json.load(f)
    categories = {c["id"]: c for c in gt["categories"]}
    pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
    missing = [a["image_id"] for a in gt["annotations"] if a["image_id"] not in pred_by_image]
    if missing:
        raise ValueError(f"no panoptic prediction for {len(missing)} image(s), e.g. {missing[:3]}")
    matched = [(a, pred_by_image[a["image_id"]]) for a in gt["annotations"]]
    stat = pq_compute_multi_core(matched, gt_folder, pred_folder, categories)
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stat.pq_average(categories, isthing=isthing)
        if name == "All":
            for cid, entry in per_class.items():
                cat = stat.pq_per_cat[cid]
                entry.update(tp=cat.tp, fp=cat.fp, fn=cat.fn)
            results["per_class"] = per_class
            results["All"].update(
                tp=sum(stat.pq_per_cat[c].tp for c in per_class),
                fp=sum(stat.pq_per_cat[c].fp for c in per_class),
                fn=sum(stat.pq_per_cat[c].fn for c in per_class),
            )
    return results


def _log_table(pq_res):
    rows = [
        [name] + [100 * pq_res[name][k] for k in ("pq", "sq", "rq")] + [pq_res[name]["n"]]
        for name in ("All", "Things", "Stuff")
    ]
    table = tabulate(rows, headers=["", "PQ", "SQ", "RQ", "#categories"], tablefmt="pipe", floatfmt=".3f")
    logger.info("Panoptic evaluation:\n" + table)
