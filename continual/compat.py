"""The official keys outside ECLIPSE's own path: each one works or stops the run.

ECLIPSE inherits from CoMFormer a set of keys its own scripts never set (the distillation
baselines' ``CONT.DIST.*``, ``CONT.WA_STEP``, ``CONT.COSINE``, ``CONT.INC_QUERY``,
``MODEL.MASK_FORMER.TEST.MASK_BG``). :func:`check_continual_keys` is called before a step is
trained or evaluated: a value or a combination this project does not run (or the official code
rejects or crashes on) stops with a :class:`UnsupportedKeyError` that names the key and says what
to do; a key that has no effect in the official code either is accepted with a warning. The keys
that work are implemented where they act:

* ``CONT.DIST.*``: :mod:`continual.distillation` (losses and teacher);
* ``CONT.WA_STEP``: :class:`WeightAligningHook` below;
* ``CONT.COSINE``: the cosine class heads of
  :class:`mask2former.modeling.transformer_decoder.classifier.IncrementalClassifier`;
* ``MASK_BG`` with semantic inference: a background class (order position 0) in the base class
  head, the target built by :class:`continual.data.ContinualMapper`.
"""
import logging
from typing import List

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = [
    "UnsupportedKeyError",
    "check_continual_keys",
    "uses_background_class",
    "WeightAligningHook",
    "align_weights",
    "INERT_KEYS",
    "DIST_INERT_KEYS",
    "WA_PERIOD",
]

logger = logging.getLogger(__name__)

#: weight aligning runs after every iteration whose number is a multiple of this (fixed in the
#: official code; ``CONT.WA_STEP`` only switches it on)
WA_PERIOD = 100

#: ``CONT.DIST`` keys the official code reads but never uses
DIST_INERT_KEYS = ("PSEUDO_TYPE", "IOU_THRESHOLD", "USE_NEW", "CE_NEW", "EOS_POW")
#: keys without effect in the official code (accepted with a warning), with the reason
INERT_KEYS = {
    "CONT.INC_QUERY": "read by the official code but never used",
    **{f"CONT.DIST.{k}": "read by the official code but never used" for k in DIST_INERT_KEYS},
}


class UnsupportedKeyError(ValueError):
    """A config key (or combination of keys) this project does not run."""


def uses_background_class(cfg) -> bool:
    """Whether label 0 is a real class: ``MODEL.MASK_FORMER.TEST.MASK_BG`` (or ``PER_PIXEL``)
    with semantic inference, as in the official code."""
    mf = cfg.MODEL.MASK_FORMER
    return bool((mf.TEST.MASK_BG or mf.PER_PIXEL) and mf.TEST.SEMANTIC_ON)


def _dist_keys_set(cfg) -> List[str]:
    # the defaults of continual/config.py, except the keys without effect (DIST_INERT_KEYS)
    defaults = {"POD_WEIGHT": 0.0, "KD_WEIGHT": 0.0, "ALPHA": 1.0, "UCE": False, "UKD": False, "L2": False,
                "KD_REW": False, "KD_DEEP": False, "PSEUDO": False, "PSEUDO_THRESHOLD": 0.0, "MASK_KD": 0.0}
    return [f"CONT.DIST.{k}" for k, v in defaults.items() if cfg.CONT.DIST[k] != v]


