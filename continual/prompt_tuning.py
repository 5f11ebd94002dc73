"""What changes between steps: initialising the new prompt set and class head, and freezing.

At step ``t > 0`` the model is built with prompt sets for steps 1..t, the previous step's
checkpoint is loaded (which fills everything but step ``t``'s modules), then:

1. :func:`initialize_new_step` sets step ``t``'s prompts to the mean base query, its mask head
   to a copy of the base mask head and its class head to a copy of the no-object head;
2. :func:`freeze_for_prompt_tuning` leaves only step ``t``'s modules (and the shared no-object
   head) trainable.

Which modules are step ``t``'s is decided once, by the decoder's ``step_modules`` (see
docs/design.md#per-step-modules).
"""
import logging
from typing import List

import torch
from torch import nn

__all__ = [
    "get_predictor",
    "predictor_prefix",
    "initialize_new_step",
    "freeze_for_prompt_tuning",
    "configure_trainable_parameters",
    "trainable_parameter_names",
]

logger = logging.getLogger(__name__)


def get_predictor(model: nn.Module) -> nn.Module:
    """The transformer decoder of a ``MaskFormer`` model, bare or wrapped in DDP."""
    model = getattr(model, "module", model)
    return model.sem_seg_head.predictor


def predictor_prefix(model: nn.Module) -> str:
    """State-dict prefix of the transformer decoder in ``model`` (e.g. ``sem_seg_head.predictor.``)."""
    pred = get_predictor(model)
    bare = getattr(model, "module", model)
    return next(name for name, m in bare.named_modules() if m is pred) + "."


@torch.no_grad()
def initialize_new_step(model: nn.Module) -> List[str]:
    """Initialise the modules of the newest step (the decoder's ``step_modules``) from the base
    model, in place, by the decoder's ``initialize_step_module`` rules.

    Returns the names (relative to the predictor) of the tensors written.
    """
    pred = get_predictor(model)
    if pred.num_steps == 0:
        raise ValueError("initialize_new_step needs a model at step > 0 (CONT.TASK > 0)")
    written = []
    for name, module in pred.step_modules(pred.num_steps).items():
        if pred.initialize_step_module(name, module):
            written += [f"{name}.{key}" for key in module.state_dict()]
    return written


def freeze_for_prompt_tuning(model: nn.Module, cont_cfg) -> None:
    """Set ``requires_grad`` for step ``t > 0`` as the official implementation does.

    Only called with ``CONT.TASK > 0``, ``CONT.NUM_PROMPTS > 0`` and ``CONT.BACKBONE_FREEZE``
    (otherwise everything stays trainable, which is the fine-tuning baseline). Trainable:
    the newest class head, the no-object head, the newest prompts and, per flag, the pixel
    decoder (``PIXEL_DECODER_FREEZE False``), all class heads (``CLS_HEAD_FREEZE False``),
    ``mask_embed`` (``MASK_HEAD_FREEZE False``), the base queries
    (``QUERY_EMBED_FREEZE False``); with ``PROMPT_MASK_MLP`` the newest prompt mask head
    instead of ``mask_embed``; with ``PROMPT_NO_OBJ_MLP`` the newest prompt no-object head
    instead of ``cls[0]``.
    """
    bare = getattr(model, "module", model)
    pred = get_predictor(model)
    if cont_cfg.TASK < 1 or not pred.has_prompts:
        raise ValueError("freeze_for_prompt_tuning needs CONT.TASK > 0 and CONT.NUM_PROMPTS > 0")
    if not cont_cfg.TRANS_DECODER_FREEZE:
        raise ValueError(
            "CONT.TRANS_DECODER_FREEZE False is not supported: prompt tuning shares the frozen "
            "decoder layers (the official code crashes here). Set CONT.TRANS_DECODER_FREEZE True."
        )

    def set_grad(module: nn.Module, flag: bool) -> None:
        for p in module.parameters():
            p.requires_grad_(flag)

    set_grad(bare, False)
    heads = pred.class_embed.cls
    for module in pred.step_modules(pred.num_steps).values():
        set_grad(module, True)
    set_grad(heads[0], True)
    if not cont_cfg.BACKBONE_FREEZE:
        set_grad(bare.backbone, True)
    if not cont_cfg.PIXEL_DECODER_FREEZE:
        set_grad(bare.sem_seg_head.pixel_decoder, True)
    if not cont_cfg.CLS_HEAD_FREEZE:
        set_grad(pred.class_embed, True)
    if not cont_cfg.MASK_HEAD_FREEZE:
        set_grad(pred.mask_embed, True)
    if not cont_cfg.QUERY_EMBED_FREEZE:
        set_grad(pred.query_feat, True)
        set_grad(pred.query_embed, True)
    # the step's own heads replace the shared ones
    if len(pred.prompt_mask_embed):
        set_grad(pred.mask_embed, False)
    if len(pred.prompt_no_obj_embed):
        set_grad(heads[0], False)


def trainable_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters with ``requires_grad``, in registration order."""
    model = getattr(model, "module", model)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def configure_trainable_parameters(model: nn.Module, cfg) -> None:
    """Apply the step's freezing rule to a freshly built model.

    As in the official trainer, freezing happens only at ``CONT.TASK > 0`` with
    ``CONT.NUM_PROMPTS > 0`` and ``CONT.BACKBONE_FREEZE``; otherwise every parameter keeps the
    ``requires_grad`` the model was built with (``MODEL.BACKBONE.FREEZE_AT`` still applies).
    """
    c = cfg.CONT
    if c.TASK > 0 and c.NUM_PROMPTS > 0 and c.BACKBONE_FREEZE:
        freeze_for_prompt_tuning(model, c)
