"""Losses of the distillation baselines (CoMFormer, MiB, PLOP) selected by ``CONT.DIST.*``.

The official code base runs these baselines at a step ``t = CONT.TASK > 0`` with
``CONT.NUM_PROMPTS 0``: the whole model is fine-tuned on the new classes while a frozen copy of
the previous step's model (the *teacher*, ``model_old``) regularises it. With every ``CONT.DIST``
key at its default this is plain fine-tuning. This module holds the losses and the teacher;
the trainer calls :func:`setup_distillation` whenever a step starts or resumes.

Settings (official names and defaults, ``continual/config.py``):

=====================  ==========================================================================
``KD_WEIGHT``          > 0: distil the class logits (weight of ``loss_kd``)
``UKD``                unbiased KD (MiB): the student's new classes and no-object form the
                       teacher's no-object
``L2``                 (without UKD) squared error between softmaxes instead of KL
``KD_REW``             UKD / plain KD: weight each query by ``(1 - p_teacher(no-object))**2``
``ALPHA``              temperature: multiplies the teacher logits of UKD / plain KD
``KD_DEEP``            also distil every auxiliary prediction (``loss_kd_i``, ``loss_mask_kd_i``)
``UCE``                unbiased cross-entropy (MiB) as class loss; focal variant with ``FOCAL``
``PSEUDO``             add pseudo-labels from the teacher's predictions (CoMFormer)
``PSEUDO_THRESHOLD``   minimum teacher score (strict) of a pseudo-label query
``MASK_KD``            weight of ``loss_mask_kd``: BCE between student and teacher mask logits
``POD_WEIGHT``         PLOP's POD on backbone ``res2..res5`` + mask features; ``loss_pod`` gets
                       the weight ``POD_WEIGHT * sqrt(INC_CLS / C)``
``PSEUDO_TYPE``,       read but unused by the official code (also here)
``IOU_THRESHOLD``,
``USE_NEW``,
``CE_NEW``, ``EOS_POW``
=====================  ==========================================================================

API for the trainer (``IncrementalTrainer.resume_or_load`` does this)::

    from continual.distillation import setup_distillation

    # builds the teacher from the weights the step starts from (never the resume checkpoint)
    # and installs a DistillationStep as the model's training loss; None for fine-tuning
    setup_distillation(cfg, model, weights_the_step_starts_from)

The pieces::

    from continual.distillation import (DistillationLoss, build_teacher, needs_teacher,
                                        teacher_needs_aux, teacher_needs_features)

    if needs_teacher(cfg):            # build the frozen model of step t-1 (eval mode)
        ...
    loss_fn = DistillationLoss(cfg)   # its .criterion reuses SetCriterion / HungarianMatcher
    # per iteration, with `outputs` the student's training-mode head outputs and `outputs_old`
    # the teacher's (None when needs_teacher(cfg) is False):
    targets = loss_fn.prepare_targets(gt_instances, padded_size, outputs_old)   # + pseudo-labels
    losses = loss_fn(outputs, outputs_old, targets, features, features_old)    # weighted dict
    sum(losses.values()).backward()

``outputs`` / ``outputs_old`` use the training layout of the head: ``pred_logits [B, Q, C+1]``
(``C_old + 1`` for the teacher, last column = no-object), ``pred_masks [B, Q, H/4, W/4]``,
``aux_outputs`` (list of dicts with the same keys; the teacher's only needed when
:func:`teacher_needs_aux`), and ``features`` = the mask features ``[B, MASK_DIM, H/4, W/4]``
(only needed with POD). ``features`` / ``features_old`` are the backbone outputs (``res2`` ..
``res5``; only needed with POD, see :func:`teacher_needs_features`).

Differences from the official code: it stops with a ``KeyError`` when ``KD_DEEP`` or POD need
the teacher's auxiliary predictions or mask features (its eval-mode decoder drops them), and
with a ``TypeError`` when POD is on without KD or pseudo-labels (the teacher is then not run).
Here both work as intended: the teacher is run whenever :func:`needs_teacher` says so.
"""
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from mask2former.modeling.criterion import SetCriterion, sigmoid_focal_class_loss, weight_losses
from mask2former.modeling.matcher import HungarianMatcher

from .checkpoint import check_checkpoint_for_step, read_model_state
from .config import setup_cfg