def check_continual_keys(cfg, training: bool = True) -> List[str]:
    """Stop on an official key this project does not run; warn on one without effect.

    Args:
        cfg: the step's config.
        training: also check the keys that only act in training.
    Returns:
        the warnings issued (also logged).
    Raises:
        UnsupportedKeyError: naming the key and what to do.
    """
    c, mf = cfg.CONT, cfg.MODEL.MASK_FORMER
    warnings = []

    def stop(message):
        raise UnsupportedKeyError(message)

    # --- distillation baselines
    dist = _dist_keys_set(cfg)
    if dist and training:
        if c.TASK == 0:
            stop(f"{', '.join(dist)} set at step 0: the distillation baselines need the model of the previous "
                 f"step, which step 0 does not have. Pass these keys only at steps CONT.TASK > 0 (the scenario "
                 f"scripts do so with METHOD=mib|plop|comformer).")
        if c.NUM_PROMPTS > 0:
            stop(f"{', '.join(dist)} set with CONT.NUM_PROMPTS {c.NUM_PROMPTS}: the distillation baselines "
                 f"fine-tune the whole model without prompts. Set CONT.NUM_PROMPTS 0 (METHOD=mib|plop|comformer "
                 f"in the scenario scripts), or reset these keys for ECLIPSE.")
    # --- weight aligning
    if c.WA_STEP > 0:
        if c.DEEP_CLS:
            stop("CONT.WA_STEP > 0 (weight aligning) rescales Linear class heads, but CONT.DEEP_CLS True builds "
                 "MLP heads (the official code fails there): set CONT.DEEP_CLS False or CONT.WA_STEP 0.")
        if c.COSINE:
            stop("CONT.WA_STEP > 0 with CONT.COSINE True: a cosine classifier normalises its weights, so weight "
                 "aligning would have no effect. Set one of them off.")
        if c.TASK == 0:
            warnings.append("CONT.WA_STEP > 0 has no effect at step 0 (no old class heads to align to), as in the "
                            "official code")
    # --- cosine classifier
    if c.COSINE and c.DEEP_CLS:
        stop("CONT.COSINE True builds bias-free Linear cosine heads, but CONT.DEEP_CLS True asks for MLP heads: "
             "set CONT.DEEP_CLS False (or CONT.COSINE False).")
    # --- background class
    if uses_background_class(cfg) and (mf.TEST.PANOPTIC_ON or mf.TEST.INSTANCE_ON):
        stop("MODEL.MASK_FORMER.TEST.MASK_BG True with SEMANTIC_ON adds a background class, which panoptic / "
             "instance inference cannot handle: set MODEL.MASK_FORMER.TEST.MASK_BG False (as the official panoptic "
             "configs and scripts do), or PANOPTIC_ON False and INSTANCE_ON False for a semantic run.")
    if mf.TEST.MASK_BG and not mf.TEST.SEMANTIC_ON and training:
        stop("MODEL.MASK_FORMER.TEST.MASK_BG True without SEMANTIC_ON: the background would become a training "
             "target without a class (the official code fails on label -1). Set MODEL.MASK_FORMER.TEST.MASK_BG "
             "False, as the official panoptic configs and scripts do.")
    # --- keys without effect
    if c.INC_QUERY:
        warnings.append(f"CONT.INC_QUERY True has no effect: {INERT_KEYS['CONT.INC_QUERY']}")
    defaults = {"PSEUDO_TYPE": 0, "IOU_THRESHOLD": 0.5, "USE_NEW": False, "CE_NEW": False, "EOS_POW": 0.0}
    for key, default in defaults.items():
        if c.DIST[key] != default:
            warnings.append(f"CONT.DIST.{key} {c.DIST[key]!r} has no effect: {INERT_KEYS['CONT.DIST.' + key]}")
    if not c.USE_BIAS and (c.DEEP_CLS or c.COSINE):
        warnings.append("CONT.USE_BIAS False has no effect with CONT.DEEP_CLS True or CONT.COSINE True (MLP heads "
                        "always have biases, cosine heads never), as in the official code")
    for w in warnings:
        logger.warning(w)
    return warnings


# --------------------------------------------------------------------------- weight aligning
@torch.no_grad()
def align_weights(class_embed: nn.Module) -> float:
    """Weight aligning (WA) of the newest class head, in place; returns the factor applied.

    The newest head's weight is multiplied by mean(L2 norm of the rows of the old class heads)
    / mean(L2 norm of its own rows). Old heads: every head except the no-object head
    ``cls[0]`` and the newest. The bias is left as it is.
    """
    heads = class_embed.cls
    if len(heads) < 3:
        return 1.0
    if not all(isinstance(h, nn.Linear) for h in heads):
        raise TypeError("weight aligning needs Linear class heads (CONT.DEEP_CLS False)")
    old = torch.cat([h.weight for h in heads[1:-1]])
    new = heads[-1].weight
    factor = old.norm(dim=1).mean() / new.norm(dim=1).mean()
    new.mul_(factor)
    return float(factor)


class WeightAligningHook(HookBase):
    """``CONT.WA_STEP > 0`` at a step > 0: after every iteration whose (0-based) number is a
    multiple of :data:`WA_PERIOD`, :func:`align_weights` on the model's class heads."""

    def __init__(self, class_embed: nn.Module, period: int = WA_PERIOD):
        self.class_embed = class_embed
        self.period = period

    def after_step(self):
        if self.trainer.iter % self.period == 0:
            factor = align_weights(self.class_embed)
            self.trainer.storage.put_scalar("wa_factor", factor, smoothing_hint=False)
