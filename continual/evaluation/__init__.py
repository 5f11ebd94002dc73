"""Continual evaluation: PQ (panopticapi) and mIoU split into base / old / new / novel, and the
result files (docs/design.md#evaluation)."""
from .panoptic import ContinualPanopticEvaluator, per_class_in_order, split_bounds, split_metrics
from .results import (
    append_official_csv,
    append_official_per_class_csv,
    official_csv_row,
    read_metrics_json,
    write_metrics_json,
    write_official_results,
)
from .semantic import ContinualSemSegEvaluator, confusion_matrix, semantic_metrics

__all__ = [
    "ContinualPanopticEvaluator",
    "ContinualSemSegEvaluator",
    "split_metrics",
    "split_bounds",
    "per_class_in_order",
    "confusion_matrix",
    "semantic_metrics",
    "append_official_csv",
    "official_csv_row",
    "write_official_results",
    "append_official_per_class_csv",
    "write_metrics_json",
    "read_metrics_json",
]
