"""The joint upper bound (CONT.JOINT): the derived training / evaluation configs, and the
scenario scripts' JOINT=1 on the synthetic benchmark and on a generated ADE20K stand-in."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, build_cfg
from script_runner import dataset_env, generate_synthetic_root, run_command

CONFIG = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"


def _cfg(*opts):
    return build_cfg(CONFIG, ["CONT.JOINT", "True", *opts])


def test_training_config_is_one_step_with_every_class():
    from continual.joint import training_config
    from continual.scenario import Scenario

    cfg = _cfg()
    cfg.TASK_NAME = "syn-pan_6-2-ov"
    train = training_config(cfg)
    assert train.CONT.BASE_CLS == 10 and train.CONT.TASK == 0 and train.TASK_NAME == "syn-pan_6-2-ov-joint"
    assert cfg.CONT.BASE_CLS == 6  # the run's own config is untouched
    scenario = Scenario.from_config(train)
    assert scenario.num_steps == 1 and scenario.classes_of_step(0) == list(range(1, 11))
    assert scenario.label_lut(0, train=True)[1:11].tolist() == list(range(1, 11))


def test_evaluation_config_is_the_last_step_of_the_scenario():
    from continual.evaluation.panoptic import split_bounds
    from continual.joint import evaluation_config
    from continual.scenario import Scenario

    evaluation = evaluation_config(_cfg())
    assert evaluation.CONT.TASK == 2 and evaluation.CONT.BASE_CLS == 6 and evaluation.CONT.INC_CLS == 2
    assert Scenario.from_config(evaluation).label_lut(2, train=False)[1:11].tolist() == list(range(1, 11))
    assert split_bounds(6, 2, 2)["base_end"] == 7  # base = the 6 step-0 classes, novel = the other 4


def test_without_joint_the_configs_are_the_run_config():
    from continual.joint import evaluation_config, training_config

    cfg = build_cfg(CONFIG)
    assert training_config(cfg) is cfg and evaluation_config(cfg) is cfg


@pytest.mark.parametrize("opts,message", [
    (["CONT.TASK", "1"], "CONT.TASK must be 0"),
    (["CONT.NUM_PROMPTS", "4"], "set CONT.NUM_PROMPTS 0"),
])
def test_joint_rejects_continual_settings(opts, message):
    from continual.joint import training_config

    with pytest.raises(ValueError, match=message):
        training_config(_cfg(*opts))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return generate_synthetic_root(tmp_path_factory.mktemp("d2data"))


@pytest.mark.slow
def test_synthetic_script_trains_and_evaluates_the_joint_upper_bound(synthetic_root, tmp_path):
    extra = "INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 64 MODEL.MASK_FORMER.TRAIN_NUM_POINTS 256 " \
            f"CONT.RESULTS_DIR {tmp_path / 'results'}"
    env = dataset_env(synthetic_root, PYTHON=sys.executable, NUM_GPUS="1", OUTPUT_ROOT=tmp_path, JOINT="1",
                      JOINT_ITERS="4", EXTRA_ARGS=extra, OMP_NUM_THREADS="1")
    res = run_command(["bash", str(REPO / "script" / "synthetic" / "6_2.sh")], env)
    assert "== joint upper bound: all 10 classes" in res.stdout
    run = tmp_path / "syn-pan_6-2-ov" / "syn_6_2_joint"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step0"]  # no continual step ran
    pq = json.loads((run / "metrics.json").read_text())["0"]["panoptic_seg"]
    for key in ("PQ", "PQ_base", "PQ_old", "PQ_new", "PQ_novel"):
        assert key in pq
    # the model knows all 10 classes in one group
    import torch

    state = torch.load(run / "step0" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    heads = [k for k in state if k.startswith("sem_seg_head.predictor.class_embed.cls.") and k.endswith("weight")]
    assert max(state[k].shape[0] for k in heads) >= 10
    config = (run / "step0" / "config.yaml").read_text()
    assert "JOINT: true" in config
    rows = (tmp_path / "results" / "syn-pan_6-2-ov.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows] == [["syn_6_2_joint", "0"]]


def _dry_run(tmp_path, script, **env_vars):
    """Run a scenario script with a stand-in interpreter that records its arguments."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    weights = tmp_path / "step0.pth"
    weights.write_bytes(b"")
    env = dict(os.environ, PYTHON=str(fake), DETECTRON2_DATASETS=str(tmp_path), STEP0_WEIGHTS=str(weights),
               LAST_STEP="1", RUN_EVAL="0")
    env.update({k: str(v) for k, v in env_vars.items()})
    res = subprocess.run(["bash", str(REPO / "script" / script)], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("script", ["ade_ps/100_5.sh", "ade_ss/100_10.sh", "coco_ps/83_5.sh"])
@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_scripts_keep_the_official_global_batch_on_any_number_of_gpus(tmp_path, script, gpus):
    from continual.accumulation import accumulation_plan

    (call,) = _dry_run(tmp_path, script, NUM_GPUS=gpus)
    args = call.split()
    assert args[args.index("--num-gpus") + 1] == str(gpus)
    per_device = args[args.index("SOLVER.MAX_IMS_PER_DEVICE") + 1]
    cfg = build_cfg(args[args.index("--config-file") + 1], ["SOLVER.MAX_IMS_PER_DEVICE", per_device])
    # the official global batch (ADE20K panoptic 8, the others 16) was 4 GPUs x the per-device limit
    assert cfg.SOLVER.IMS_PER_BATCH == (8 if script.startswith("ade_ps") else 16) == 4 * int(per_device)
    # micro-batches per step, images per micro-batch: the official per-GPU batch
    assert accumulation_plan(cfg, gpus) == (4 // gpus, int(per_device))


def test_joint_switch_of_the_scripts(tmp_path):
    (call,) = _dry_run(tmp_path, "ade_ps/100_5.sh", JOINT=1)
    args = call.split()
    pairs = dict(zip(args[::1], args[1::1]))
    assert pairs["CONT.JOINT"] == "True" and pairs["CONT.TASK"] == "0" and pairs["CONT.NUM_PROMPTS"] == "0"
    assert pairs["SOLVER.MAX_ITER"] == "160000" and pairs["NAME"] == "adps_100_5_joint"
    assert pairs["CONT.BASE_CLS"] == "100" and pairs["CONT.INC_CLS"] == "5"


@pytest.mark.slow
def test_ade20k_script_runs_the_joint_upper_bound_on_a_stand_in(tmp_path_factory, tmp_path):
    from script_runner import run_script

    sys.path.insert(0, str(REPO / "datasets"))
    from generate_synthetic import generate_ade20k

    root = tmp_path_factory.mktemp("ade")
    generate_ade20k(str(root / "ADEChallengeData2016"), num_train=40, num_val=2, size=64, seed=0)
    res = run_script("ade_ps/100_50.sh", root, tmp_path, JOINT=1, JOINT_ITERS=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    pq = json.loads((tmp_path / "mya-pan_100-50-ov" / "adps_100_50_joint" / "metrics.json").read_text())["0"]
    assert {"PQ", "PQ_base", "PQ_novel"} <= set(pq["panoptic_seg"])
    assert (root / "mya-pan_100-50-ov-joint.npy").is_file()  # its own membership cache


def test_synthetic_benchmark_joint_row():
    from conftest import load_script

    bench = load_script("tools/synthetic_benchmark.py")
    row = bench.joint_row({"0": {"panoptic_seg": {"PQ": 70.0, "PQ_base": 80.0, "PQ_old": 75.0, "PQ_new": 50.0,
                                                  "PQ_novel": 55.0}}})
    assert row == {"base": 80.0, "old": 75.0, "new": 50.0, "all": 70.0}
    lines = bench.format_joint_table(row, 2).splitlines()
    assert lines[0] == "| upper bound (split of step 2) | base | old | new | all |"
    assert lines[2] == "| joint (all classes at once) | 80.0 | 75.0 | 50.0 | 70.0 |"


def test_custom_script_settings(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DATASET_FILE=str(REPO / "docs" / "custom_dataset" / "shapes.yaml"),
               BASE="6", INC="2", CLASS_ORDER="[1,2,3,4,5,6,9,10,7,8]", PRINT_SETTINGS="1", NUM_GPUS="1",
               DETECTRON2_DATASETS=str(tmp_path), PYTHONWARNINGS="ignore")
    res = subprocess.run(["bash", str(REPO / "script" / "custom.sh")], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    settings = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    assert settings["STEPS"] == "2" and settings["NAME"] == "shapes_6_2" and settings["EVAL_DELTAS"] == "[0.4,0.6,0.6]"
    assert "DATASETS.TRAIN (\"shapes_panoptic_train\",)" in settings["VARIANT_OPTS"]
    assert "CONT.ORDER [1,2,3,4,5,6,9,10,7,8]" in settings["VARIANT_OPTS"]
    res = subprocess.run(["bash", str(REPO / "script" / "custom.sh")], cwd=REPO, env=dict(env, INC="3"),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "10 - BASE=6 is not a multiple of INC=3" in res.stderr


@pytest.mark.slow
def test_synthetic_benchmark_with_the_joint_row(tmp_path):
    """tools/synthetic_benchmark.py --joint (quick): the joint run and its table in the summary."""
    res = subprocess.run([sys.executable, str(REPO / "tools" / "synthetic_benchmark.py"), "--quick", "--joint",
                          "--skip-baseline", "--num-vis", "0", "--threads", "1", "--output", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["joint"]) == {"base", "old", "new", "all"}
    assert "| joint (all classes at once) |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "runs" / "syn-pan_6-2-ov" / "all_classes_joint" / "step0" / "model_final.pth").is_file()
