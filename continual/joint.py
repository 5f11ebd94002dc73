"""The joint-training upper bound of a continual scenario (``CONT.JOINT True``).

The continual runs learn ``CONT.ORDER`` in steps (``CONT.BASE_CLS`` then ``CONT.INC_CLS`` per
step). The joint upper bound trains one model on **all** classes at once, on every training
image with at least one of them, and is evaluated with the **same split** as the continual runs,
so its PQ / mIoU base, old, new, novel and all fill the "joint" row of a results table.

With ``CONT.JOINT True`` (only with ``CONT.TASK 0``) a run keeps the scenario's keys and derives
two configs from them:

* :func:`training_config`: the model and the training data of a single step holding the whole
  order (``CONT.BASE_CLS = len(CONT.ORDER)``); its step-membership cache is
  ``<TASK_NAME>-joint.npy``, so it never collides with the continual scenario's cache;
* :func:`evaluation_config`: the continual scenario at its last step (``CONT.TASK = T``), so
  that the validation labels and the evaluator's base / old / new / novel are those of the
  continual run's final evaluation.

Outputs (step folder, ``metrics.json``, the CSV row in ``CONT.RESULTS_DIR/<TASK_NAME>.csv``)
use the scenario's ``TASK_NAME`` with step 0; the run ``NAME`` tells the joint row apart (the
scenario scripts append ``_joint``).
"""
from .config import task_name
from .scenario import Scenario

__all__ = ["is_joint", "check_joint", "training_config", "evaluation_config"]


def is_joint(cfg) -> bool:
    """Whether ``cfg`` asks for the joint upper bound (``CONT.JOINT``)."""
    return bool(cfg.CONT.get("JOINT", False))


def check_joint(cfg) -> None:
    """Raise a ``ValueError`` for settings the joint upper bound does not accept."""
    if not is_joint(cfg):
        return
    if cfg.CONT.TASK != 0:
        raise ValueError(
            f"CONT.JOINT True trains all classes in one step: CONT.TASK must be 0, got "
            f"{cfg.CONT.TASK} (the evaluation already uses the split of the scenario's last step)"
        )
    if cfg.CONT.NUM_PROMPTS != 0:
        raise ValueError(
            f"CONT.JOINT True trains the whole model without prompts: set CONT.NUM_PROMPTS 0 "
            f"(got {cfg.CONT.NUM_PROMPTS})"
        )


def _derived(cfg, **cont):
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    for key, value in cont.items():
        out.CONT[key] = value
    if frozen:
        out.freeze()
    return out


def training_config(cfg):
    """``cfg`` itself without ``CONT.JOINT``; else a copy for the model and the training loader:
    one step with every class of ``CONT.ORDER`` and the cache name ``<TASK_NAME>-joint``."""
    if not is_joint(cfg):
        return cfg
    check_joint(cfg)
    out = _derived(cfg, BASE_CLS=len(cfg.CONT.ORDER))
    out.defrost()
    out.TASK_NAME = f"{_task_name(cfg)}-joint"
    if cfg.is_frozen():
        out.freeze()
    return out


def evaluation_config(cfg):
    """``cfg`` itself without ``CONT.JOINT``; else a copy for the test loader and the evaluator:
    the continual scenario at its last step, so every class is visible and the metrics are split
    as in the continual runs."""
    if not is_joint(cfg):
        return cfg
    check_joint(cfg)
    scenario = Scenario(cfg.CONT.ORDER, cfg.CONT.BASE_CLS, cfg.CONT.INC_CLS, cfg.CONT.MODE)
    return _derived(cfg, TASK=scenario.num_steps - 1)


def _task_name(cfg) -> str:
    return cfg.TASK_NAME if cfg.get("TASK_NAME") else task_name(cfg)