__all__ = [
    "DistillationLoss",
    "DistillationStep",
    "Teacher",
    "build_teacher",
    "setup_distillation",
    "teacher_config",
    "uses_distillation",
    "class_counts",
    "needs_teacher",
    "teacher_needs_aux",
    "teacher_needs_features",
    "distillation_weight_dict",
    "make_targets",
    "add_pseudo_labels",
    "unbiased_log_probs",
    "unbiased_ce_loss",
    "focal_unbiased_ce_loss",
    "softmax_focal_loss",
    "unbiased_kd_loss",
    "l2_kd_loss",
    "kd_loss",
    "mask_kd_loss",
    "pod_embedding",
    "pod_loss",
    "POD_LEVELS",
    "KD_REWEIGHT_GAMMA",
]

logger = logging.getLogger(__name__)

#: backbone levels POD compares (the mask features are the last level)
POD_LEVELS = ("res2", "res3", "res4", "res5")
#: exponent of the no-object re-weighting of ``KD_REW`` (fixed in the official code)
KD_REWEIGHT_GAMMA = 2.0
#: spatial pyramid of POD: 1x1, 2x2 and 4x4 cells
POD_SCALES = (1, 2, 4)
#: mask probability above which a pixel belongs to a teacher query's own mask (pseudo-labels)
PSEUDO_MASK_THRESHOLD = 0.5
#: share of a teacher query's own mask it must win to become a pseudo-label
PSEUDO_AREA_RATIO = 0.5


# --------------------------------------------------------------------------- settings
def class_counts(cfg) -> Tuple[int, int, int, bool]:
    """``(num_classes, old_classes, new_classes, use_bg)`` of the step ``CONT.TASK``.

    ``num_classes`` C = classes learnt up to this step, ``old_classes`` = C of step t-1,
    ``new_classes`` = ``INC_CLS`` (``BASE_CLS`` at step 0). With a background class
    (``MASK_BG`` or ``PER_PIXEL`` with semantic inference) C and the old count grow by one.
    """
    c, mf = cfg.CONT, cfg.MODEL.MASK_FORMER
    use_bg = bool((mf.TEST.MASK_BG or mf.PER_PIXEL) and mf.TEST.SEMANTIC_ON)
    num = c.BASE_CLS + c.TASK * c.INC_CLS
    old = c.BASE_CLS + (c.TASK - 1) * c.INC_CLS if c.TASK > 0 else -1
    new = c.INC_CLS if c.TASK > 0 else c.BASE_CLS
    if use_bg:
        num, old = num + 1, old + 1
    return num, old, new, use_bg


def _kd_on(cfg) -> bool:
    return cfg.CONT.TASK > 0 and cfg.CONT.DIST.KD_WEIGHT > 0


def needs_teacher(cfg) -> bool:
    """Whether a step needs the frozen model of step t-1 (one extra forward pass per
    iteration): a step > 0 without prompts with class KD, pseudo-labels or POD.

    ``MASK_KD`` alone does not run the teacher in the official code (so no mask KD is computed
    then; :class:`DistillationLoss` warns).
    """
    d = cfg.CONT.DIST
    return (cfg.CONT.TASK > 0 and cfg.CONT.NUM_PROMPTS == 0
            and (_kd_on(cfg) or bool(d.PSEUDO) or d.POD_WEIGHT > 0))


def teacher_needs_aux(cfg) -> bool:
    """Whether the teacher must return ``aux_outputs`` (training layout): ``KD_DEEP`` with deep
    supervision and a KD term (class KD or mask KD) to apply to them."""
    d = cfg.CONT.DIST
    return (needs_teacher(cfg) and bool(d.KD_DEEP) and bool(cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION)
            and (_kd_on(cfg) or d.MASK_KD > 0))


def teacher_needs_features(cfg) -> bool:
    """Whether the teacher (and the student) must return the backbone features and the mask
    features (``outputs["features"]``): POD is on."""
    return needs_teacher(cfg) and cfg.CONT.DIST.POD_WEIGHT > 0


def distillation_weight_dict(cfg) -> Dict[str, float]:
    """Loss weights of a distillation step, in the official order: ``loss_ce``, ``loss_mask``,
    ``loss_dice``, ``loss_kd``, ``loss_mask_kd``, ``loss_pod``, then the same keys with ``_i``
    for i = 0 .. DEC_LAYERS - 2 when ``DEEP_SUPERVISION``. ``loss_kd`` weighs 0 at step 0."""
    mf, d = cfg.MODEL.MASK_FORMER, cfg.CONT.DIST
    num, _, new, _ = class_counts(cfg)
    weights = {
        "loss_ce": mf.CLASS_WEIGHT,
        "loss_mask": mf.MASK_WEIGHT,
        "loss_dice": mf.DICE_WEIGHT,
        "loss_kd": d.KD_WEIGHT if _kd_on(cfg) else 0.0,
        "loss_mask_kd": d.MASK_KD,
        "loss_pod": d.POD_WEIGHT * math.sqrt(new / num),
    }
    if mf.DEEP_SUPERVISION:
        final = list(weights.items())
        for i in range(mf.DEC_LAYERS - 1):
            weights.update({f"{k}_{i}": v for k, v in final})
    return weights


