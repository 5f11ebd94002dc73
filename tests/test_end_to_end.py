"""End to end on a generated dataset in the ADE20K-panoptic layout: the synthetic scenario script
(step 0, two ECLIPSE steps, the final evaluation) through the real train_continual.py, frozen base
predictions, resume equivalence and protection of finished steps."""
import hashlib
import json
import os

import pytest
import torch

from conftest import REPO, build_cfg
from script_runner import SYNTHETIC_CONFIG, generate_synthetic_root, run_command, script_env, train_command

pytestmark = pytest.mark.slow

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]
TASK = "syn-pan_6-2-ov"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_synthetic_root(tmp_path_factory.mktemp("d2data"))


def _train(data_root, out, name, *opts, check=True, resume=False, eval_only=False, processes=1):
    flags = ["--num-gpus", str(processes)] if processes > 1 else []
    flags += ["--resume"] if resume else []
    flags += ["--eval-only"] if eval_only else []
    return run_command(train_command(out, name, *SMALL, *opts, flags=flags), script_env(data_root), check=check)


def _step_opts(step):
    return ["CONT.TASK", str(step), "CONT.NUM_PROMPTS", "4", "MODEL.MASK_FORMER.CLASS_WEIGHT", "10.0",
            "CONT.LOGIT_MANI_DELTAS", "[0.4,0.6,0.6]"]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def scenario_run(data_root, tmp_path_factory):
    """The synthetic scenario script, step 0 included, with a few iterations per step."""
    out = tmp_path_factory.mktemp("run")
    extra = " ".join(SMALL + ["CONT.RESULTS_DIR", str(out / "results")])
    run_command(["bash", str(REPO / "script" / "synthetic" / "6_2.sh")],
                script_env(data_root, RUN_STEP0=1, OUTPUT_ROOT=out, STEP0_ITERS=6, ITERS=4, EXTRA_ARGS=extra))
    return out, out / TASK / "syn_6_2"


def test_script_writes_checkpoints_and_results_of_every_step(scenario_run):
    out, run = scenario_run
    for step in range(3):
        assert (run / f"step{step}" / "model_final.pth").is_file()
        results = json.loads((run / f"step{step}" / "eval_results.json").read_text())
        pq = results["panoptic_seg"]
        for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "PQ_base", "PQ_old", "PQ_new", "PQ_novel"):
            assert key in pq
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"0", "1", "2", "2-eval"} <= set(metrics)
    rows = (out / "results" / f"{TASK}.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows] == [["syn_6_2", "0"], ["syn_6_2", "1"], ["syn_6_2", "2"]]
    assert all(r.endswith(",,") for r in rows)
    assert (run / "step2" / "eval_only" / "eval_results.json").is_file()


def test_later_steps_leave_the_base_model_unchanged(scenario_run):
    import mask2former  # noqa: F401
    from detectron2.modeling import build_model

    _, run = scenario_run
    step0 = torch.load(run / "step0" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    step2 = torch.load(run / "step2" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    no_object_head = "sem_seg_head.predictor.class_embed.cls.0."  # shared, re-trained at every step
    for key, value in step0.items():
        if not key.startswith(no_object_head):
            assert torch.equal(value, step2[key]), key

    # base-query predictions (masks and base-class logits) of step 0 are reproduced at step 2
    models = {}
    for step, state in ((0, step0), (2, step2)):
        opts = SMALL + (_step_opts(step) if step else [])
        model = build_model(build_cfg(SYNTHETIC_CONFIG, opts))
        model.load_state_dict(state, strict=False)
        models[step] = model.eval()
    torch.manual_seed(0)
    features = models[0].backbone(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        out0 = models[0].sem_seg_head(features)
        out2 = models[2].sem_seg_head(features)
    q0, c0 = 16, 6
    torch.testing.assert_close(out2["pred_masks"][:, :q0], out0["pred_masks"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out2["pred_logits"][:, :q0, :c0], out0["pred_logits"][:, :, :c0], atol=1e-5, rtol=0)


def test_resumed_step_ends_with_the_same_weights(scenario_run, data_root, tmp_path):
    _, run = scenario_run
    step0 = str(run / "step0" / "model_final.pth")
    opts = _step_opts(1) + ["CONT.WEIGHTS", step0, "SOLVER.MAX_ITER", "7", "SOLVER.CHECKPOINT_PERIOD", "3"]
    _train(data_root, tmp_path, "straight", *opts)
    _train(data_root, tmp_path, "interrupted", *opts)
    # make "interrupted" look like a run killed after iteration 6: only its last periodic checkpoint remains
    step_dir = tmp_path / TASK / "interrupted" / "step1"
    os.remove(step_dir / "model_final.pth")
    (step_dir / "last_checkpoint").write_text("model_0000005.pth")
    res = _train(data_root, tmp_path, "interrupted", *opts, resume=True)
    assert "resumed step 1" in res.stdout + res.stderr

    a = torch.load(tmp_path / TASK / "straight" / "step1" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(step_dir / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_finished_step_is_never_trained_over(scenario_run, data_root):
    out, run = scenario_run
    finals = {step: run / f"step{step}" / "model_final.pth" for step in (0, 1)}
    before = {step: _sha(path) for step, path in finals.items()}
    res = _train(data_root, out, "syn_6_2", *_step_opts(1), check=False)
    assert res.returncode != 0
    assert "already trained" in res.stdout + res.stderr and "CONT.OVERWRITE" in res.stdout + res.stderr
    # neither this step's weights nor those of the step it starts from were touched
    assert {step: _sha(path) for step, path in finals.items()} == before


def test_eval_only_with_a_checkpoint_of_another_step_stops(scenario_run, data_root):
    out, run = scenario_run
    res = _train(data_root, out, "syn_6_2", *_step_opts(2), "CONT.WEIGHTS", str(run / "step1" / "model_final.pth"),
                 eval_only=True, check=False)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "prompt_feat.1.weight" in text and "CONT.TASK 1" in text


def test_two_processes_train_a_prompt_step_with_ddp_on_cpu(scenario_run, data_root, tmp_path):
    _, run = scenario_run
    step0 = run / "step0" / "model_final.pth"
    _train(data_root, tmp_path, "ddp", *_step_opts(1), "CONT.WEIGHTS", str(step0), "SOLVER.MAX_ITER", "2",
           "SOLVER.IMS_PER_BATCH", "4", processes=2)
    before = torch.load(step0, weights_only=True)["model"]
    after = torch.load(tmp_path / TASK / "ddp" / "step1" / "model_final.pth", weights_only=True)["model"]
    assert "sem_seg_head.predictor.prompt_feat.0.weight" in after
    for key, value in before.items():
        if ".class_embed.cls.0." not in key:
            assert torch.equal(value, after[key]), key
    assert (tmp_path / TASK / "ddp" / "step1" / "eval_results.json").is_file()
