"""Every ADE20K semantic and COCO panoptic scenario script runs its full step sequence (slow)."""
import pytest

from script_runner import check_full_sequence, generate_official_layouts, run_script

pytestmark = pytest.mark.slow
SCRIPTS = ["ade_ss/100_5.sh", "ade_ss/100_10.sh", "ade_ss/100_50.sh", "coco_ps/83_5.sh", "coco_ps/83_10.sh"]
STEP0_OF = {"ade_ss": "ade_ss/100_50.sh", "coco_ps": "coco_ps/83_10.sh"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_official_layouts(tmp_path_factory.mktemp("d2data"))


@pytest.fixture(scope="module")
def step0(data_root, tmp_path_factory):
    """Step 0 trained once per benchmark through one of its scripts (RUN_STEP0=1, no later step)."""
    paths = {}
    for bench, script in STEP0_OF.items():
        out = tmp_path_factory.mktemp("step0")
        res = run_script(script, data_root, out, RUN_STEP0=1, LAST_STEP=0, RUN_EVAL=0)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (paths[bench],) = out.glob("*/*/step0/model_final.pth")
    return paths


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_every_step_and_the_final_evaluation(script, data_root, step0, tmp_path):
    res = run_script(script, data_root, tmp_path, STEP0_WEIGHTS=step0[script.split("/")[0]])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_full_sequence(script, tmp_path)


@pytest.mark.parametrize("script,name", [("coco_ps/83_5.sh", "coco-ps_83_5"), ("coco_ps/83_10.sh", "coco-ps_83_10")])
def test_coco_scripts_use_the_official_run_name_and_output_root(script, name):
    # the official COCO scripts write under results/ade_ps with these NAME values; they appear
    # in the results CSV rows and in the run folders
    from script_runner import script_variables

    v = script_variables(script)
    assert v["DEFAULT_NAME"] == name
    assert v["DEFAULT_OUTPUT_ROOT"] == "results/ade_ps"
