"""Logit manipulation (ECLIPSE section 4.2): recalibrating each query group's no-object logit.

At inference the base queries and every step's prompt queries run together. Each group was
trained only on its own classes, so its no-object logit is recalibrated and the columns of the
other groups' classes are switched off. For a query of group ``g`` with logits ``z`` (no-object
column ``C`` last), ``O_g`` the class columns of all other groups and ``delta_g`` its delta:

* ``delta_g > 0`` (aggregation): ``z_C = logit(delta_g * clamp(sum_{c in O_g} sigmoid(z_c), 0, 1))``
* ``delta_g < 0`` (calibration): ``z_C = logit(|delta_g| * sigmoid(z_C))``
* ``delta_g = 0``: ``z_C`` unchanged;

and in every case ``z_c = -10`` for ``c in O_g``. ``logit`` clamps its argument to
[0.001, 0.999] first.
"""
import numbers
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["parse_logit_deltas", "clamped_logit", "manipulate_logits", "DEACTIVATED_LOGIT"]

#: value written into the class columns of the other groups (sigmoid(-10) ~ 4.5e-5)
DEACTIVATED_LOGIT = -10.0


def parse_logit_deltas(value, num_groups: int) -> List[float]:
    """Turn ``CONT.LOGIT_MANI_DELTAS`` into one delta per query group.

    ``None`` -> all 0; a number -> the same delta for every group; a list/tuple -> truncated
    to ``num_groups`` entries, or padded with its last value.

    Raises:
        ValueError: for an empty list, a string or any other type, naming the key and the
            accepted forms.
    """
    key = "CONT.LOGIT_MANI_DELTAS"
    if value is None:
        return [0.0] * num_groups
    if isinstance(value, bool):
        raise ValueError(f"{key} must be None, a number or a list of numbers, got {value!r}")
    if isinstance(value, numbers.Real):
        return [float(value)] * num_groups
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{key} is an empty list; give None, a number or a non-empty list")
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            raise ValueError(f"{key} must hold only numbers, got {list(value)!r}")
        deltas = [float(v) for v in value[:num_groups]]
        return deltas + [deltas[-1]] * (num_groups - len(deltas))
    raise ValueError(
        f"{key} must be None, a number or a list of numbers, got {value!r} "
        f"({type(value).__name__}); e.g. CONT.LOGIT_MANI_DELTAS '[0.4,0.6]'"
    )


def clamped_logit(p: Tensor) -> Tensor:
    """``log(p / (1 - p))`` of ``p`` clamped to [0.001, 0.999]."""
    p = p.clamp(0.001, 0.999)
    return torch.log(p / (1 - p))


def manipulate_logits(
    logits: Tensor,
    query_sizes: Sequence[int],
    class_sizes: Sequence[int],
    deltas: Sequence[float],
    no_object_logits: Optional[Sequence[Optional[Tensor]]] = None,
) -> Tensor:
    """Apply the logit manipulation to every query group; returns a new tensor.

    Args:
        logits: [B, Q, C+1] class logits, queries in group order, no-object last.
        query_sizes: number of queries of each group (sums to Q).
        class_sizes: number of classes of each group (sums to C).
        deltas: one delta per group (see :func:`parse_logit_deltas`).
        no_object_logits: optional per-group [B, Q_g] (or [B, Q_g, 1]) no-object logits that
            replace column C of that group before the manipulation (the prompt no-object
            MLPs); ``None`` entries keep the class head's value.
    Returns:
        [B, Q, C+1] manipulated logits.
    """
    num_groups = len(query_sizes)
    if not (len(class_sizes) == len(deltas) == num_groups):
        raise ValueError(
            f"got {num_groups} query groups, {len(class_sizes)} class groups and "
            f"{len(deltas)} deltas; they must match"
        )
    num_classes = sum(class_sizes)
    if logits.shape[-1] != num_classes + 1 or logits.shape[1] != sum(query_sizes):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not fit {sum(query_sizes)} queries "
            f"and {num_classes} classes + no-object"
        )
    out = logits.clone()
    q_start = c_start = 0
    for g in range(num_groups):
        q_end, c_end = q_start + query_sizes[g], c_start + class_sizes[g]
        z = out[:, q_start:q_end]  # a view: the writes below land in `out`
        if no_object_logits is not None and no_object_logits[g] is not None:
            z[..., num_classes] = no_object_logits[g].reshape(z.shape[:-1])
        delta = float(deltas[g])
        if delta > 0:
            other = torch.cat([z[..., :c_start], z[..., c_end:num_classes]], dim=-1)
            other_prob = other.sigmoid().sum(-1).clamp(0.0, 1.0)
            z[..., num_classes] = clamped_logit(other_prob * delta)
        elif delta < 0:
            z[..., num_classes] = clamped_logit(z[..., num_classes].sigmoid() * abs(delta))
        z[..., :c_start] = DEACTIVATED_LOGIT
        z[..., c_end:num_classes] = DEACTIVATED_LOGIT
        q_start, c_start = q_end, c_end
    return out
