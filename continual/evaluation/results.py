"""Result files: the official CSV rows (docs/official_behaviours.md#result-files) and a JSON of every metric per step.

The official ``IncrementalTrainer.write_results`` appends one row per evaluation to
``results/{TASK_NAME}.csv`` (and ``results/{TASK_NAME}_acc.csv`` for semantic runs). Its evaluators
never emit the per-class keys it looks for, so the per-class part of every row is empty; the rows
written here reproduce those files byte for byte (up to the printing of the numbers).
"""
import json
import math
import os
from contextlib import contextmanager
from typing import Dict, List, Mapping, Sequence

import numpy as np

from ..io import atomic_write

__all__ = [
    "append_official_csv",
    "official_csv_row",
    "write_official_results",
    "append_official_per_class_csv",
    "write_metrics_json",
    "read_metrics_json",
]

_TASK_KEY = {"panoptic": "panoptic_seg", "semantic": "sem_seg", "semantic_acc": "sem_seg"}


def _inner(metrics: Mapping, kind: str) -> Mapping:
    key = _TASK_KEY[kind]
    return metrics[key] if key in metrics and isinstance(metrics[key], Mapping) else metrics


def official_csv_row(name: str, step: int, metrics: Mapping, kind: str) -> str:
    """The text of one official row, newline included (see :func:`append_official_csv`)."""
    if kind not in _TASK_KEY:
        raise ValueError(f"kind must be one of {sorted(_TASK_KEY)}, got {kind!r}")
    m = _inner(metrics, kind)
    if kind == "panoptic":
        # PQ,RQ,SQ then three empty per-class lists joined by ","
        return f"{name},{step},{m['PQ']},{m['RQ']},{m['SQ']},,,\n"
    if kind == "semantic":
        return f"{name},{step},{m['mIoU_base']},{m['mIoU_novel']},{m['mIoU']},\n"
    return f"{name},{step},{m['mACC']},{m['pACC']},-,\n"


def append_official_csv(path: str, name: str, step: int, metrics: Mapping, kind: str) -> str:
    """Append one official results row to ``path`` (its folder is created).

    Args:
        path: e.g. ``results/{TASK_NAME}.csv`` (``results/{TASK_NAME}_acc.csv`` for
            ``kind="semantic_acc"``).
        name: ``cfg.NAME``. step: ``cfg.CONT.TASK``.
        metrics: the evaluator's inner dict (``results["panoptic_seg"]`` / ``results["sem_seg"]``)
            or the whole results dict.
        kind: ``"panoptic"`` -> ``NAME,TASK,PQ,RQ,SQ,,,``;
            ``"semantic"`` -> ``NAME,TASK,mIoU_base,mIoU_novel,mIoU,``;
            ``"semantic_acc"`` -> ``NAME,TASK,mACC,pACC,-,``.

    Returns the row written.
    """
    row = official_csv_row(name, step, metrics, kind)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "a") as f:
        f.write(row)
    return row


def write_official_results(results_dir: str, task_name: str, name: str, step: int, results: Mapping) -> List[str]:
    """What the official trainer writes after a step: ``{results_dir}/{task_name}.csv`` (and
    ``{task_name}_acc.csv`` for semantic results). Returns the paths appended to."""
    written = []
    base = os.path.join(results_dir, f"{task_name}.csv")
    if "sem_seg" in results:
        append_official_csv(base, name, step, results["sem_seg"], "semantic")
        acc = os.path.join(results_dir, f"{task_name}_acc.csv")
        append_official_csv(acc, name, step, results["sem_seg"], "semantic_acc")
        written += [base, acc]
    if "panoptic_seg" in results:
        append_official_csv(base, name, step, results["panoptic_seg"], "panoptic")
        written.append(base)
    return written


def append_official_per_class_csv(
    output_dir: str, name: str, step: int, cls_iou: Sequence[float], cls_acc: Sequence[float]
) -> None:
    """The official semantic evaluator's per-class files: append ``NAME,TASK,`` and the values
    joined with ``"."`` (sic), without a newline, to ``output_dir/iou.csv`` and ``acc.csv``.

    The values are printed with ``str`` (the official evaluator passes float32 values, e.g.
    ``66.66667``). Each file is rewritten atomically with the row appended."""
    os.makedirs(output_dir, exist_ok=True)
    for fname, values in (("iou.csv", cls_iou), ("acc.csv", cls_acc)):
        path = os.path.join(output_dir, fname)
        with _locked(path):
            old = open(path).read() if os.path.exists(path) else ""
            with atomic_write(path) as f:
                f.write(old + f"{name},{step}," + ".".join(str(v) for v in values))


def _plain(value):
    """JSON-safe copy: numpy -> Python, non-finite floats -> None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # 0-d torch tensors
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def _locked(path: str):
    try:
        import fcntl  # POSIX only, hence imported where it is used
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _step_sort_key(key: str):
    """Numeric steps in numeric order; a key such as ``"3-eval"`` sorts right after ``"3"``."""
    digits = len(key) - len(key.lstrip("0123456789"))
    if digits == 0:
        return (1, 0, key)
    return (0, int(key[:digits]), key[digits:])


def read_metrics_json(path: str) -> Dict[str, dict]:
    """``{step (str): {task: {metric: value}}}`` from :func:`write_metrics_json`; ``{}`` if absent."""
    if not os.path.exists(path):
        return {}
    with open(path, "r") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object of steps")
    return data


def write_metrics_json(path: str, step: int, results: Mapping) -> Dict[str, dict]:
    """Record every metric of ``results`` (e.g. ``{"panoptic_seg": {...}}``) under ``step`` in the
    JSON file ``path``, keeping all other steps.

    Read-modify-write under a lock file, written to a temporary file in the same folder and
    moved into place with ``os.replace``, so an interrupted write never loses earlier steps.
    Within a step, tasks and metrics are merged; a metric written again replaces its old value.
    NaN / infinite values are stored as ``null``. Returns the whole content written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with _locked(path):
        data = read_metrics_json(path)
        entry = data.get(str(step), {})
        for task, metrics in _plain(dict(results)).items():
            if isinstance(metrics, dict) and isinstance(entry.get(task), dict):
                merged = dict(entry[task])
                merged.update(metrics)
                entry[task] = merged
            else:
                entry[task] = metrics
        data[str(step)] = entry
        data = dict(sorted(data.items(), key=lambda kv: _step_sort_key(kv[0])))
        with atomic_write(path) as f:
            json.dump(data, f, indent=1, allow_nan=False)
    return data
