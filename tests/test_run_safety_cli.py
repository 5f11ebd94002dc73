"""train_continual.py: one run per step folder, refused runs write nothing, a killed run resumes to
an intact model_final.pth, flags are accepted anywhere, damaged checkpoints are named."""
import hashlib
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import REPO
from script_runner import dataset_env, generate_synthetic_root, run_command, train_command

pytestmark = pytest.mark.slow

SMALL = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
         "SOLVER.MAX_ITER", "2"]
TASK = "syn-pan_6-2-ov"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return generate_synthetic_root(tmp_path_factory.mktemp("d2data"), num_train=12, num_val=2)


def _cmd(out, name, *opts, flags=()):
    return train_command(out, name, *SMALL, *opts, flags=flags)


def _env(data_root):
    return dataset_env(data_root, OMP_NUM_THREADS="1")


def _train(data_root, out, name, *opts, flags=(), check=True):
    return run_command(_cmd(out, name, *opts, flags=flags), _env(data_root), check=check, timeout=900)


def _tree_sha(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _train(data_root, out, "base")
    return out, out / TASK / "base" / "step0"


def test_a_refused_rerun_writes_nothing(trained, data_root):
    out, step = trained
    before = _tree_sha(out)
    res = _train(data_root, out, "base", "SOLVER.BASE_LR", "0.5", "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.2",
                 check=False)
    assert res.returncode != 0
    assert "already trained" in res.stdout + res.stderr and str(step / "model_final.pth") in res.stdout + res.stderr
    assert _tree_sha(out) == before  # config.yaml, log.txt, weights, results: all unchanged


def test_a_second_run_into_a_locked_step_folder_is_refused(trained, data_root):
    from continual.run_lock import RunLock

    out, _ = trained
    folder = out / TASK / "locked" / "step0"
    with RunLock(str(folder)):
        before = _tree_sha(out)
        res = _train(data_root, out, "locked", check=False)
        assert _tree_sha(out) == before
    assert res.returncode != 0
    assert f"in use by process {os.getpid()}" in res.stdout + res.stderr
    assert not (folder / "model_final.pth").exists()


def test_two_runs_at_once_one_trains_the_other_is_refused(trained, data_root):
    out, _ = trained
    procs = [subprocess.Popen(_cmd(out, "twice", "SOLVER.MAX_ITER", "6"), env=_env(data_root), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=60)
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, "\n".join(o[-2000:] for o in outputs)
    refused = outputs[[p.returncode for p in procs].index(codes[1])]
    assert "in use by process" in refused or "already trained" in refused
    rows = (out / "results" / f"{TASK}.csv").read_text().splitlines()
    assert sum(r.startswith("twice,") for r in rows) == 1
    torch.load(out / TASK / "twice" / "step0" / "model_final.pth", weights_only=True)


def test_a_killed_run_resumes_to_an_intact_final_checkpoint(trained, data_root):
    out, _ = trained
    step = out / TASK / "killed" / "step0"
    proc = subprocess.Popen(_cmd(out, "killed", "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "2"),
                            env=_env(data_root), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (step / "last_checkpoint").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    res = _train(data_root, out, "killed", "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "2",
                 flags=["--resume"])
    state = torch.load(step / "model_final.pth", weights_only=True)
    assert state["iteration"] == 39
    assert not (step / "run.lock").exists()
    assert "resumed step 0" in res.stdout + res.stderr or proc.returncode == 0


def test_flags_are_accepted_after_the_overrides(trained, data_root):
    out, step = trained
    # --eval-only after the overrides, and an integer for the float key CONT.DIST.KD_WEIGHT
    run_command(_cmd(out, "base", "CONT.WEIGHTS", str(step / "model_final.pth"), "CONT.DIST.KD_WEIGHT", "10")
                + ["--eval-only"], _env(data_root), timeout=900)
    assert (step / "eval_only" / "eval_results.json").is_file()
    res = run_command(_cmd(out, "base") + ["--resume"], _env(data_root), timeout=900)
    assert "resumed step 0" in res.stdout + res.stderr


def test_a_damaged_previous_step_checkpoint_is_named(trained, data_root, tmp_path):
    out, step = trained
    damaged = tmp_path / "model_final.pth"
    damaged.write_bytes((step / "model_final.pth").read_bytes()[:2000])
    res = _train(data_root, out, "next", "CONT.TASK", "1", "CONT.NUM_PROMPTS", "4", "CONT.WEIGHTS", str(damaged),
                 check=False)
    assert res.returncode != 0
    assert f"cannot read the checkpoint {damaged}" in res.stdout + res.stderr
    res = _train(data_root, out, "base", "CONT.WEIGHTS", str(damaged), flags=["--eval-only"], check=False)
    assert res.returncode != 0 and f"cannot read the checkpoint {damaged}" in res.stdout + res.stderr
