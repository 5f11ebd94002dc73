"""What changes between steps: initialising the new prompt set and class head, and freezing.

At step ``t > 0`` the model is built with prompt sets for steps 1..t, the previous step's
checkpoint is loaded (which fills everything but step ``t``'s modules), then:

1. :func:`initialize_new_step` sets step ``t``'s prompts to the mean base query, its mask head
   to a copy of the base mask head and its class head to a copy of the no-object head;
2. :func:`freeze_for_prompt_tuning` leaves only step ``t``'s modules (and the shared no-object
   head) trainable.
"""
import logging
from typing import List

import torch
from torch import nn

__all__ = [
    "get_predictor",
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


@torch.no_grad()
def initialize_new_step(model: nn.Module) -> List[str]:
    """Initialise the newest prompt set and class head from the base model, in place.

    * every row of ``prompt_feat[-1]`` = mean of the rows of ``query_feat``;
    * every row of ``prompt_embed[-1]`` (each per-layer table when deep) = mean of ``query_embed``;
    * ``prompt_mask_embed[-1]`` = copy of ``mask_embed`` (when prompt mask MLPs exist);
    * ``class_embed.cls[-1]`` = the no-object head ``cls[0]``, its single output row repeated
      for every new class, so every new-class logit starts equal to the no-object logit.

    Returns the names (relative to the predictor) of the tensors written.
    """
    pred = get_predictor(model)
    if pred.num_steps == 0:
        raise ValueError("initialize_new_step needs a model at step > 0 (CONT.TASK > 0)")
    written = []
    if pred.has_prompts:
        k = len(pred.prompt_feat) - 1
        pred.prompt_feat[k].weight.copy_(pred.query_feat.weight.mean(0).expand_as(pred.prompt_feat[k].weight))
        written.append(f"prompt_feat.{k}.weight")
        mean_pos = pred.query_embed.weight.mean(0)
        tables = pred.prompt_embed[k] if pred.prompt_deep else [pred.prompt_embed[k]]
        for l, table in enumerate(tables):
            table.weight.copy_(mean_pos.expand_as(table.weight))
            written.append(f"prompt_embed.{k}.{l}.weight" if pred.prompt_deep else f"prompt_embed.{k}.weight")
        if len(pred.prompt_mask_embed):
            pred.prompt_mask_embed[k].load_state_dict(pred.mask_embed.state_dict())
            written += [f"prompt_mask_embed.{k}.{n}" for n in pred.mask_embed.state_dict()]

    heads = pred.class_embed.cls
    new, no_obj = heads[len(heads) - 1], heads[0]
    new_sd = new.state_dict()
    for name, src in no_obj.state_dict().items():
        dst = new_sd[name]
        # same-shaped tensors (hidden layers) are copied; the output row is repeated
        dst.copy_(src if src.shape == dst.shape else src.expand_as(dst))
        written.append(f"class_embed.cls.{len(heads) - 1}.{name}")
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
    set_grad(heads[len(heads) - 1], True)
    set_grad(heads[0], True)
    set_grad(pred.prompt_feat[-1], True)
    set_grad(pred.prompt_embed[-1], True)
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
    if len(pred.prompt_mask_embed):
        set_grad(pred.prompt_mask_embed[-1], True)
        set_grad(pred.mask_embed, False)
    if len(pred.prompt_no_obj_embed):
        set_grad(pred.prompt_no_obj_embed[-1], True)
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
