"""Helpers of ``--resume``: choosing an intact checkpoint, applying changed solver keys.

* :func:`latest_readable_checkpoint`: the newest checkpoint of a step folder that loads (a file
  left empty or truncated by a killed process is skipped with a warning).
* :func:`solver_settings` / :func:`apply_changed_solver_settings`: a resumed step restores the
  optimizer and the LR schedule of its checkpoint, which would silently ignore a changed
  ``SOLVER.BASE_LR`` (or weight decay, schedule length, warmup, ...). The settings of the freshly
  built optimizer and scheduler (from the current config) are recorded before the checkpoint is
  loaded; what differs afterwards is put back, and the learning rate is recomputed from the new
  base values at the resumed iteration.
"""
import copy
import logging
import os
import re
from typing import Any, Dict, List, Optional

from .checkpoint_io import checkpoint_is_readable

__all__ = ["periodic_checkpoints", "latest_readable_checkpoint", "solver_settings", "apply_changed_solver_settings"]

logger = logging.getLogger(__name__)

# scheduler entries that are its progress, not its settings
_SCHEDULER_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
                       "verbose", "_initial_step"}
# optimizer group entries that are not settings (lr follows the schedule)
_GROUP_PROGRESS = {"params", "lr", "initial_lr"}


def periodic_checkpoints(folder: str) -> List[str]:
    """``model_<iter>.pth`` files of ``folder``, newest first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(r"model_(\d+)\.pth", name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return [path for _, path in sorted(found, reverse=True)]


def latest_readable_checkpoint(folder: str, preferred: Optional[str]) -> Optional[str]:
    """``preferred`` (what ``last_checkpoint`` names) if it loads, else the newest loadable one of
    ``model_final.pth`` and the periodic checkpoints; None if none loads."""
    candidates = ([preferred] if preferred else []) + [os.path.join(folder, "model_final.pth")]
    candidates += periodic_checkpoints(folder)
    seen = set()
    for path in candidates:
        if path in seen or not os.path.isfile(path):
            continue
        seen.add(path)
        if checkpoint_is_readable(path):
            if preferred and path != preferred:
                logger.warning("%s cannot be read (empty or truncated, e.g. a run killed while writing it); "
                               "resuming from %s instead", preferred, path)
            return path
        logger.warning("skipping the unreadable checkpoint %s", path)
    return None


def _settings(state: Dict[str, Any]) -> Dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in state.items() if k not in _SCHEDULER_PROGRESS}


def solver_settings(optimizer, scheduler) -> Dict[str, Any]:
    """The settings of ``optimizer`` / ``scheduler`` (call before a checkpoint is loaded)."""
    return {
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k not in _GROUP_PROGRESS} for g in optimizer.param_groups],
        "initial_lrs": [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups],
        "scheduler": _settings(scheduler.state_dict()),
    }


def _fmt(values) -> str:
    if isinstance(values, list) and len(values) > 3 and len(set(map(str, values))) <= 3:
        distinct = list(dict.fromkeys(values))
        return f"{distinct} (over {len(values)} parameter groups)"
    return repr(values)


def apply_changed_solver_settings(optimizer, scheduler, before: Dict[str, Any]) -> List[str]:
    """Put back the settings recorded by :func:`solver_settings` that the loaded checkpoint
    changed, and set the learning rates of the resumed iteration from the new base values.

    Returns:
        one line per changed setting (empty if the checkpoint had the same settings).
    """
    changes = []
    loaded = scheduler.state_dict()
    new_sched = {}
    for key, value in before["scheduler"].items():
        if key in loaded and loaded[key] != value:
            changes.append(f"scheduler {key}: {_fmt(loaded[key])} -> {_fmt(value)}")
            new_sched[key] = value
    if len(before["groups"]) == len(optimizer.param_groups):
        group_changes = {}
        for settings, group in zip(before["groups"], optimizer.param_groups):
            for key, value in settings.items():
                if key in group and group[key] != value:
                    group_changes.setdefault(key, ([], []))
                    group_changes[key][0].append(group[key])
                    group_changes[key][1].append(value)
                    group[key] = value
        for key, (old, new) in group_changes.items():
            changes.append(f"optimizer {key}: {_fmt(old)} -> {_fmt(new)}")
    if not new_sched and not changes:
        return []
    if new_sched:
        scheduler.load_state_dict({**loaded, **new_sched})
    if "base_lrs" in new_sched:
        for group, lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = lr
    # the learning rate of the resumed iteration under the (new) schedule (the schedulers of
    # Detectron2 compute it from base_lrs and last_epoch; the next scheduler step moves on from it)
    for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
    return changes
