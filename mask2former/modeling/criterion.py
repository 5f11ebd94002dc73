"""
Set-prediction training criterion for ECLIPSE / Mask2Former.

Per prediction (the final output and every auxiliary output) the criterion matches
predictions to targets with a :class:`HungarianMatcher` and computes

* ``loss_ce``: the classification loss, either the ECLIPSE sigmoid focal loss over all
  K+1 columns (``class_loss="focal"``) or the Mask2Former softmax cross-entropy with a
  down-weighted no-object class (``class_loss="ce"``);
* ``loss_mask`` / ``loss_dice``: point-sampled sigmoid BCE and dice losses of the matched
  masks, using PointRend importance sampling.

``forward`` returns the UNWEIGHTED losses; use :func:`weight_losses` / :func:`weighted_total`
(or the meta-architecture) to apply ``weight_dict``.

Two hooks let other losses reuse the matching and the mask losses without copying them (the
distillation baselines of ``continual.distillation`` use both): ``class_loss`` may be a callable
that replaces the classification loss, and ``forward(..., extra_losses=fn)`` adds the terms
``fn(m, prediction)`` returns for prediction ``m`` (0 = final, ``i + 1`` = ``aux_outputs[i]``),
with the same ``_i`` suffix as the other losses.
"""
import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm

__all__ = [
    "SetCriterion",
    "fixed_num_masks",
    "sigmoid_focal_class_loss",
    "point_sigmoid_ce_loss",
    "point_dice_loss",
    "mask_uncertainty",
    "weight_losses",
    "weighted_total",
]

# A matching is a list over images of (pred_idx int64 [k], tgt_idx int64 [k]).
Matching = List[Tuple[torch.Tensor, torch.Tensor]]
# A custom classification loss: (logits float [B, Q, K+1], target classes int64 [B, Q]) -> scalar.
ClassLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigmoid_focal_class_loss(
    logits: torch.Tensor, target_classes: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """
    ECLIPSE's sigmoid focal classification loss.

    Every one of the K+1 columns (no-object included) is an independent binary output:
    ``50 * mean_{b,q,c} alpha * BCEWithLogits(l, y) * (1 - p_t)^gamma`` with ``y`` the
    one-hot of the target class and ``p_t`` the probability assigned to the true binary
    label. The constant 50 and the plain mean (no division by the number of masks) are
    what the official implementation uses.

    Args:
        logits: float [B, Q, K+1].
        target_classes: int64 [B, Q] with values in [0, K] (K = no-object).
        alpha, gamma: focal weighting parameters.

    Returns:
        scalar tensor.
    """
    onehot = F.one_hot(target_classes, logits.shape[-1]).to(logits.dtype)
    probs = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_true = probs * onehot + (1.0 - probs) * (1.0 - onehot)
    focal = alpha * bce * (1.0 - p_true) ** gamma
    return focal.mean() * 50.0


def point_sigmoid_ce_loss(
    point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float
) -> torch.Tensor:
    """
    Args:
        point_logits: float [N, P] logits of N matched masks at P points.
        point_labels: float [N, P] target values at the same points.
        num_masks: normaliser (number of targets in the batch, averaged over processes).

    Returns:
        scalar: sum over masks of the mean-over-points BCE, divided by ``num_masks``.
    """
    bce = F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none")
    return bce.mean(1).sum() / num_masks


def point_dice_loss(
    point_logits: torch.Tensor, point_labels: torch.Tensor, num_masks: float
) -> torch.Tensor:
    """
    Args:
        point_logits: float [N, P].
        point_labels: float [N, P].
        num_masks: normaliser.

    Returns:
        scalar: sum over masks of ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``
        (``p = sigmoid(logits)``), divided by ``num_masks``.
    """
    probs = point_logits.sigmoid()
    intersection = 2.0 * (probs * point_labels).sum(-1)
    total = probs.sum(-1) + point_labels.sum(-1)
    dice = 1.0 - (intersection + 1.0) / (total + 1.0)
    return dice.sum() / num_masks


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """
    PointRend uncertainty of class-agnostic mask logits: points whose logit is close to
    the 0 decision boundary are the most uncertain.

    Args:
        logits: [N, 1, P].

    Returns:
        [N, 1, P], ``-|logits|``.
    """
    return -logits.abs()


def weight_losses(
    loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]
) -> Dict[str, torch.Tensor]:
    """
    Multiply each loss by its weight. Losses without an entry in ``weight_dict`` are
    dropped, as in Mask2Former's meta-architecture (so an unconfigured loss never
    silently enters the total).

    Returns:
        a new dict ``{k: loss_dict[k] * weight_dict[k]}`` in ``loss_dict`` order.
    """
    return {k: v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict}


