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


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch

    torch.manual_seed(0)
    yield
