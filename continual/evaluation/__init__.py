"""Continual evaluation: PQ (panopticapi) and mIoU split into base / old / new / novel, and the
result files (docs/design.md#evaluation).

May import: detectron2, panopticapi, ``continual.scenario`` (order positions -> dataset ids); not
the trainer."""
from . import results
from .panoptic import ContinualPanopticEvaluator, per_class_in_order, split_bounds, split_metrics
from .results import *  # noqa: F401,F403  (the result-file writers; their list is results.__all__)
from .semantic import ContinualSemSegEvaluator, confusion_matrix, semantic_metrics

__all__ = [
    "ContinualPanopticEvaluator",
    "ContinualSemSegEvaluator",
    "split_metrics",
    "split_bounds",
    "per_class_in_order",
    "confusion_matrix",
    "semantic_metrics",
] + results.__all__
