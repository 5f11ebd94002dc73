"""Shared test helpers: config building and fixture locations."""
import os
import sys
from pathlib import Path

import pytest

# Short OpenMP spin-waiting (libgomp, as in the PyTorch wheels): with two xdist workers on two
# cores the default long spinning makes every worker many times slower. Set before torch is
# loaded; inherited by the subprocesses the end-to-end tests start.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIXTURES = REPO / "tests" / "fixtures"
# folders holding a recorded run of the official implementation (see tests/fixtures/README.md)
REFERENCE_FIXTURES = sorted(p.parent for p in FIXTURES.glob("*/manifest.json"))


def load_script(relative_path):
    """Import a script of this repository that is not in a package (``datasets/*.py``,
    ``tools/*.py``; "datasets" may also name an installed library) as a fresh module."""
    import importlib.util

    path = REPO / relative_path
    name = "_eclipse_script_" + path.with_suffix("").as_posix().replace("/", "_").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_cfg(config_file=None, opts=()):
    """A frozen config with the project's keys, merged from ``config_file`` and ``opts``."""
    from continual.config import setup_cfg

    cfg = setup_cfg(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture
def synthetic_data(tmp_path, monkeypatch):
    """A small generated synthetic dataset under ``tmp_path``, the DETECTRON2_DATASETS of this test."""
    from script_runner import generate_synthetic_root

    generate_synthetic_root(tmp_path, num_train=8, num_val=2, seed=1)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    return tmp_path


def check_results(results, format_failed, sections):
    """Every check of a fixture run passed (the failed ones, formatted, are the message) and every
    one of ``sections`` names some check; returns the checks' names, joined."""
    failed = [r for r in results if not r.ok]
    assert not failed, format_failed(failed)
    names = " ".join(r.name for r in results)
    for section in sections:
        assert section in names, section
    return names


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch

    torch.manual_seed(0)
    yield
