"""Checking that a checkpoint fits the configured step before it is used.

The official code loads checkpoints non-strictly, so a checkpoint of the wrong step silently
leaves prompt sets at their random initialisation. Here every mismatch stops with the keys
involved and the probable fix.
"""
import pickle
import re
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

__all__ = [
    "CheckpointMismatchError",
    "checkpoint_step",
    "check_checkpoint_for_step",
    "new_step_keys",
    "read_model_state",
]

from .prompt_tuning import get_predictor, predictor_prefix


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built for ``CONT.TASK``."""


def read_model_state(path: str) -> Dict[str, torch.Tensor]:
    """The model entries of a checkpoint file (``.pth`` with or without the ``"model"`` level, or
    a detectron2 ``.pkl``)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        data = torch.load(path, map_location="cpu", weights_only=False)
    state = data.get("model", data) if isinstance(data, dict) else data
    return {k: torch.as_tensor(v) for k, v in state.items()}


def checkpoint_step(keys: Iterable[str]) -> Optional[int]:
    """The step a checkpoint was trained for, from its class heads (``class_embed.cls.{0..T+1}``);
    ``None`` if it has no incremental class head."""
    heads = {int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)predictor\.class_embed\.cls\.(\d+)\.", k))}
    return max(heads) - 1 if heads else None


def new_step_keys(model: nn.Module, step: int) -> List[str]:
    """State-dict keys that belong to ``step``'s own modules (absent from step ``step-1``): those
    of the decoder's ``step_modules(step)``."""
    prefix = predictor_prefix(model)
    own = tuple(f"{prefix}{name}." for name in get_predictor(model).step_modules(step))
    return [key for key in getattr(model, "module", model).state_dict() if key.startswith(own)]


def check_checkpoint_for_step(
    state_dict: Dict[str, torch.Tensor], model: nn.Module, step: int, previous_step: bool, source: str = "checkpoint"
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` fits ``model`` at ``step``.

    Args:
        state_dict: the checkpoint's model entries.
        model: the model built for ``CONT.TASK = step`` (bare or DDP-wrapped).
        step: ``CONT.TASK``.
        previous_step: the checkpoint is the previous step's (starting step ``step``): only
            step ``step``'s own prompt set and class head may be missing. Otherwise (evaluation,
            resuming) nothing of the head may be missing.
        source: the checkpoint's path, for the message.
    """
    model = getattr(model, "module", model)
    expected = model.state_dict()
    allowed_missing = set(new_step_keys(model, step)) if previous_step and step > 0 else set()
    head = [k for k in expected if not k.startswith("backbone.")]
    missing = [k for k in head if k not in state_dict and k not in allowed_missing]
    unexpected = [k for k in state_dict if k not in expected and k.startswith("sem_seg_head.")]
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    already_trained = [k for k in allowed_missing if k in state_dict]
    if not (missing or unexpected or wrong_shape or already_trained):
        return
    ckpt_step = checkpoint_step(state_dict)
    want = step - 1 if previous_step else step
    lines = [f"{source} does not fit the model for CONT.TASK {step}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if already_trained:
        lines.append(f"  it already holds step {step}'s own modules ({already_trained[:3]} ...), so it is not "
                     f"the step {step - 1} checkpoint; resume step {step} with --resume, or evaluate it with --eval-only")
    if wrong_shape:
        lines.append(f"  wrong shapes ({len(wrong_shape)}): {wrong_shape[:4]}")
    if ckpt_step is not None and ckpt_step != want:
        fix = (f"start step {ckpt_step + 1} instead (CONT.TASK {ckpt_step + 1})" if previous_step
               else f"evaluate it with CONT.TASK {ckpt_step}")
        lines.append(f"  it holds the class heads of step {ckpt_step}, but step {want} is expected: {fix}, "
                     f"or pass the checkpoint of step {want}.")
    elif wrong_shape:
        lines.append("  check CONT.BASE_CLS, CONT.INC_CLS, CONT.NUM_PROMPTS and the model-size keys.")
    elif any(".prompt_" in k for k in missing + unexpected):
        lines.append("  check CONT.NUM_PROMPTS, CONT.PROMPT_DEEP, CONT.PROMPT_MASK_MLP and CONT.PROMPT_NO_OBJ_MLP.")
    raise CheckpointMismatchError("\n".join(lines))
