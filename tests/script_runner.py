"""Running the scenario scripts (script/**/*.sh) on generated stand-ins of ADE20K and COCO in the
official layouts, with the tiny model of tests/tiny_model_overrides.txt; running train_continual.py
(or another entry point) on the generated synthetic dataset and the tiny synthetic config."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = next(
    line for line in (REPO / "tests" / "tiny_model_overrides.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
)


SYNTHETIC_CONFIG = REPO / "configs" / "synthetic" / "maskformer2_R18_tiny.yaml"


def generate_synthetic_root(root: Path, folder: str = "synthetic", num_train: int = 24, num_val: int = 4,
                            size: int = 64, seed: int = 0) -> Path:
    """A generated synthetic dataset in ``root / folder``; returns ``root`` (the DETECTRON2_DATASETS)."""
    sys.path.insert(0, str(REPO / "datasets"))
    from generate_synthetic import generate

    generate(str(root / folder), num_train=num_train, num_val=num_val, size=size, seed=seed)
    return root


def dataset_env(data_root: Path, **extra) -> dict:
    """The environment of a run on the datasets under ``data_root``, warnings off, plus ``extra``."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root), PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script_env(data_root: Path, **extra) -> dict:
    """:func:`dataset_env` for a scenario script (or train_continual.py) run with this Python on one GPU."""
    return dataset_env(data_root, PYTHON=sys.executable, NUM_GPUS="1", **extra)


def train_command(out: Path, name: str, *opts, flags=(), config: Path = SYNTHETIC_CONFIG,
                  entry: str = "train_continual.py") -> list:
    """``entry`` (a path in the repository) on ``config``, writing under ``out``: the flags, then the
    output, run name and results folder, then ``opts``."""
    return [sys.executable, str(REPO / entry), "--config-file", str(config), *flags,
            "OUTPUT_DIR", str(out), "NAME", name, "CONT.RESULTS_DIR", str(out / "results"), *opts]


def run_command(cmd: list, env: dict, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` in the repository root, output captured; with ``check`` it must succeed (the ends of
    its output are the failure message)."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, **kwargs)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def generate_official_layouts(root: Path) -> Path:
    """ADEChallengeData2016/ and coco/ stand-ins under ``root`` (the DETECTRON2_DATASETS)."""
    sys.path.insert(0, str(REPO / "datasets"))
    from generate_synthetic import generate_ade20k, generate_coco

    generate_ade20k(str(root / "ADEChallengeData2016"), num_train=40, num_val=2, size=64, seed=0)
    generate_coco(str(root / "coco"), num_train=40, num_val=2, size=64, seed=0)
    return root


def script_variables(script: str) -> dict:
    """The ``NAME=value`` assignments of a scenario script (BASE, INC, STEPS, ...)."""
    values = {}
    for line in (REPO / "script" / script).read_text().splitlines():
        for part in line.split(";"):
            part = part.strip()
            if "=" in part and not part.startswith(("#", "source", "export")) and " " not in part.split("=")[0]:
                key, value = part.split("=", 1)
                values[key] = value.strip("'\"")
    return values


def run_script(script: str, data_root: Path, out: Path, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root), PYTHON=sys.executable, NUM_GPUS="1",
               OUTPUT_ROOT=str(out), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               EXTRA_ARGS=f"{OVERRIDES} CONT.RESULTS_DIR {out / 'results'}")
    env.update({k: str(v) for k, v in env_vars.items()})
    return subprocess.run(["bash", str(REPO / "script" / script)], cwd=REPO, env=env,
                          capture_output=True, text=True)


def check_full_sequence(script: str, out: Path) -> None:
    """Every step 1..STEPS trained and evaluated, then the final evaluation; results files."""
    v = script_variables(script)
    steps = int(v["STEPS"])
    runs = list(out.glob(f"*/{v['DEFAULT_NAME']}"))
    assert len(runs) == 1, runs
    run = runs[0]
    for step in range(1, steps + 1):
        assert (run / f"step{step}" / "model_final.pth").is_file(), step
    metrics = json.loads((run / "metrics.json").read_text())
    assert {str(s) for s in range(1, steps + 1)} | {f"{steps}-eval"} <= set(metrics)
    kind = "sem_seg" if "/ade_ss/" in f"/{script}" else "panoptic_seg"
    final = metrics[f"{steps}-eval"][kind]
    split_keys = ("mIoU", "mIoU_base", "mIoU_old", "mIoU_new", "mIoU_novel") if kind == "sem_seg" else \
        ("PQ", "PQ_base", "PQ_old", "PQ_new", "PQ_novel")
    assert set(split_keys) <= set(final)
    csv = out / "results" / f"{run.parent.name}.csv"
    rows = [r for r in csv.read_text().splitlines() if r.startswith(v["DEFAULT_NAME"] + ",")]
    assert [int(r.split(",")[1]) for r in rows] == list(range(1, steps + 1))
