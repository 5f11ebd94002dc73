"""tools/synthetic_benchmark.py (``make demo``): the summary (table, checks, plot) from hand-made
metrics files, the stage progress, and the whole pipeline in its ``--quick`` form."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO, load_script

bench = load_script("tools/synthetic_benchmark.py")


def _pq(base, old, new, total):
    return {"panoptic_seg": {"PQ": total, "PQ_base": base, "PQ_old": old, "PQ_new": new, "PQ_novel": new,
                             "SQ": 80.0, "RQ": 50.0}}


def test_summary_table_checks_and_plot(tmp_path):
    eclipse = {"0": _pq(60.0, 60.0, 60.0, 60.0), "1": _pq(59.0, 59.0, 30.0, 52.0),
               "2": _pq(58.5, 55.0, 20.0, 48.0), "2-eval": _pq(58.0, 55.0, 21.0, 47.5)}
    finetune = {"1": _pq(10.0, 10.0, 40.0, 17.5), "2": _pq(2.0, 5.0, 45.0, 11.0)}
    comformer = {"1": _pq(40.0, 40.0, 20.0, 34.0), "2": _pq(30.0, 30.0, 15.0, 25.5)}
    for name, metrics in (("e", eclipse), ("f", finetune), ("c", comformer)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    costs = {("e", 0): (1000, 0.15, 900.0), ("e", 1): (30, 0.05, 700.0), ("f", 1): (1010, 0.151, 910.0),
             ("c", 2): (1020, 0.2104, 1200.4)}
    for (name, step), (params, seconds, mb) in costs.items():
        (tmp_path / name / f"step{step}").mkdir()
        (tmp_path / name / f"step{step}" / "training_costs.json").write_text(json.dumps(
            {"trainable_parameters": params, "seconds_per_iteration": seconds, "peak_rss_mb": mb}))

    summary = bench.summarize(str(tmp_path / "e" / "metrics.json"), str(tmp_path / "f" / "metrics.json"),
                              str(tmp_path), str(tmp_path / "c" / "metrics.json"))
    table = summary["table"]
    assert table["0"]["eclipse"] == {"base": 60.0, "old": None, "new": None, "all": 60.0}
    assert table["0"]["finetune"] == table["0"]["eclipse"]  # same step-0 checkpoint
    assert table["1"]["eclipse"] == {"base": 59.0, "old": 59.0, "new": 30.0, "all": 52.0}
    assert table["2"]["eclipse"] == {"base": 58.0, "old": 55.0, "new": 21.0, "all": 47.5}  # the final evaluation
    assert table["2"]["finetune"] == {"base": 2.0, "old": 5.0, "new": 45.0, "all": 11.0}
    assert table["0"]["comformer"] == table["0"]["eclipse"]
    assert summary["costs"]["0"]["comformer"]["trainable_parameters"] == 1000  # step 0 is shared
    lines = summary["markdown"].splitlines()
    assert lines[0] == ("| method | step | PQ base | PQ old | PQ new | PQ all | trainable params | s / iter | "
                        "peak MB |")
    assert lines[2] == "| ECLIPSE | 0 | 60.0 | - | - | 60.0 | 1,000 | 0.150 | 900 |"
    assert lines[3] == "| ECLIPSE | 1 | 59.0 | 59.0 | 30.0 | 52.0 | 30 | 0.050 | 700 |"
    assert lines[4] == "| ECLIPSE | 2 | 58.0 | 55.0 | 21.0 | 47.5 | - | - | - |"
    assert lines[5] == "| fine-tuning | 0 | 60.0 | - | - | 60.0 | 1,000 | 0.150 | 900 |"
    assert lines[6] == "| fine-tuning | 1 | 10.0 | 10.0 | 40.0 | 17.5 | 1,010 | 0.151 | 910 |"
    assert lines[10] == "| CoMFormer | 2 | 30.0 | 30.0 | 15.0 | 25.5 | 1,020 | 0.210 | 1200 |"
    assert json.loads((tmp_path / "summary.json").read_text())["costs"]["2"]["comformer"]["peak_rss_mb"] == 1200.4
    checks = summary["checks"]
    assert [c["value"] for c in checks] == [2.0, 21.0, 56.0]
    assert all(c["passed"] for c in checks)
    with Image.open(tmp_path / "pq_across_steps.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    assert json.loads((tmp_path / "summary.json").read_text())["markdown"] == summary["markdown"]


def test_trained_numbers_when_there_is_no_final_evaluation():
    metrics = {"0": _pq(60.0, 60.0, 1.0, 40.0), "1": _pq(50.0, 50.0, 10.0, 30.0), "1-eval": _pq(1, 1, 1, 1)}
    assert bench.method_pq(metrics, prefer_eval=False)[1]["base"] == 50.0
    assert bench.method_pq(metrics)[1]["base"] == 1.0
    assert bench.method_pq({"0": {"panoptic_seg": {"PQ": 5.0, "PQ_base": float("nan")}}})[0] == {
        "base": None, "old": None, "new": None, "all": 5.0}


def test_checks_fail_on_forgetting_and_leave_out_the_missing_baseline():
    table = bench.combine_methods({0: {"base": 60.0, "old": None, "new": None, "all": 60.0},
                                   2: {"base": 40.0, "old": 40.0, "new": 1.0, "all": 31.0}}, None)
    checks = bench.acceptance_checks(table)
    assert [c["passed"] for c in checks] == [False, False]
    text = bench.format_table(table)
    assert "fine-tuning" not in text and "| ECLIPSE | 2 | 40.0 | 40.0 | 1.0 | 31.0 |" in text


def test_progress_reports_stages_with_elapsed_and_eta():
    out = io.StringIO()
    stages = [bench.Stage("a", "first", 10.0), bench.Stage("b", "second", 30.0)]
    progress = bench.Progress(stages, stream=out)
    progress.begin("a")
    progress.update(0.5, "iter 5/10")
    progress.begin("b")  # finishes "a"
    progress.report("iter 1/3", force=True)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[stage 1/2] first | elapsed 0:00 | ETA 0:40")
    assert lines[-1].startswith("[stage 2/2] second | iter 1/3 | elapsed ")
    assert stages[0].end is not None and stages[0].fraction == 1.0
    assert 0 < progress.eta() <= 30.0 + 1


@pytest.mark.slow
def test_quick_run_of_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, str(REPO / "tools" / "synthetic_benchmark.py"), "--quick", "--output",
                          str(out), "--num-vis", "2", "--threads", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in range(1, 11):
        assert f"[stage {stage}/10]" in res.stdout
    assert "ETA" in res.stdout and "| method | step | PQ base" in res.stdout and "| CoMFormer | 2 |" in res.stdout

    run = out / "runs" / "syn-pan_6-2-ov"
    eclipse = json.loads((run / "eclipse" / "metrics.json").read_text())
    finetune = json.loads((run / "finetune" / "metrics.json").read_text())
    comformer = json.loads((run / "comformer" / "metrics.json").read_text())
    assert {"0", "1", "2", "2-eval"} <= set(eclipse) and set(finetune) == set(comformer) == {"1", "2"}
    rows = list(csv.reader((out / "results" / "syn-pan_6-2-ov.csv").read_text().splitlines()))
    assert [r[:2] for r in rows] == [["eclipse", "0"], ["eclipse", "1"], ["eclipse", "2"],
                                    ["finetune", "1"], ["finetune", "2"], ["comformer", "1"], ["comformer", "2"]]
    config = (run / "comformer" / "step2" / "config.yaml").read_text()
    assert "NUM_PROMPTS: 0" in config and "KD_WEIGHT: 10.0" in config and "PSEUDO: true" in config
    # fine-tuning trained the whole model (no prompts), ECLIPSE only its prompts
    assert (run / "eclipse" / "step2" / "config.yaml").read_text().count("NUM_PROMPTS: 4") == 1
    assert "NUM_PROMPTS: 0" in (run / "finetune" / "step2" / "config.yaml").read_text()

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["table"]) == {"0", "1", "2"} and summary["quick"] is True
    for method in ("eclipse", "finetune", "comformer"):
        for step in ("1", "2"):
            costs = summary["costs"][step][method]
            assert costs["trainable_parameters"] > 0 and costs["seconds_per_iteration"] > 0 and costs["peak_rss_mb"] > 0
    # ECLIPSE trains a small part of the model, the baselines all of it
    assert summary["costs"]["2"]["eclipse"]["trainable_parameters"] < summary["costs"]["2"]["finetune"]["trainable_parameters"]
    assert summary["costs"]["2"]["comformer"]["trainable_parameters"] == summary["costs"]["2"]["finetune"]["trainable_parameters"]
    assert (out / "pq_across_steps.png").is_file() and (out / "summary.md").is_file()
    compares = sorted((out / "vis").glob("compare_*.png"))
    assert len(compares) == 2
    for method in ("eclipse", "finetune", "comformer"):
        assert len(list((out / "vis" / method).glob("*_panoptic.png"))) == 2
        assert len(list((out / "vis" / method).glob("*.json"))) == 2
    assert json.loads((out / "data" / "synthetic" / bench.DATA_STAMP).read_text())["num_train"] == 16


def test_a_new_run_keeps_the_earlier_one(tmp_path):
    out = tmp_path / "demo"
    (out / "runs" / "t" / "eclipse" / "step0").mkdir(parents=True)
    (out / "runs" / "t" / "eclipse" / "step0" / "model_final.pth").write_text("trained")
    (out / "summary.md").write_text("old table")
    (out / "data" / "synthetic").mkdir(parents=True)

    moved = bench.set_aside_previous_run(str(out), stamp="20260101-000000")
    assert moved == str(out / "previous" / "20260101-000000")
    assert (out / "previous" / "20260101-000000" / "runs" / "t" / "eclipse" / "step0" / "model_final.pth").read_text() == "trained"
    assert (out / "previous" / "20260101-000000" / "summary.md").read_text() == "old table"
    assert not (out / "runs").exists() and not (out / "summary.md").exists()
    assert (out / "data" / "synthetic").is_dir()  # the data are reused, not moved
    assert bench.set_aside_previous_run(str(out)) is None  # nothing left to move

    (out / "runs").mkdir()  # same second again: a second folder, nothing replaced
    assert bench.set_aside_previous_run(str(out), stamp="20260101-000000").endswith("20260101-000000_1")
    (out / "vis").mkdir()
    assert bench.set_aside_previous_run(str(out), delete=True) is None
    assert not (out / "vis").exists() and (out / "previous" / "20260101-000000").is_dir()


def test_opts_reach_every_training_and_evaluation_command(tmp_path, monkeypatch):
    """``--opts KEY VALUE ...`` ends up on every train_continual.py command of 6_2.sh (step 0, the
    ECLIPSE steps, the final evaluation): the real script runs with a stub interpreter that only
    records its arguments (no training)."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {calls}
