"""Checkpoints never run code, damaged ones are named, and writes are atomic."""
import hashlib
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from continual.checkpoint import read_model_state
from continual.checkpoint_io import (
    TRUST_ENV,
    SafeCheckpointer,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    checkpoint_is_readable,
)


class _WritesMarker:
    """Unpickling this object creates the file ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def crafted(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "marker"
    weights = {"a.weight": np.ones((2, 2), dtype=np.float32)}
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "x", "payload": _WritesMarker(marker)}, f, protocol=2)
    torch.save({"model": {"a.weight": torch.ones(2, 2)}, "payload": _WritesMarker(marker)}, tmp_path / "evil.pth")
    return tmp_path, marker


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pth"])
def test_a_checkpoint_carrying_code_is_refused_and_never_runs(crafted, name):
    folder, marker = crafted
    path = folder / name
    before = _sha(path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_model_state(str(path))
    assert name in str(err.value) and TRUST_ENV in str(err.value)
    model = nn.Linear(2, 2)
    model.a = nn.Linear(2, 2)
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointer(model).load(str(path))
    assert not marker.exists()
    assert _sha(path) == before


def test_trusting_checkpoints_is_an_explicit_opt_in(crafted, monkeypatch):
    folder, marker = crafted
    monkeypatch.setenv(TRUST_ENV, "1")
    state = read_model_state(str(folder / "evil.pkl"))
    assert torch.equal(state["a.weight"], torch.ones(2, 2))
    assert marker.exists()  # the documented consequence of the opt-in


def test_detectron2_model_zoo_pickles_load_with_the_safe_unpickler(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    arrays = {"stem.conv1.weight": np.arange(8, dtype=np.float32).reshape(2, 4), "res2.0.bias": np.zeros(3)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"r50_{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": arrays, "__author__": "torchvision", "matching_heuristics": True}, f, protocol=protocol)
        state = read_model_state(str(path))
        assert set(state) == set(arrays)
        assert torch.equal(state["stem.conv1.weight"], torch.from_numpy(arrays["stem.conv1.weight"]))


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "list", "tensor", "strings"])
def test_damaged_or_foreign_checkpoints_are_named(tmp_path, kind):
    path = tmp_path / "model_final.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "strings":
        torch.save({"model": {"a.weight": "not a tensor"}}, path)
    else:
        torch.save({"model": {"w": torch.ones(100, 100)}}, path)
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UnreadableCheckpointError) as err:
        read_model_state(str(path))
    assert str(path) in str(err.value)
    assert not checkpoint_is_readable(str(path)) or kind in ("list", "tensor", "strings")


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 3)
    checkpointer = SafeCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_final")
    final = tmp_path / "model_final.pth"
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}

    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    assert {p.name: _sha(p) for p in tmp_path.iterdir()} == before  # no temporary file left either
    assert checkpoint_is_readable(str(final))
