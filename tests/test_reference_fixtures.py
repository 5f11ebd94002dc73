"""The whole model against the official implementation's recorded outputs (tests/fixtures)."""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REFERENCE_FIXTURES, REPO
from continual.reference_check import format_table, run_checks


def test_fixtures_are_present():
    names = {p.name for p in REFERENCE_FIXTURES}
    assert {"ade_ps_t0_panoptic", "ade_ss_t0_semantic_frozenbn", "ade_ps_t3_deltas_pos",
            "ade_ps_t3_all_outputs"} <= names


@pytest.mark.parametrize("fixture", REFERENCE_FIXTURES, ids=lambda p: p.name)
def test_every_recorded_output_is_reproduced(fixture):
    torch.set_num_threads(1)
    results = run_checks(str(fixture))
    failed = [r for r in results if not r.ok]
    assert not failed, format_table(failed)
    names = " ".join(r.name for r in results)
    # every section of the fixture was actually compared
    for section in ("state-dict keys", "pixel decoder", "raw class logits", "post-processing",
                    "matcher indices", "total loss", "grad "):
        assert section in names, section
    if (fixture / "copy_init.pt").exists():
        assert "step initialisation" in names


def test_cli_passes_on_a_fixture_and_fails_on_a_tampered_copy(tmp_path):
    fixture = REPO / "tests" / "fixtures" / "ade_ps_t3_deltas_pos"
    ok = subprocess.run([sys.executable, "tools/check_reference.py", str(fixture)], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 failed" in ok.stdout

    bad = tmp_path / "tampered"
    shutil.copytree(fixture, bad)
    inference = torch.load(bad / "inference.pt", weights_only=True)
    inference["decoder_out"]["pred_logits"] = inference["decoder_out"]["pred_logits"].clone() + 1e-3
    torch.save(inference, bad / "inference.pt")
    failed = subprocess.run([sys.executable, "tools/check_reference.py", str(bad)], cwd=REPO,
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert "FAIL" in failed.stdout and "pred_logits" in failed.stdout


def test_cli_rejects_a_folder_without_manifest(tmp_path):
    res = subprocess.run([sys.executable, "tools/check_reference.py", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "no manifest.json" in res.stderr