def weighted_total(
    loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]
) -> torch.Tensor:
    """Sum of :func:`weight_losses` (the scalar that is back-propagated)."""
    weighted = weight_losses(loss_dict, weight_dict)
    if not weighted:
        raise ValueError("no loss of loss_dict has a weight in weight_dict")
    return sum(weighted.values())


# (value, expected local count) while fixed_num_masks is active, else None
_FIXED_NUM_MASKS: Optional[Tuple[float, int]] = None


@contextlib.contextmanager
def fixed_num_masks(value: float, local_count: int):
    """Within the block, :meth:`SetCriterion.get_num_masks` of every criterion of this process
    returns ``value`` without communicating.

    Used by gradient accumulation (:mod:`continual.accumulation`): the normaliser of every
    micro-batch is the number of masks of the whole optimizer step (all micro-batches, all
    processes) divided by the number of micro-batches times processes, computed before the first
    forward. ``local_count`` is the number of targets the caller counted in the micro-batch; a
    different count in the criterion (targets changed inside the model, e.g. pseudo-labels)
    raises instead of silently using a wrong normaliser.
    """
    global _FIXED_NUM_MASKS
    previous = _FIXED_NUM_MASKS
    _FIXED_NUM_MASKS = (float(value), int(local_count))
    try:
        yield
    finally:
        _FIXED_NUM_MASKS = previous