if [ "$2" = continual.config ]; then d={tmp_path}/step; mkdir -p "$d"; touch "$d/model_final.pth"; echo "$d"; fi
""")
    stub.chmod(0o755)

    class Stop(Exception):
        pass

    real_run_script = bench.run_script

    def run_once(env, *args):
        real_run_script(env, *args)
        raise Stop  # the ECLIPSE run is all this test needs (no metrics to summarise)

    monkeypatch.setattr(bench, "ensure_data", lambda root, *a: os.makedirs(os.path.join(root, "synthetic")))
    monkeypatch.setattr(bench, "run_script", run_once)
    with pytest.raises(Stop):
        bench.main(["--output", str(tmp_path / "out"), "--skip-baseline", "--num-vis", "0", "--threads", "1",
                    "--python", str(stub),
                    "--opts", "MODEL.CPU_BF16", "True", "SOLVER.AMP.ENABLED", "False"])
    commands = [line for line in calls.read_text().splitlines() if "train_continual.py" in line]
    assert len(commands) == 4  # step 0, steps 1 and 2, final evaluation
    assert sum("--eval-only" in c for c in commands) == 1
    for command in commands:
        assert command.endswith("MODEL.CPU_BF16 True SOLVER.AMP.ENABLED False")

    for bad in (["MODEL.CPU_BF16"], ["CONT.LOGIT_MANI_DELTAS", "[0.4, 0.6]"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--opts"] + bad)
    assert bench.parse_args([]).opts == []