# --------------------------------------------------------------------------- targets
def make_targets(gt_instances, padded_size: Tuple[int, int], shift_labels: bool = True) -> List[Dict]:
    """Criterion targets from ground-truth ``Instances`` (or dicts with ``gt_classes`` and
    ``gt_masks``): ``labels`` = ``gt_classes - 1`` (unchanged when ``shift_labels`` is False, i.e.
    with a background class) and ``masks`` zero-padded at the bottom/right to ``padded_size``."""
    h_pad, w_pad = padded_size
    targets = []
    for inst in gt_instances:
        get = inst.get if isinstance(inst, dict) else (lambda k: getattr(inst, k))
        masks = get("gt_masks")
        masks = masks.tensor if hasattr(masks, "tensor") else masks
        classes = get("gt_classes")
        if masks.shape[-2] > h_pad or masks.shape[-1] > w_pad:
            raise ValueError(f"gt_masks of size {tuple(masks.shape[-2:])} exceed the padded size {tuple(padded_size)}")
        padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
        padded[:, : masks.shape[-2], : masks.shape[-1]] = masks
        labels = classes - 1 if shift_labels else classes.clone()
        targets.append({"labels": labels, "masks": padded})
    return targets


@torch.no_grad()
def add_pseudo_labels(
    targets: List[Dict],
    outputs_old: Dict,
    old_classes: int,
    threshold: float = 0.0,
    softcls: bool = True,
) -> List[int]:
    """Append the teacher's confident, uncovered segments to ``targets`` (in place).

    Per image: every teacher query gets a score and a label, the max of the softmax
    (``softcls``) or of the sigmoid over its ``old_classes + 1`` logits. Queries labelled
    no-object (``old_classes``) or scoring ``<= threshold`` are dropped. Each pixel goes to the
    kept query with the largest ``score * sigmoid(mask logit)`` (mask logits upsampled bilinearly
    to the targets' padded size); pixels of any ground-truth mask go to nobody. A kept query
    becomes a target when the pixels it won cover more than half of its own mask (probability
    >= 0.5); its mask is the intersection of both, its label its own. Pseudo-labels follow the
    ground truth, in query order.

    Args:
        targets: from :func:`make_targets`; ``masks`` bool ``[n, Hp, Wp]``.
        outputs_old: the teacher's ``pred_logits [B, Q, old_classes + 1]``, ``pred_masks``.

    Returns:
        the number of pseudo-labels added to each image.
    """
    logits, masks = outputs_old["pred_logits"], outputs_old["pred_masks"]
    if logits.shape[-1] != old_classes + 1:
        raise ValueError(f"the teacher has {logits.shape[-1]} class logits, expected old_classes + 1 = "
                         f"{old_classes + 1} (CONT.TASK - 1 heads and no-object)")
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a teacher batch of {logits.shape[0]}")
    size = tuple(targets[0]["masks"].shape[-2:])
    masks = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
    added = []
    for b, tgt in enumerate(targets):
        probs = F.softmax(logits[b].float(), dim=-1) if softcls else logits[b].float().sigmoid()
        scores, labels = probs.max(-1)
        keep = labels.ne(old_classes) & (scores > threshold)
        scores, labels, mask_probs = scores[keep], labels[keep], masks[b].sigmoid()[keep]
        chosen_labels, chosen_masks = [], []
        if len(scores):
            owner = (scores[:, None, None] * mask_probs).argmax(0)
            gt = tgt["masks"]
            if gt.shape[0]:
                owner[gt.to(owner.device).bool().any(0)] = -1
            for k in range(len(scores)):
                won = owner == k
                own = mask_probs[k] >= PSEUDO_MASK_THRESHOLD
                both = won & own
                won_area, own_area = int(won.sum()), int(own.sum())
                if won_area > 0 and own_area > 0 and bool(both.any()) and won_area / own_area > PSEUDO_AREA_RATIO:
                    chosen_labels.append(labels[k])
                    chosen_masks.append(both)
        if chosen_labels:
            tgt["labels"] = torch.cat([tgt["labels"], torch.stack(chosen_labels).to(tgt["labels"])])
            tgt["masks"] = torch.cat([tgt["masks"], torch.stack(chosen_masks).to(tgt["masks"])])
        added.append(len(chosen_labels))
    return added


