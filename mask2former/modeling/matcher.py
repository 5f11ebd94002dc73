"""
Hungarian matching between mask-classification predictions and ground-truth segments.

The matching cost follows ECLIPSE / Mask2Former: a softmax class cost (even when the
classification loss itself is a sigmoid focal loss, as in every official ECLIPSE run),
a pairwise sigmoid binary cross-entropy cost and a pairwise dice cost, the two mask costs
being evaluated on a set of uniformly random points shared by all masks of an image.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from detectron2.projects.point_rend.point_features import point_sample

__all__ = ["HungarianMatcher", "pairwise_sigmoid_ce_cost", "pairwise_dice_cost"]


def pairwise_sigmoid_ce_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """
    Mean-over-points binary cross-entropy (with logits) for every (prediction, target) pair.

    Args:
        logits: float [N, P], mask logits of N predictions at P points.
        labels: float [M, P], target values in [0, 1] of M targets at the same points.

    Returns:
        float [N, M]: cost[n, m] = mean_p BCEWithLogits(logits[n, p], labels[m, p]).
    """
    num_points = logits.shape[1]
    # BCE(x, y) = y * BCE(x, 1) + (1 - y) * BCE(x, 0) is linear in y, so the full pairwise
    # matrix reduces to two matrix products instead of an [N, M, P] tensor.
    loss_if_pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    loss_if_neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    cost = loss_if_pos @ labels.transpose(0, 1) + loss_if_neg @ (1.0 - labels).transpose(0, 1)
    return cost / num_points


def pairwise_dice_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """
    Smoothed dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` for every pair.

    Args:
        logits: float [N, P], mask logits (the sigmoid is applied here).
        labels: float [M, P], target values in [0, 1].

    Returns:
        float [N, M].
    """
    probs = logits.sigmoid()
    intersection = 2.0 * (probs @ labels.transpose(0, 1))
    total = probs.sum(-1)[:, None] + labels.sum(-1)[None, :]
    return 1.0 - (intersection + 1.0) / (total + 1.0)


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of predictions to targets, image by image.

    For image ``b`` with Q predictions and n targets the cost matrix [Q, n] is

        cost = cost_mask * CE + cost_class * (-softmax(logits)[:, labels]) + cost_dice * Dice

    where CE and Dice are evaluated at ``num_points`` random points (uniform in [0, 1]^2,
    ``(x, y)`` normalised, x along the width) shared by every predicted and target mask of
    the image. NaN costs become 1e4 and the matrix is clamped to [-1e4, 1e4] before being
    solved with :func:`scipy.optimize.linear_sum_assignment`.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 1.0,
        cost_dice: float = 1.0,
        num_points: int = 0,
    ):
        """
        Args:
            cost_class: weight of the softmax class-probability cost.
            cost_mask: weight of the point-sampled sigmoid cross-entropy cost.
            cost_dice: weight of the point-sampled dice cost.
            num_points: number of random points shared by all masks of an image.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def compute_cost(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        tgt_labels: torch.Tensor,
        tgt_masks: torch.Tensor,
        point_coords: torch.Tensor,
    ) -> torch.Tensor:
        """
        Cost matrix of one image (before NaN handling and clamping).

        Args:
            pred_logits: [Q, K+1] class logits (K classes + no-object).
            pred_masks: [Q, H, W] mask logits.
            tgt_labels: int64 [n] target classes in [0, K).
            tgt_masks: bool/float [n, H', W'] target masks (any resolution: points are
                normalised, so predictions and targets need not share a size).
            point_coords: float [P, 2] normalised (x, y) sampling points.

        Returns:
            float32 [Q, n].
        """
        device_type = pred_masks.device.type
        # Costs are computed in fp32 even when the forward pass runs under AMP: the
        # assignment is sensitive to small differences and half precision sigmoid/BCE
        # saturates easily.
        with torch.autocast(device_type=device_type, enabled=False):
            probs = pred_logits.float().softmax(-1)
            class_cost = -probs[:, tgt_labels]

            coords = point_coords.to(device=pred_masks.device, dtype=torch.float32)
            num_preds, num_tgts = pred_masks.shape[0], tgt_masks.shape[0]
            pred_points = point_sample(
                pred_masks.float()[:, None],
                coords[None].expand(num_preds, -1, -1),
                align_corners=False,
            ).squeeze(1)
            tgt_points = point_sample(
                tgt_masks.to(device=pred_masks.device, dtype=torch.float32)[:, None],
                coords[None].expand(num_tgts, -1, -1),
                align_corners=False,
            ).squeeze(1)

            mask_cost = pairwise_sigmoid_ce_cost(pred_points, tgt_points)
            dice_cost = pairwise_dice_cost(pred_points, tgt_points)

            return (
                self.cost_mask * mask_cost
                + self.cost_class * class_cost
                + self.cost_dice * dice_cost
            )

    @torch.no_grad()
    def forward(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: List[Dict[str, torch.Tensor]],
        point_coords: Optional[Sequence[torch.Tensor]] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: dict with "pred_logits" [B, Q, K+1] and "pred_masks" [B, Q, H, W].
                Other entries (e.g. "aux_outputs") are ignored.
            targets: list of B dicts with "labels" int64 [n_b] and "masks" [n_b, H', W'].
            point_coords: optional list of B float tensors [P, 2] that replace the random
                points of each image. Meant for reproducing a reference matching in tests;
                in training leave it None.

        Returns:
            list of B tuples ``(pred_idx, tgt_idx)``, int64 tensors of length
            ``min(Q, n_b)``; ``pred_idx`` is sorted ascending (scipy's row order).
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        batch_size = pred_logits.shape[0]
        if point_coords is not None and len(point_coords) != batch_size:
            raise ValueError(
                f"point_coords has {len(point_coords)} entries for a batch of {batch_size}"
            )

        indices = []
        for b in range(batch_size):
            if point_coords is None:
                # Drawn even for images without targets, so the random stream does not
                # depend on the annotation content.
                coords = torch.rand(self.num_points, 2, device=pred_masks.device)
            else:
                coords = point_coords[b]

            tgt_labels = targets[b]["labels"]
            if tgt_labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue

            cost = self.compute_cost(
                pred_logits[b], pred_masks[b], tgt_labels, targets[b]["masks"], coords
            )
            cost = torch.nan_to_num(cost.cpu(), nan=1e4).clamp(min=-1e4, max=1e4)
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (
                    torch.as_tensor(rows, dtype=torch.int64),
                    torch.as_tensor(cols, dtype=torch.int64),
                )
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )
