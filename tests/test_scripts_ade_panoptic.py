"""Every ADE20K panoptic scenario script runs its full step sequence (slow)."""
import pytest
import torch

from script_runner import check_full_sequence, generate_official_layouts, run_script, script_variables

pytestmark = pytest.mark.slow
SCRIPTS = ["ade_ps/100_5.sh", "ade_ps/100_10.sh", "ade_ps/100_50.sh",
           "ade_ps/50_10.sh", "ade_ps/50_20.sh", "ade_ps/50_50.sh"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_official_layouts(tmp_path_factory.mktemp("d2data"))


@pytest.fixture(scope="module")
def step0(data_root, tmp_path_factory):
    """Step 0 trained once per base-class count through a script (RUN_STEP0=1, no later step)."""
    paths = {}
    for script in ("ade_ps/100_5.sh", "ade_ps/50_10.sh"):
        out = tmp_path_factory.mktemp("step0")
        res = run_script(script, data_root, out, RUN_STEP0=1, LAST_STEP=0, RUN_EVAL=0)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (path,) = out.glob("*/*/step0/model_final.pth")
        paths[script_variables(script)["BASE"]] = path
    return paths


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_every_step_and_the_final_evaluation(script, data_root, step0, tmp_path):
    base = script_variables(script)["BASE"]
    res = run_script(script, data_root, tmp_path, STEP0_WEIGHTS=step0[base])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_full_sequence(script, tmp_path)


def test_missing_step0_checkpoint_and_data_root_are_reported(data_root, tmp_path):
    res = run_script("ade_ps/100_5.sh", data_root, tmp_path, STEP0_WEIGHTS=tmp_path / "nope.pth")
    assert res.returncode != 0
    assert "STEP0_WEIGHTS" in res.stderr and "RUN_STEP0=1" in res.stderr
    res = run_script("ade_ps/100_5.sh", tmp_path / "no_data", tmp_path)
    assert res.returncode != 0 and "DETECTRON2_DATASETS" in res.stderr and "datasets/README.md" in res.stderr


def test_script_runs_a_swin_backbone_with_order_b(data_root, tmp_path):
    """BACKBONE=swin_t ORDER=b: step 0 and step 1 of 100-5 (a Swin-T shrunk to 24 wide)."""
    from script_runner import OVERRIDES

    extra = (f"{OVERRIDES} CONT.RESULTS_DIR {tmp_path / 'results'} MODEL.SWIN.EMBED_DIM 24 "
             "MODEL.SWIN.DEPTHS [2,2,2,2]")
    res = run_script("ade_ps/100_5.sh", data_root, tmp_path, BACKBONE="swin_t", ORDER="b", RUN_STEP0=1,
                     LAST_STEP=1, RUN_EVAL=0, EXTRA_ARGS=extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "mya-pan_100-5-ov-b" / "adps_100_5_swin_t"
    for step in (0, 1):
        assert (run / f"step{step}" / "model_final.pth").is_file(), step
    state = torch.load(run / "step1" / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" in state
    config = (run / "step1" / "config.yaml").read_text()
    assert "ORDER_NAME: b" in config and "D2SwinTransformer" in config