# --------------------------------------------------------------------------- class losses
def unbiased_log_probs(logits: torch.Tensor, old_classes: int) -> torch.Tensor:
    """MiB's unbiased log-probabilities over the last dim of ``logits [..., C+1]``: column
    ``c < C`` gets ``logit_c - LSE(all)``; the no-object column gets ``LSE(no-object, classes
    0 .. old_classes-1) - LSE(all)`` (the old classes may be the unlabelled background)."""
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    background = torch.cat([logits[..., -1:], logits[..., :old_classes]], dim=-1)
    return torch.cat([logits[..., :-1] - norm, torch.logsumexp(background, -1, keepdim=True) - norm], dim=-1)


def _nll(log_probs: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(-1, target_classes.unsqueeze(-1)).squeeze(-1)


def unbiased_ce_loss(logits, target_classes, old_classes: int, class_weight: torch.Tensor) -> torch.Tensor:
    """``UCE``: NLL of :func:`unbiased_log_probs`, weighted mean with ``class_weight [C+1]``
    (1 per class, ``NO_OBJECT_WEIGHT`` for no-object): ``sum w_t * nll / sum w_t``."""
    w = class_weight.to(logits)[target_classes]
    return (w * _nll(unbiased_log_probs(logits, old_classes), target_classes)).sum() / w.sum()


def focal_unbiased_ce_loss(logits, target_classes, old_classes: int, alpha: float, gamma: float) -> torch.Tensor:
    """``UCE`` with ``FOCAL``: ``mean(alpha * (1 - exp(-nll))**gamma * nll)`` over queries, with
    the unweighted unbiased NLL."""
    nll = _nll(unbiased_log_probs(logits, old_classes), target_classes)
    return (alpha * (1.0 - torch.exp(-nll)) ** gamma * nll).mean()


def softmax_focal_loss(logits, target_classes, alpha: float, gamma: float) -> torch.Tensor:
    """``FOCAL`` with ``SOFTCLS True``: ``mean(alpha * (1 - exp(-ce))**gamma * ce)`` over
    queries, ``ce`` the unweighted softmax cross-entropy."""
    ce = _nll(F.log_softmax(logits, dim=-1), target_classes)
    return (alpha * (1.0 - torch.exp(-ce)) ** gamma * ce).mean()


# --------------------------------------------------------------------------- KD terms
def _reduce_kd(per_query: torch.Tensor, teacher_probs: torch.Tensor, reweight: bool) -> torch.Tensor:
    if not reweight:
        return per_query.mean()
    w = (1.0 - teacher_probs[..., -1]) ** KD_REWEIGHT_GAMMA
    return (w * per_query).sum() / w.sum()


def _old_columns(logits: torch.Tensor, n_old_cols: int) -> torch.Tensor:
    """The student's logits of the old classes and no-object (``n_old_cols`` columns)."""
    return torch.cat([logits[..., : n_old_cols - 1], logits[..., -1:]], dim=-1)


def unbiased_kd_loss(logits, logits_old, temperature: float = 1.0, reweight: bool = False) -> torch.Tensor:
    """``UKD``: KL(teacher || student) per query, where the student's old classes keep their
    probabilities and its new classes + no-object merge into the teacher's no-object.

    Args:
        logits: student ``[B, Q, C+1]``; logits_old: teacher ``[B, Q, C_old+1]`` (multiplied by
            ``temperature``); reweight: ``KD_REW`` (see :func:`kd_loss`).
    """
    n = logits_old.shape[-1]
    teacher = logits_old * temperature
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    student = torch.cat([logits[..., : n - 1] - norm,
                         torch.logsumexp(logits[..., n - 1:], dim=-1, keepdim=True) - norm], dim=-1)
    p = F.softmax(teacher, dim=-1)
    per_query = (p * (F.log_softmax(teacher, dim=-1) - student)).sum(-1)
    return _reduce_kd(per_query, p, reweight)


def kd_loss(logits, logits_old, temperature: float = 1.0, reweight: bool = False) -> torch.Tensor:
    """Plain KD: KL(softmax(T * teacher) || log-softmax of the student over {old classes,
    no-object}) per query; new-class logits are dropped. ``reweight`` (``KD_REW``): weight each
    query by ``(1 - p_teacher(no-object))**2`` and divide by the sum of the weights; else mean."""
    teacher = logits_old * temperature
    student = F.log_softmax(_old_columns(logits, logits_old.shape[-1]), dim=-1)
    p = F.softmax(teacher, dim=-1)
    per_query = (p * (F.log_softmax(teacher, dim=-1) - student)).sum(-1)
    return _reduce_kd(per_query, p, reweight)


def l2_kd_loss(logits, logits_old) -> torch.Tensor:
    """``L2``: ``mean over queries of sum_c (q_c - p_c)**2`` with q = softmax of the student over
    {old classes, no-object}, p = softmax of the teacher (no temperature, no re-weighting)."""
    q = F.softmax(_old_columns(logits, logits_old.shape[-1]), dim=-1)
    p = F.softmax(logits_old, dim=-1)
    return ((q - p) ** 2).sum(-1).mean()


def mask_kd_loss(masks: torch.Tensor, masks_old: torch.Tensor) -> torch.Tensor:
    """``MASK_KD``: mean BCE-with-logits of every student mask logit against the teacher's
    mask probability (all queries, all pixels)."""
    return F.binary_cross_entropy_with_logits(masks, masks_old.detach().sigmoid())


def pod_embedding(x: torch.Tensor, scales: Sequence[int] = POD_SCALES) -> torch.Tensor:
    """PLOP's local POD embedding of ``x [B, C, H, W]``: for each scale s, cells of side
    ``k = W // s`` (``[i k:(i+1) k, j k:(j+1) k]``, empty cells skipped); per cell its mean over
    the width and its mean over the height, flattened; all concatenated -> ``[B, D]``."""
    b, w = x.shape[0], x.shape[-1]
    parts = []
    for s in scales:
        k = w // s
        for i in range(s):
            for j in range(s):
                cell = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                if cell.shape[-2] == 0 or cell.shape[-1] == 0:
                    continue
                parts.append(cell.mean(dim=-1).reshape(b, -1))
                parts.append(cell.mean(dim=-2).reshape(b, -1))
    return torch.cat(parts, dim=1)


def pod_loss(feats: Sequence[torch.Tensor], feats_old: Sequence[torch.Tensor]) -> torch.Tensor:
    """POD: per level, the L2 distance between the student's and the (detached) teacher's
    :func:`pod_embedding`, per image; summed over levels, averaged over images, divided by the
    number of levels."""
    if len(feats) != len(feats_old) or not feats:
        raise ValueError(f"POD needs the same non-zero number of levels, got {len(feats)} and {len(feats_old)}")
    total = 0.0
    for f, f_old in zip(feats, feats_old):
        diff = pod_embedding(f) - pod_embedding(f_old.detach())
        total = total + torch.linalg.vector_norm(diff, dim=-1)
    return total.mean() / len(feats)


# --------------------------------------------------------------------------- the loss
class DistillationLoss:
    """All losses of a distillation step (see the module docstring for the API).

    ``criterion`` is a :class:`SetCriterion` (Hungarian matching, mask and dice losses) whose
    class loss follows the official branch order (first that applies): ``UCE`` + ``FOCAL``,
    ``UCE``, ``FOCAL`` with softmax (``SOFTCLS``) or ECLIPSE's sigmoid focal, softmax CE. Class
    KD and mask KD are added per prediction through the criterion's ``extra_losses`` hook; POD
    is added afterwards.
    """

    def __init__(self, cfg, matcher: Optional[HungarianMatcher] = None):
        """
        Args:
            cfg: the step's config (``CONT.*``, ``MODEL.MASK_FORMER.*``).
            matcher: optional matcher to reuse; by default one is built from the class / mask /
                dice weights and ``TRAIN_NUM_POINTS`` as at step 0.
        """
        mf, d = cfg.MODEL.MASK_FORMER, cfg.CONT.DIST
        if cfg.CONT.TASK < 1:
            raise ValueError(f"distillation losses need a step CONT.TASK > 0, got CONT.TASK={cfg.CONT.TASK}")
        if mf.SOFTMASK:
            raise NotImplementedError("MODEL.MASK_FORMER.SOFTMASK True is not supported: set it to False")
        self.num_classes, self.old_classes, self.new_classes, self.use_bg = class_counts(cfg)
        if self.use_bg and (d.UCE or d.UKD):
            raise ValueError("CONT.DIST.UCE / CONT.DIST.UKD cannot be used with a background class "
                             "(MODEL.MASK_FORMER.TEST.MASK_BG or PER_PIXEL with SEMANTIC_ON): turn one off")
        self.uce = bool(d.UCE) and self.old_classes != 0
        self.focal, self.softcls = bool(mf.FOCAL), bool(cfg.CONT.SOFTCLS)
        if not self.uce and not self.focal and not self.softcls:
            raise NotImplementedError(
                "MODEL.MASK_FORMER.FOCAL False with CONT.SOFTCLS False selects the sigmoid cross-entropy, "
                "which is broken in the official code: set CONT.SOFTCLS True (softmax CE) or FOCAL True")
        self.focal_alpha, self.focal_gamma = mf.FOCAL_ALPHA, mf.FOCAL_GAMMA
        self.kd_weight = d.KD_WEIGHT if _kd_on(cfg) else 0.0
        self.ukd, self.l2, self.kd_reweight = bool(d.UKD), bool(d.L2), bool(d.KD_REW)
        self.temperature = d.ALPHA
        self.kd_deep = bool(d.KD_DEEP)
        self.mask_kd = d.MASK_KD
        self.pod_weight = d.POD_WEIGHT
        self.pseudo, self.pseudo_threshold = bool(d.PSEUDO), d.PSEUDO_THRESHOLD
        self.deep_supervision = bool(mf.DEEP_SUPERVISION)
        #: pseudo-labels added per image by the last prepare_targets call (for logging)
        self.last_pseudo_counts: List[int] = []
        # the official wrapper runs the teacher for KD and pseudo-labels (and, intended, POD)
        self.uses_teacher = self.kd_weight > 0 or self.pseudo or self.pod_weight > 0
        if self.mask_kd > 0 and not self.uses_teacher:
            logger.warning("CONT.DIST.MASK_KD > 0 has no effect without CONT.DIST.KD_WEIGHT > 0, PSEUDO or "
                           "POD_WEIGHT > 0: the teacher is not run then (as in the official code)")
        if matcher is None:
            matcher = HungarianMatcher(cost_class=mf.CLASS_WEIGHT, cost_mask=mf.MASK_WEIGHT,
                                       cost_dice=mf.DICE_WEIGHT, num_points=mf.TRAIN_NUM_POINTS)
        self.weight_dict = distillation_weight_dict(cfg)
        self.criterion = SetCriterion(
            self.num_classes, matcher=matcher, weight_dict=self.weight_dict, eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"], num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO, class_loss=self.class_loss,
            focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma,
        )

    # ------------------------------------------------------------------ pieces
    def class_loss(self, logits: torch.Tensor, target_classes: torch.Tensor) -> torch.Tensor:
        """The classification loss (``loss_ce``) of one prediction."""
        if self.uce and self.focal:
            return focal_unbiased_ce_loss(logits, target_classes, self.old_classes, self.focal_alpha, self.focal_gamma)
        if self.uce:
            return unbiased_ce_loss(logits, target_classes, self.old_classes, self.criterion.empty_weight)
        if self.focal and self.softcls:
            return softmax_focal_loss(logits, target_classes, self.focal_alpha, self.focal_gamma)
        if self.focal:
            return sigmoid_focal_class_loss(logits, target_classes, self.focal_alpha, self.focal_gamma)
        return F.cross_entropy(logits.transpose(1, 2), target_classes, self.criterion.empty_weight)

    def kd_terms(self, prediction: Dict, teacher: Dict) -> Dict[str, torch.Tensor]:
        """``loss_kd`` / ``loss_mask_kd`` of one student prediction against the teacher's."""
        losses = {}
        if self.kd_weight > 0:
            logits, logits_old = prediction["pred_logits"].float(), teacher["pred_logits"].float().detach()
            if logits_old.shape[-1] != self.old_classes + 1:
                raise ValueError(f"the teacher has {logits_old.shape[-1]} class logits, expected "
                                 f"{self.old_classes + 1} (the classes before CONT.TASK, plus no-object)")
            if self.ukd:
                losses["loss_kd"] = unbiased_kd_loss(logits, logits_old, self.temperature, self.kd_reweight)
            elif self.l2:
                losses["loss_kd"] = l2_kd_loss(logits, logits_old)
            else:
                losses["loss_kd"] = kd_loss(logits, logits_old, self.temperature, self.kd_reweight)
        if self.mask_kd > 0:
            losses["loss_mask_kd"] = mask_kd_loss(prediction["pred_masks"], teacher["pred_masks"])
        return losses

    def _teacher_for(self, outputs_old: Dict, m: int) -> Optional[Dict]:
        if m == 0:
            return outputs_old
        if not self.kd_deep:
            return None
        aux = outputs_old.get("aux_outputs")
        if aux is None or len(aux) < m:
            raise KeyError(
                f"CONT.DIST.KD_DEEP needs the teacher's aux_outputs[{m - 1}] (found "
                f"{0 if aux is None else len(aux)}): run the old model so that it returns its auxiliary "
                "predictions (training layout), or set CONT.DIST.KD_DEEP False")
        return aux[m - 1]

    def prepare_targets(self, gt_instances, padded_size: Tuple[int, int], outputs_old: Optional[Dict] = None):
        """Ground-truth targets (:func:`make_targets`) plus, with ``PSEUDO``, the teacher's
        pseudo-labels (:func:`add_pseudo_labels`). Returns the list of target dicts."""
        targets = make_targets(gt_instances, padded_size, shift_labels=not self.use_bg)
        if self.pseudo:
            if outputs_old is None:
                raise ValueError("CONT.DIST.PSEUDO needs the teacher's outputs (outputs_old)")
            self.last_pseudo_counts = add_pseudo_labels(targets, outputs_old, self.old_classes,
                                                        self.pseudo_threshold, self.softcls)
        return targets

    def pod_inputs(self, outputs, outputs_old, features, features_old):
        """The POD levels of student and teacher: backbone ``res2..res5`` and mask features."""
        for name, feats in (("features", features), ("features_old", features_old)):
            if feats is None or any(k not in feats for k in POD_LEVELS):
                raise KeyError(f"CONT.DIST.POD_WEIGHT > 0 needs {name} with the backbone levels "
                               f"{list(POD_LEVELS)}: pass the backbone outputs of both models")
        for name, out in (("outputs", outputs), ("outputs_old", outputs_old)):
            if "features" not in out:
                raise KeyError(f"CONT.DIST.POD_WEIGHT > 0 needs the mask features as {name}['features'] "
                               "[B, MASK_DIM, H/4, W/4]: make the head return them (also for the old model)")
        new = [features[k] for k in POD_LEVELS] + [outputs["features"]]
        old = [features_old[k] for k in POD_LEVELS] + [outputs_old["features"]]
        return new, old

    # ------------------------------------------------------------------ losses
    def unweighted(self, outputs: Dict, outputs_old: Optional[Dict], targets: List[Dict],
                   features: Optional[Dict] = None, features_old: Optional[Dict] = None,
                   **injected) -> Dict[str, torch.Tensor]:
        """Every loss before weighting (``injected``: the criterion's overrides ``indices``,
        ``point_coords``, ``matcher_point_coords``, for reference checks)."""
        if not self.uses_teacher:
            outputs_old = None
        elif outputs_old is None:
            raise ValueError("this configuration uses the teacher (KD, PSEUDO or POD): pass outputs_old")
        if not self.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}

        extra = None
        if outputs_old is not None:
            def extra(m, prediction):
                teacher = self._teacher_for(outputs_old, m)
                return {} if teacher is None else self.kd_terms(prediction, teacher)

        losses = self.criterion(outputs, targets, extra_losses=extra, **injected)
        if self.pod_weight > 0:
            losses["loss_pod"] = pod_loss(*self.pod_inputs(outputs, outputs_old, features, features_old))
        return losses

    def __call__(self, outputs: Dict, outputs_old: Optional[Dict], targets: List[Dict],
                 features: Optional[Dict] = None, features_old: Optional[Dict] = None,
                 **injected) -> Dict[str, torch.Tensor]:
        """The weighted losses (keys without a weight dropped); their sum is the step's loss."""
        return weight_losses(self.unweighted(outputs, outputs_old, targets, features, features_old, **injected),
                             self.weight_dict)