class SetCriterion(nn.Module):
    """
    Loss of a set of mask-classification predictions.

    The matching is computed separately for the final prediction and for every entry of
    ``outputs["aux_outputs"]``; the losses of ``aux_outputs[i]`` get the suffix ``_i``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        class_loss: Union[str, ClassLoss] = "focal",
        focal_alpha: float = 5.0,
        focal_gamma: float = 1.0,
    ):
        """
        Args:
            num_classes: number of classes K, without no-object. Column K of the class
                logits is no-object; unmatched predictions are trained towards it.
            matcher: a :class:`HungarianMatcher` (called as ``matcher(outputs, targets,
                point_coords=None)``).
            weight_dict: loss name -> weight. Stored for the caller; ``forward`` does not
                apply it.
            eos_coef: no-object class weight of the "ce" class loss (unused by "focal").
            losses: subset of ``("labels", "masks")``.
            num_points: points per mask for the mask losses.
            oversample_ratio, importance_sample_ratio: PointRend importance sampling.
            class_loss: "focal" (ECLIPSE sigmoid focal, FOCAL=True), "ce" (softmax
                cross-entropy), or a callable ``(logits [B, Q, K+1], target_classes [B, Q])
                -> scalar`` (unmatched queries have target K).
            focal_alpha, focal_gamma: parameters of the focal loss.
        """
        super().__init__()
        if not callable(class_loss) and class_loss not in ("focal", "ce"):
            raise ValueError(f"class_loss must be 'focal', 'ce' or a callable, got {class_loss!r}")
        unknown = set(losses) - {"labels", "masks"}
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = list(losses)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.class_loss = class_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # not persistent: official ECLIPSE checkpoints have no criterion entries
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _src_index(indices: Matching) -> Tuple[torch.Tensor, torch.Tensor]:
        """(batch_idx, query_idx) of the matched predictions, image by image."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _matched_target_masks(
        targets: List[Dict[str, torch.Tensor]], indices: Matching, device
    ) -> torch.Tensor:
        """
        Target masks of the matched pairs, concatenated image by image, as float
        [N_matched, H_max, W_max], zero-padded at the bottom/right to the largest mask
        size of the batch. Point coordinates are normalised w.r.t. this common padded
        extent, so masks of different size must be padded here, not rescaled.
        """
        h = max(t["masks"].shape[-2] for t in targets)
        w = max(t["masks"].shape[-1] for t in targets)
        selected = []
        for t, (_, tgt) in zip(targets, indices):
            m = t["masks"][tgt.to(t["masks"].device)].to(device=device, dtype=torch.float32)
            pad_h, pad_w = h - m.shape[-2], w - m.shape[-1]
            if pad_h or pad_w:
                m = F.pad(m, (0, pad_w, 0, pad_h))
            selected.append(m)
        return torch.cat(selected)

    def get_num_masks(self, targets: List[Dict[str, torch.Tensor]], device) -> float:
        """
        Loss normaliser: number of targets in the batch, averaged over all processes
        (so every process normalises by the same value), at least 1. Inside
        :func:`fixed_num_masks`, the value given there.
        """
        local = sum(len(t["labels"]) for t in targets)
        fixed = _FIXED_NUM_MASKS
        if fixed is not None:
            value, expected = fixed
            if local != expected:
                raise RuntimeError(
                    f"gradient accumulation counted {expected} target masks in this micro-batch "
                    f"before the forward pass, but the criterion received {local}: the model "
                    "changes its targets (e.g. pseudo-labels), so the loss normaliser of the "
                    "optimizer step cannot be known in advance. Train with "
                    "SOLVER.ACCUMULATE_STEPS 1 (more processes or a larger per-device batch)."
                )
            return value
        num_masks = torch.as_tensor([float(local)], dtype=torch.float, device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            dist.all_reduce(num_masks)
        return torch.clamp(num_masks / world_size, min=1).item()

    # ------------------------------------------------------------------ losses
    def loss_labels(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        indices: Matching,
        num_masks: float,
    ) -> Dict[str, torch.Tensor]:
        """
        Classification loss over all queries; unmatched queries target no-object (K).

        Args:
            outputs: needs "pred_logits" [B, Q, K+1].

        Returns:
            {"loss_ce": scalar}. Not normalised by ``num_masks`` (mean over queries).
        """
        logits = outputs["pred_logits"].float()
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        matched_labels = torch.cat(
            [t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)]
        ).to(logits.device)
        target_classes[self._src_index(indices)] = matched_labels

        if callable(self.class_loss):
            loss = self.class_loss(logits, target_classes)
        elif self.class_loss == "focal":
            loss = sigmoid_focal_class_loss(
                logits, target_classes, self.focal_alpha, self.focal_gamma
            )
        else:
            loss = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss}

    def loss_masks(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        indices: Matching,
        num_masks: float,
        point_coords: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Point-sampled BCE and dice losses of the matched masks.

        Args:
            outputs: needs "pred_masks" [B, Q, H, W] (logits at 1/4 resolution).
            targets: "masks" [n_b, H', W'] per image (any resolution, e.g. the padded
                image size).
            point_coords: optional float [N_matched, P, 2] normalised (x, y) points replacing
                the importance-sampled ones; row j belongs to the j-th matched pair with
                pairs concatenated image by image in ``indices`` order. For tests only.

        Returns:
            {"loss_mask": scalar, "loss_dice": scalar}.
        """
        pred_masks = outputs["pred_masks"]
        # fp32 even under AMP: BCE/dice on saturated half-precision logits are inaccurate,
        # and the reference points are float32.
        src_masks = pred_masks[self._src_index(indices)][:, None].float()  # [N, 1, H, W]

        if src_masks.shape[0] == 0:
            # Nothing matched anywhere in the batch: zero losses that stay attached to the
            # graph, so every process back-propagates through the same parameters.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}

        tgt_masks = self._matched_target_masks(targets, indices, src_masks.device)[:, None]

        with torch.no_grad():
            if point_coords is None:
                point_coords = get_uncertain_point_coords_with_randomness(
                    src_masks,
                    mask_uncertainty,
                    self.num_points,
                    self.oversample_ratio,
                    self.importance_sample_ratio,
                )
            else:
                if point_coords.shape[0] != src_masks.shape[0]:
                    raise ValueError(
                        f"point_coords has {point_coords.shape[0]} rows for "
                        f"{src_masks.shape[0]} matched masks"
                    )
                point_coords = point_coords.to(device=src_masks.device, dtype=torch.float32)
            point_labels = point_sample(tgt_masks, point_coords, align_corners=False).squeeze(1)

        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)

        return {
            "loss_mask": point_sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": point_dice_loss(point_logits, point_labels, num_masks),
        }

    def loss_for_prediction(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        indices: Matching,
        num_masks: float,
        point_coords: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        All configured losses of one prediction for a given matching (no key suffix).

        Args:
            outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W]}.
            indices: matching, list over images of (pred_idx, tgt_idx).
            num_masks: normaliser from :meth:`get_num_masks`.
            point_coords: optional [N_matched, P, 2] override for the mask losses.
        """
        losses: Dict[str, torch.Tensor] = {}
        for name in self.losses:
            if name == "labels":
                losses.update(self.loss_labels(outputs, targets, indices, num_masks))
            else:
                losses.update(
                    self.loss_masks(outputs, targets, indices, num_masks, point_coords)
                )
        return losses

    def forward(
        self,
        outputs: Dict[str, object],
        targets: List[Dict[str, torch.Tensor]],
        indices: Optional[Sequence[Optional[Matching]]] = None,
        point_coords: Optional[Sequence[Optional[torch.Tensor]]] = None,
        matcher_point_coords: Optional[Sequence[Optional[Sequence[torch.Tensor]]]] = None,
        extra_losses: Optional[Callable[[int, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H, W],
                optionally "aux_outputs": list of dicts with the same two keys}.
            targets: list of B dicts {"labels": int64 [n_b] (0-based),
                "masks": bool/float [n_b, H', W']}.

            The remaining arguments are overrides for reproducing a reference run (tests);
            each is a sequence over predictions, entry 0 for the final output and entry
            i+1 for ``aux_outputs[i]``; a None entry means "compute normally":

            indices: matching to use instead of calling the matcher.
            point_coords: [N_matched, P, 2] points for the mask losses instead of importance
                sampling.
            matcher_point_coords: per-image [P, 2] points passed to the matcher.

            extra_losses: optional ``fn(m, prediction) -> {name: scalar}`` called for every
                prediction (``m`` as above); its losses are added after the prediction's own
                ones, with the same suffix (e.g. the distillation terms).

        Returns:
            unweighted losses: "loss_ce", "loss_mask", "loss_dice" for the final output and
            "loss_ce_i", "loss_mask_i", "loss_dice_i" for ``aux_outputs[i]``.
        """
        predictions = [{k: v for k, v in outputs.items() if k != "aux_outputs"}]
        predictions += list(outputs.get("aux_outputs", []))

        def override(seq, m):
            return None if seq is None or m >= len(seq) else seq[m]

        device = outputs["pred_logits"].device
        num_masks = self.get_num_masks(targets, device)

        losses: Dict[str, torch.Tensor] = {}
        for m, prediction in enumerate(predictions):
            matching = override(indices, m)
            if matching is None:
                matching = self.matcher(
                    prediction, targets, point_coords=override(matcher_point_coords, m)
                )
            suffix = "" if m == 0 else f"_{m - 1}"
            l_dict = self.loss_for_prediction(
                prediction, targets, matching, num_masks, override(point_coords, m)
            )
            if extra_losses is not None:
                l_dict.update(extra_losses(m, prediction))
            losses.update({k + suffix: v for k, v in l_dict.items()})
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, "
            f"class_loss={self.class_loss!r}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}, eos_coef={self.eos_coef}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )
