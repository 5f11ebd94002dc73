"""The whole model against the official implementation's recorded outputs (tests/fixtures)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REFERENCE_FIXTURES, REPO, check_results
from continual.reference_check import format_table, load_fixture_config, run_checks


def test_fixtures_are_present():
    names = {p.name for p in REFERENCE_FIXTURES}
    assert {"ade_ps_t0_panoptic", "ade_ss_t0_semantic_frozenbn", "ade_ps_t3_deltas_pos",
            "ade_ps_t3_all_outputs"} <= names


@pytest.mark.parametrize("fixture", REFERENCE_FIXTURES, ids=lambda p: p.name)
def test_every_recorded_output_is_reproduced(fixture):
    torch.set_num_threads(1)
    # every section of the fixture was actually compared
    names = check_results(run_checks(str(fixture)), format_table,
                          ("state-dict keys", "pixel decoder", "raw class logits", "post-processing",
                           "matcher indices", "total loss", "grad "))
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


def _no_obj_mlp_variant(src, dst, newest_grad):
    """A copy of a step > 0 fixture as the official code records it with
    ``CONT.PROMPT_NO_OBJ_MLP True``: the per-step no-object heads are added, the newest one is
    trainable instead of ``cls.0``, and its recorded gradient is ``newest_grad`` ("zeros" or None).
    The recorded outputs stay valid: the fixture's deltas are all positive, so at inference the
    heads' no-object logits are overwritten, and in training they write into empty row ranges."""
    shutil.copytree(src, dst)
    cfg_text = (dst / "config.yaml").read_text()
    assert "PROMPT_NO_OBJ_MLP: false" in cfg_text
    (dst / "config.yaml").write_text(cfg_text.replace("PROMPT_NO_OBJ_MLP: false", "PROMPT_NO_OBJ_MLP: true"))
    from detectron2.modeling import build_model

    torch.manual_seed(1)
    model = build_model(load_fixture_config(str(dst)))
    ref = torch.load(dst / "model_head.pth", weights_only=True)["model"]
    state = {k: ref.get(k, v) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    torch.save({"model": state}, dst / "model_head.pth")

    manifest = json.loads((dst / "manifest.json").read_text())
    newest = max(int(k.split(".")[3]) for k in state if ".prompt_no_obj_embed." in k)
    head_prefix = f"sem_seg_head.predictor.prompt_no_obj_embed.{newest}."
    new_names = [k for k in state if k.startswith(head_prefix)]
    names = [n for n in manifest["trainable_parameter_names"] if ".class_embed.cls.0." not in n]
    manifest["trainable_parameter_names"] = names + new_names
    (dst / "manifest.json").write_text(json.dumps(manifest))

    train = torch.load(dst / "train.pt", weights_only=True)
    grads = {k: v for k, v in train["grads"].items() if ".class_embed.cls.0." not in k}
    for k in new_names:
        n = state[k].numel()
        grads[k] = None if newest_grad is None else {
            "shape": list(state[k].shape), "stride": 1, "values": torch.zeros(n), "norm": 0.0}
    train["grads"] = grads
    torch.save(train, dst / "train.pt")
    return new_names


def test_prompt_no_obj_mlp_heads_get_a_zero_gradient_not_none(tmp_path):
    torch.set_num_threads(1)
    fixture = REPO / "tests" / "fixtures" / "ade_ps_t3_deltas_pos"
    names = _no_obj_mlp_variant(fixture, tmp_path / "zeros", newest_grad="zeros")
    results = run_checks(str(tmp_path / "zeros"))
    failed = [r for r in results if not r.ok]
    assert not failed, format_table(failed)
    checked = {r.name for r in results}
    assert all(f"grad {n}" in checked for n in names)

    # a recorded None is "no gradient": our zero gradient must not pass for it
    _no_obj_mlp_variant(fixture, tmp_path / "none", newest_grad=None)
    failed = {r.name for r in run_checks(str(tmp_path / "none")) if not r.ok}
    assert failed == {f"grad {n}" for n in names}