# --------------------------------------------------------------------------- the teacher
def uses_distillation(cfg) -> bool:
    """Whether a step trains with :class:`DistillationLoss` instead of the model's criterion: a
    step > 0 without prompts with some loss-changing ``CONT.DIST`` key set (with every key at
    its default the baseline is plain fine-tuning, which the model's own criterion computes)."""
    d = cfg.CONT.DIST
    return (cfg.CONT.TASK > 0 and cfg.CONT.NUM_PROMPTS == 0
            and (_kd_on(cfg) or bool(d.PSEUDO) or d.POD_WEIGHT > 0 or d.MASK_KD > 0 or bool(d.UCE)))


def teacher_config(cfg):
    """The config of the teacher: the step's config at ``CONT.TASK - 1`` (class heads of the
    earlier steps only, no prompts) with the distillation keys at their defaults."""
    defaults = setup_cfg()
    tcfg = cfg.clone()
    tcfg.defrost()
    tcfg.CONT.TASK = cfg.CONT.TASK - 1
    tcfg.CONT.NUM_PROMPTS = 0
    tcfg.CONT.DIST = defaults.CONT.DIST.clone()
    tcfg.CONT.WA_STEP = 0
    tcfg.MODEL.WEIGHTS = ""
    tcfg.freeze()
    return tcfg


