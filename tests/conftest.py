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


def build_cfg(config_file=None, opts=()):
    """A frozen config with the project's keys, merged from ``config_file`` and ``opts``."""
    from detectron2.config import get_cfg

    from continual.config import add_continual_config
    from mask2former.config import add_maskformer2_config

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_continual_config(cfg)
    if config_file:
        cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture(autouse=True)
def _deterministic_threads():
    import torch

    torch.manual_seed(0)
    yield
