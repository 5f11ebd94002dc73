"""Reading and writing checkpoint files safely.

* Reading never runs code carried by a file: ``.pth`` files load with ``torch.load(...,
  weights_only=True)``, and Detectron2 / Caffe2 ``.pkl`` files (dicts of numpy arrays) through an
  unpickler that admits only numpy arrays, dtypes and scalars, ordered dicts and the byte-string
  helper of protocol-2 pickles. A file that needs more stops with :class:`UnsafeCheckpointError`.
  Setting the environment variable ``ECLIPSE_TRUST_CHECKPOINTS=1`` is the one, deliberate way to
  load such a file anyway (with full unpickling: only for files whose origin you trust).
* Every read error (empty, truncated, text, not a dict) names the file and what to do
  (:class:`UnreadableCheckpointError`).
* :class:`SafeCheckpointer` is Detectron2's ``DetectionCheckpointer`` with the safe reader and
  atomic writes (temporary file in the same folder, flush, fsync, rename), so a process killed
  while saving leaves the previous file intact and never a truncated one.
"""
import importlib
import io
import logging
import os
import pickle
from collections import OrderedDict
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .io import atomic_write

__all__ = [
    "TRUST_ENV",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "load_checkpoint_file",
    "checkpoint_is_readable",
    "SafeCheckpointer",
]

logger = logging.getLogger(__name__)

#: environment variable that allows full (code-executing) unpickling of checkpoints
TRUST_ENV = "ECLIPSE_TRUST_CHECKPOINTS"

# (module, name) pairs a Detectron2 / Caffe2 model-zoo .pkl may reference
_PKL_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class UnreadableCheckpointError(ValueError):
    """A checkpoint file cannot be read (empty, truncated, not a checkpoint)."""


class UnsafeCheckpointError(UnreadableCheckpointError):
    """A checkpoint file would need arbitrary code to be unpickled."""


def _trusted() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PKL_ALLOWED:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _unsafe_message(path: str, reason: str) -> str:
    return (
        f"{path} is not a plain checkpoint: loading it would run code it carries ({reason}). It was "
        f"not loaded. Use a checkpoint that holds only tensors / numpy arrays (e.g. re-save its "
        f"state dict with torch.save), or, only if you trust where the file comes from, set the "
        f"environment variable {TRUST_ENV}=1 to load it with full unpickling."
    )


def _unreadable_message(path: str, reason: str) -> str:
    return (
        f"cannot read the checkpoint {path} ({reason}). The file is empty, truncated (e.g. a run "
        f"killed while writing it) or not a checkpoint: replace it with an intact copy; for a "
        f"step's own model_final.pth, `train_continual.py --resume` rewrites it from the last "
        f"periodic checkpoint."
    )


def load_checkpoint_file(path: str) -> Any:
    """The unpickled content of a ``.pth`` / ``.pyth`` / ``.pkl`` checkpoint, without running code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file references code (and ``ECLIPSE_TRUST_CHECKPOINTS`` is unset).
        UnreadableCheckpointError: the file is empty, truncated, or not a checkpoint.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise UnreadableCheckpointError(_unreadable_message(path, "the file is empty"))
    trusted = _trusted()
    if trusted:
        logger.warning("%s=1: loading %s with full unpickling (it may run code)", TRUST_ENV, path)
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            if trusted:
                return pickle.loads(raw, encoding="latin1")
            return _ArraysOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
        except pickle.UnpicklingError as e:
            if "is not allowed" in str(e):
                raise UnsafeCheckpointError(_unsafe_message(path, str(e))) from None
            raise UnreadableCheckpointError(_unreadable_message(path, f"{type(e).__name__}: {e}")) from None
        except Exception as e:  # EOFError, ValueError, ... from a damaged file
            raise UnreadableCheckpointError(_unreadable_message(path, f"{type(e).__name__}: {e}")) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text and ("GLOBAL" in text or "global" in text.lower()):
            first = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line), text)
            raise UnsafeCheckpointError(_unsafe_message(path, first[:300])) from None
        raise UnreadableCheckpointError(_unreadable_message(path, f"{type(e).__name__}: {text[:300]}")) from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, ...
        raise UnreadableCheckpointError(_unreadable_message(path, f"{type(e).__name__}: {str(e)[:300]}")) from None


def checkpoint_is_readable(path: str) -> bool:
    """True if ``path`` loads as a checkpoint dict with a ``"model"`` entry (or is a bare state dict)."""
    try:
        data = load_checkpoint_file(path)
    except (OSError, UnreadableCheckpointError):
        return False
    return isinstance(data, dict) and bool(data)


def model_state_of(data: Any, path: str) -> Dict[str, Any]:
    """The model entries of loaded checkpoint ``data`` (with or without the ``"model"`` level)."""
    state = data.get("model", data) if isinstance(data, dict) else data
    if not isinstance(state, dict) or not state:
        raise UnreadableCheckpointError(
            f"{path} holds a {type(state).__name__}, not a checkpoint (a dict of tensors, optionally "
            f"under 'model'): pass the checkpoint file written by train_continual.py or a state dict "
            f"saved with torch.save(model.state_dict(), ...)"
        )
    return state


class SafeCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that reads with :func:`load_checkpoint_file` (never runs code) and
    writes checkpoints and ``last_checkpoint`` atomically."""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith(".pkl"):
            data = load_checkpoint_file(filename)
            if not isinstance(data, dict):
                model_state_of(data, filename)  # raises with the file name
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 detection models
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = load_checkpoint_file(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise UnreadableCheckpointError(f"{filename}: pycls checkpoints must contain 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    #: the ``_IncompatibleKeys`` of the last model load (missing / unexpected / reshaped keys)
    last_incompatible = None

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        return incompatible

    def _torch_load(self, f: str) -> Dict[str, Any]:
        data = load_checkpoint_file(f)
        model_state_of(data, f)
        return data

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_write(save_file, binary=True) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint")) as f:
            f.write(last_filename_basename)