class Teacher:
    """The frozen model of step ``t - 1`` (see :func:`build_teacher`); not an ``nn.Module`` of
    the student, so it is never saved, trained or switched to training mode with it.

    Called with the student's normalised, padded image batch, it returns ``(outputs_old,
    features_old)``: the raw head outputs in the training layout (``pred_logits [B, Q, C_old+1]``,
    ``pred_masks``, ``aux_outputs``; ``features`` = the mask features when ``with_features``) and
    the backbone features (``with_features``, for POD; else None). Runs without autograd.
    """

    def __init__(self, model: torch.nn.Module, with_features: bool = False):
        self.model = model
        self.with_features = with_features

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        m = self.model
        if m.training:
            m.eval()
        features = m.backbone(images)
        mask_features, _, multi_scale = m.sem_seg_head.pixel_decoder.forward_features(features)
        outputs = m.sem_seg_head.predictor.forward_training_layout(multi_scale, mask_features)
        if self.with_features:
            outputs["features"] = mask_features
            return outputs, features
        return outputs, None


def build_teacher(cfg, weights_path: str) -> Teacher:
    """The teacher of step ``CONT.TASK``: the architecture of step ``t - 1`` loaded from
    ``weights_path`` (the weights the step starts from: ``CONT.WEIGHTS`` or the previous step's
    ``model_final.pth``, never the step's own resume checkpoint), keys matched exactly; every
    parameter frozen, eval mode (BatchNorm running statistics)."""
    if not weights_path or not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"the teacher of step {cfg.CONT.TASK} is the step {cfg.CONT.TASK - 1} model {weights_path!r}, which does "
            f"not exist: train step {cfg.CONT.TASK - 1} first, or pass it with CONT.WEIGHTS <path>")
    tcfg = teacher_config(cfg)
    model = build_model(tcfg)
    state = read_model_state(weights_path)
    check_checkpoint_for_step(state, model, tcfg.CONT.TASK, previous_step=False, source=weights_path)
    model.load_state_dict(state, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    logger.info(f"teacher of step {cfg.CONT.TASK}: the step {tcfg.CONT.TASK} model from {weights_path}")
    return Teacher(model, with_features=teacher_needs_features(cfg))


class DistillationStep:
    """The training loss of a baseline step, installed on the student with
    ``MaskFormer.set_training_loss``: runs the teacher (when :func:`needs_teacher`), builds the
    targets (with pseudo-labels) and returns the weighted :class:`DistillationLoss` dict."""

    def __init__(self, cfg, teacher: Optional[Teacher]):
        if needs_teacher(cfg) and teacher is None:
            raise ValueError("this configuration needs the teacher (KD, PSEUDO or POD): pass build_teacher(...)")
        self.loss = DistillationLoss(cfg)
        self.teacher = teacher if needs_teacher(cfg) else None

    def __call__(self, *, images: torch.Tensor, features: Dict, outputs: Dict, gt_instances, padded_size):
        outputs_old = features_old = None
        if self.teacher is not None:
            outputs_old, features_old = self.teacher(images)
        targets = self.loss.prepare_targets(gt_instances, padded_size, outputs_old)
        return self.loss(outputs, outputs_old, targets, features, features_old)


def setup_distillation(cfg, model: torch.nn.Module, weights_path: str) -> Optional[DistillationStep]:
    """Install the baseline's loss (and teacher) on ``model`` (bare or DDP-wrapped) when
    :func:`uses_distillation`; returns it (None otherwise, and the model keeps its criterion).
    Called by the trainer whenever a step starts or resumes, with the weights the step starts
    from."""
    if not uses_distillation(cfg):
        return None
    teacher = build_teacher(cfg, weights_path) if needs_teacher(cfg) else None
    step = DistillationStep(cfg, teacher)
    getattr(model, "module", model).set_training_loss(step)
    return step
