#!/usr/bin/env python
"""The synthetic continual benchmark, end to end: ECLIPSE vs. fine-tuning vs. CoMFormer on the
6-2 scenario, with PQ and training costs.

    python tools/synthetic_benchmark.py [--output output/demo] [--quick] [--skip-baseline]
                                        [--data-root DIR] [--threads N] [--num-vis K] ...

What it does (this is ``make demo``):

1. generates the synthetic dataset (10 classes, ``datasets/generate_synthetic.py``) under
   ``--data-root`` (default ``<output>/data``) unless the same dataset is already there;
2. runs ``script/synthetic/6_2.sh`` (6 base classes, then 2 steps of 2) through the real
   ``train_continual.py``: step 0, the ECLIPSE steps 1 and 2 (frozen model, new prompts) with an
   evaluation after each, and the final evaluation with the evaluation deltas (run ``eclipse``);
3. runs the same script as the **fine-tuning baseline** (``METHOD=ft``, run ``finetune``) and as
   **CoMFormer** (``METHOD=comformer``, run ``comformer``: fine-tuning regularised by the frozen
   previous model, pseudo-labels and unbiased KD): steps 1 and 2 from the same step-0 checkpoint
   with ``CONT.NUM_PROMPTS 0``, the whole model trained (``--skip-baseline`` leaves both out);
   With ``--joint`` it also trains the **joint upper bound** (``JOINT=1``, run
   ``all_classes_joint``): one model on all 10 classes at once, evaluated with the split of the
   last step;
4. prints a table per method and step of PQ base / old / new / all and the training costs
   (trainable parameters, seconds per training iteration, peak memory; from each step's
   ``training_costs.json``), checks the expected behaviour (ECLIPSE keeps its base PQ and
   learns the new classes, fine-tuning forgets the base classes), plots PQ across steps and
   draws the predictions of the final models on a few validation images (``tools/demo.py``).

Progress is printed per stage with the elapsed time and an ETA; the full output of every command
goes to ``<output>/logs/``. Outputs in ``--output``:

    summary.md / summary.json      the table, the checks and the settings
    pq_across_steps.png            PQ base / new / all across steps, both methods
    vis/compare_<image>.png        image | ground truth | ECLIPSE | fine-tuning | CoMFormer
    vis/eclipse/, vis/finetune/,   tools/demo.py overlays and segments JSON of each model
    vis/comformer/
    runs/<task>/<run>/metrics.json every metric of every step (written by the trainer)
    runs/<task>/<run>/step<t>/     checkpoints, config.yaml, log.txt, eval_results.json
    results/<task>.csv             the official CSV rows
    data/synthetic/                the generated dataset (reused when it matches)

A new run moves the outputs of an earlier one in the same folder (everything above but the data)
to ``<output>/previous/<date-time>/``; ``--overwrite`` deletes them instead.
``--quick`` runs the same pipeline on a tiny dataset with a few iterations (a smoke test; its
numbers mean nothing).
"""
import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # before pyplot: files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from panopticapi.utils import rgb2id  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import demo  # noqa: E402  (tools/demo.py)
from continual.costs import COSTS_FILE  # noqa: E402
from continual.evaluation.results import read_metrics_json  # noqa: E402

SCRIPT = os.path.join(REPO_ROOT, "script", "synthetic", "6_2.sh")
GENERATOR = os.path.join(REPO_ROOT, "datasets", "generate_synthetic.py")
TASK_NAME = "syn-pan_6-2-ov"
ECLIPSE_NAME = "eclipse"
FINETUNE_NAME = "finetune"
COMFORMER_NAME = "comformer"
#: the methods of the table, in order: (key = run name, label)
METHODS = (("eclipse", "ECLIPSE"), ("finetune", "fine-tuning"), ("comformer", "CoMFormer"))
COST_KEYS = ("trainable_parameters", "seconds_per_iteration", "peak_rss_mb")
JOINT_NAME = "all_classes"  # the scripts append _joint: runs/<task>/all_classes_joint
SPLITS = ("base", "old", "new", "all")
_METRIC_KEYS = {"base": "PQ_base", "old": "PQ_old", "new": "PQ_new", "all": "PQ"}
DATA_STAMP = ".benchmark_data.json"

#: dataset and run settings; ``None`` = the value of script/synthetic/6_2.sh
PRESETS: Dict[str, Dict] = {
    # the baselines (fine-tuning, CoMFormer): 200 iterations of the whole model each, at the
    # step-0 LR (None), to keep the whole benchmark within its time budget; the joint upper
    # bound (--joint, off by default): None = step 0's iterations (with 500 the tiny model had
    # not learned the thing classes yet: no upper bound)
    "full": dict(num_train=300, num_val=100, size=128, max_things=4, step0_iters=None, iters=None,
                 finetune_iters=200, finetune_lr=None, joint_iters=None, extra=[]),
    "quick": dict(num_train=16, num_val=4, size=64, max_things=4, step0_iters=6, iters=4,
                  finetune_iters=4, finetune_lr=None, joint_iters=6,
                  extra=["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                         "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256"]),
}

# Acceptance thresholds of the benchmark (README, "Results on the synthetic benchmark")
MAX_BASE_DROP = 3.0  # ECLIPSE: final base PQ at most this far below its step-0 base PQ
MIN_NEW_PQ = 10.0  # ECLIPSE: PQ of the classes of the last step clearly above zero
MIN_FORGETTING_GAP = 10.0  # fine-tuning's final base PQ at least this far below ECLIPSE's

logger = logging.getLogger("synthetic_benchmark")


# =============================================================================================
# results: table, checks, plot (pure functions of the metrics files; tested on hand-made ones)
# =============================================================================================
def step_keys(metrics: Mapping[str, Mapping]) -> List[int]:
    """The trained steps of a metrics.json (keys "0", "1", ...), sorted."""
    return sorted(int(k) for k in metrics if k.isdigit())


def method_pq(metrics: Mapping[str, Mapping], prefer_eval: bool = True) -> Dict[int, Dict[str, float]]:
    """``{step: {"base", "old", "new", "all"}}`` (PQ in percent) from a run's ``metrics.json``.

    A step's numbers are those of its final evaluation ``"<t>-eval"`` when it exists and
    ``prefer_eval``, else those written after training step ``t``. At step 0, "old" and "new" are
    ``None`` (no earlier step, no new classes); ``None`` also stands for a missing value.
    """
    out = {}
    for step in step_keys(metrics):
        entry = metrics.get(f"{step}-eval") if prefer_eval and f"{step}-eval" in metrics else metrics[str(step)]
        pq = entry.get("panoptic_seg", entry) if isinstance(entry, Mapping) else {}
        row = {split: _number(pq.get(key)) for split, key in _METRIC_KEYS.items()}
        if step == 0:
            row["old"] = row["new"] = None
        out[step] = row
    return out


def _number(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def combine_methods(eclipse: Mapping[int, Mapping], finetune: Optional[Mapping[int, Mapping]],
                    comformer: Optional[Mapping[int, Mapping]] = None) -> Dict[int, Dict]:
    """Per step ``{"eclipse": row, "finetune": row, "comformer": row}`` (a method that did not run
    is left out); the baselines share step 0 with ECLIPSE (they start from the same checkpoint),
    so their step 0 is ECLIPSE's when they have none of their own. Works for any per-step rows
    (PQ or costs)."""
    others = {"finetune": finetune, "comformer": comformer}
    steps = sorted(set(eclipse).union(*[set(v) for v in others.values() if v]))
    table = {}
    for step in steps:
        table[step] = {"eclipse": eclipse.get(step)}
        for key, rows in others.items():
            if rows is None:
                continue
            row = rows.get(step)
            if row is None and step == 0:
                row = eclipse.get(0)
            table[step][key] = row
    return table


def method_costs(run_dir: str) -> Dict[int, Dict]:
    """``{step: {trainable_parameters, seconds_per_iteration, peak_rss_mb, ...}}`` from the
    ``step<t>/training_costs.json`` files of one run (steps without the file are left out)."""
    costs = {}
    if not os.path.isdir(run_dir):
        return costs
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"step(\d+)", name)
        path = os.path.join(run_dir, name, COSTS_FILE)
        if m and os.path.isfile(path):
            with open(path) as f:
                costs[int(m.group(1))] = json.load(f)
    return costs


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt_cost(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "trainable_parameters":
        return f"{int(value):,}"
    if key == "seconds_per_iteration":
        return f"{value:.3f}"
    return f"{value:.0f}"


def format_table(table: Mapping[int, Mapping], costs: Optional[Mapping[int, Mapping]] = None) -> str:
    """A Markdown table: one row per method and step, PQ base / old / new / all and, with
    ``costs`` (same layout as ``table``), trainable parameters, seconds per training iteration and
    peak memory (MB) of training that step."""
    methods = [(k, label) for k, label in METHODS if any(k in row for row in table.values())]
    header = ["method", "step"] + [f"PQ {split}" for split in SPLITS]
    if costs is not None:
        header += ["trainable params", "s / iter", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in methods:
        for step, row in sorted(table.items()):
            values = row.get(key) or {}
            cells = [label, str(step)] + [_fmt(values.get(split)) for split in SPLITS]
            if costs is not None:
                c = ((costs.get(step) or {}).get(key)) or {}
                cells += [_fmt_cost(k, c.get(k)) for k in COST_KEYS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acceptance_checks(table: Mapping[int, Mapping]) -> List[Dict]:
    """The benchmark's expectations on the last step: ECLIPSE keeps its base PQ (within
    ``MAX_BASE_DROP`` of step 0), learns the new classes (PQ new >= ``MIN_NEW_PQ``), and
    fine-tuning forgets (its base PQ >= ``MIN_FORGETTING_GAP`` below ECLIPSE's). Each check:
    ``{"name", "value", "threshold", "passed"}``; checks without data are left out."""
    if not table:
        return []
    last = max(table)
    checks = []
    first_e, last_e = (table.get(0) or {}).get("eclipse"), table[last].get("eclipse")
    if first_e and last_e and last > 0 and None not in (first_e["base"], last_e["base"]):
        drop = first_e["base"] - last_e["base"]
        checks.append({"name": f"ECLIPSE base PQ drop, step 0 -> step {last}", "value": round(drop, 2),
                       "threshold": f"<= {MAX_BASE_DROP}", "passed": drop <= MAX_BASE_DROP})
    if last_e and last > 0 and last_e["new"] is not None:
        checks.append({"name": f"ECLIPSE new-class PQ at step {last}", "value": round(last_e["new"], 2),
                       "threshold": f">= {MIN_NEW_PQ}", "passed": last_e["new"] >= MIN_NEW_PQ})
    last_f = table[last].get("finetune")
    if last_e and last_f and last > 0 and None not in (last_e["base"], last_f["base"]):
        gap = last_e["base"] - last_f["base"]
        checks.append({"name": f"base PQ of ECLIPSE minus fine-tuning at step {last}", "value": round(gap, 2),
                       "threshold": f">= {MIN_FORGETTING_GAP}", "passed": gap >= MIN_FORGETTING_GAP})
    return checks


def plot_pq(table: Mapping[int, Mapping], path: str, title: str = "Synthetic 6-2: PQ across steps") -> str:
    """Plot PQ base / new / all across steps (ECLIPSE solid, fine-tuning dashed) into ``path``."""
    steps = sorted(table)
    colors = {"base": "tab:blue", "new": "tab:orange", "all": "tab:green"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for method, label, style in (("eclipse", "ECLIPSE", "-"), ("finetune", "fine-tuning", "--"),
                                 ("comformer", "CoMFormer", ":")):
        if not any(table[s].get(method) for s in steps):
            continue
        for split in ("base", "new", "all"):
            xs, ys = [], []
            for s in steps:
                row = table[s].get(method)
                if row and row.get(split) is not None:
                    xs.append(s)
                    ys.append(row[split])
            if xs:
                ax.plot(xs, ys, style, marker="o", color=colors[split], label=f"{label} {split}")
    ax.set_xticks(steps)
    ax.set_xlabel("step (0: 6 base classes; 1, 2: +2 classes each)")
    ax.set_ylabel("PQ")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(eclipse_metrics: str, finetune_metrics: Optional[str], output: str,
              comformer_metrics: Optional[str] = None) -> Dict:
    """Read the runs' ``metrics.json`` files (and the ``training_costs.json`` of their steps, in
    the same folders) and write ``summary.md``, ``summary.json`` and ``pq_across_steps.png`` into
    ``output``. Returns the summary (``table``, ``costs``, ``checks``, ``markdown``, ``plot``)."""
    paths = {"eclipse": eclipse_metrics, "finetune": finetune_metrics, "comformer": comformer_metrics}
    pq = {k: method_pq(read_metrics_json(p)) if p else None for k, p in paths.items()}
    cost = {k: method_costs(os.path.dirname(p)) if p else None for k, p in paths.items()}
    table = combine_methods(pq["eclipse"], pq["finetune"], pq["comformer"])
    costs = combine_methods(cost["eclipse"], cost["finetune"], cost["comformer"])
    markdown = format_table(table, costs)
    checks = acceptance_checks(table)
    plot = plot_pq(table, os.path.join(output, "pq_across_steps.png"))
    summary = {"table": {str(k): v for k, v in table.items()}, "costs": {str(k): v for k, v in costs.items()},
               "checks": checks, "markdown": markdown, "plot": plot}
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def joint_row(metrics: Mapping[str, Mapping]) -> Dict[str, Optional[float]]:
    """PQ base / old / new / all of the joint upper bound from its ``metrics.json`` (its one step,
    evaluated with the split of the scenario's last step)."""
    entry = metrics.get("0") or {}
    pq = entry.get("panoptic_seg", entry) if isinstance(entry, Mapping) else {}
    return {split: _number(pq.get(key)) for split, key in _METRIC_KEYS.items()}


def format_joint_table(row: Mapping[str, Optional[float]], last_step: int) -> str:
    """The joint upper bound as a one-row Markdown table, comparable to the last step's row."""
    return "\n".join([f"| upper bound (split of step {last_step}) | " + " | ".join(SPLITS) + " |",
                      "|---|" + "---|" * len(SPLITS),
                      "| joint (all classes at once) | " + " | ".join(_fmt(row.get(s)) for s in SPLITS) + " |"])


def format_checks(checks: Sequence[Mapping]) -> str:
    return "\n".join(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['value']} (expected {c['threshold']})"
                     for c in checks)


# =============================================================================================
# progress: stages with an ETA
# =============================================================================================
class Stage:
    def __init__(self, key: str, title: str, estimate: float = 0.0, iters: int = 0):
        self.key, self.title, self.estimate, self.iters = key, title, float(estimate), iters
        self.start: Optional[float] = None
        self.end: Optional[float] = None
        self.fraction = 0.0


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Stage-level progress: ``[stage 3/8] title | detail | elapsed m:ss | ETA m:ss``.

    Each stage has an a-priori cost estimate; the ETA scales the estimates of the remaining work
    by how fast the work done so far went (measured / estimated)."""

    def __init__(self, stages: Sequence[Stage], stream=sys.stdout):
        self.stages = list(stages)
        self.start = time.perf_counter()
        self.stream = stream
        self.current: Optional[int] = None
        self._last_print = 0.0

    def index(self, key: str) -> int:
        return next(i for i, s in enumerate(self.stages) if s.key == key)

    def begin(self, key: str) -> None:
        now = time.perf_counter()
        i = self.index(key)
        if self.current is not None and self.current != i:
            self.finish(self.stages[self.current].key, quiet=True)
        self.current = i
        self.stages[i].start = now
        self.report(force=True)

    def finish(self, key: str, quiet: bool = False) -> None:
        stage = self.stages[self.index(key)]
        if stage.end is None:
            stage.end = time.perf_counter()
            stage.fraction = 1.0
            if not quiet:
                self._print(f"  done: {stage.title} in {_clock(stage.end - (stage.start or stage.end))}")

    def update(self, fraction: float, detail: str = "") -> None:
        if self.current is None:
            return
        self.stages[self.current].fraction = min(max(fraction, 0.0), 1.0)
        self.report(detail)

    def eta(self) -> float:
        now = time.perf_counter()
        done_est = done_real = 0.0
        for s in self.stages:
            if s.end is not None and s.start is not None:
                done_est += s.estimate
                done_real += s.end - s.start
            elif s.start is not None:
                done_est += s.estimate * s.fraction
                done_real += now - s.start
        speed = done_real / done_est if done_est > 30 else 1.0  # the estimates are rough at first
        remaining = sum(s.estimate * (1.0 - (1.0 if s.end is not None else s.fraction)) for s in self.stages)
        return remaining * speed

    def report(self, detail: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_print < 10:
            return
        stage = self.stages[self.current]
        parts = [f"[stage {self.current + 1}/{len(self.stages)}] {stage.title}"]
        if detail:
            parts.append(detail)
        parts += [f"elapsed {_clock(now - self.start)}", f"ETA {_clock(self.eta())}"]
        self._print(" | ".join(parts))
        self._last_print = now

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


# =============================================================================================
# running the scenario
# =============================================================================================
RUN_OUTPUTS = ("runs", "results", "vis", "logs", "summary.md", "summary.json", "pq_across_steps.png")


def set_aside_previous_run(output: str, delete: bool = False, stamp: Optional[str] = None) -> Optional[str]:
    """Make room for a new run in ``output``: the outputs of an earlier run (``RUN_OUTPUTS``; the
    generated data stay) move to ``output/previous/<date-time>/``, or are deleted with
    ``delete``. Returns the folder they moved to (None when there was nothing or they were
    deleted)."""
    present = [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(output, name))]
    if not present:
        return None
    if delete:
        for name in present:
            path = os.path.join(output, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return None
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(output, "previous", stamp)
    n = 1
    while os.path.exists(target):
        target = os.path.join(output, "previous", f"{stamp}_{n}")
        n += 1
    os.makedirs(target)
    for name in present:
        shutil.move(os.path.join(output, name), os.path.join(target, name))
    return target


def script_settings(env: Mapping[str, str]) -> Dict[str, str]:
    """The hyper-parameters of script/synthetic/6_2.sh (``PRINT_SETTINGS=1``: printed, nothing run)."""
    out = subprocess.run(["bash", SCRIPT], env=dict(env, PRINT_SETTINGS="1"), capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def ensure_data(data_root: str, preset: Mapping, python: str, log_path: str) -> bool:
    """Generate the dataset under ``data_root/synthetic`` unless the same one is there; returns
    whether it was generated."""
    folder = os.path.join(data_root, "synthetic")
    wanted = {k: preset[k] for k in ("num_train", "num_val", "size", "max_things")}
    wanted["seed"] = 0
    stamp = os.path.join(folder, DATA_STAMP)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == wanted and os.path.isfile(os.path.join(folder, "synthetic_panoptic_val.json")):
                return False
    cmd = [python, GENERATOR, "--root", folder, "--num-train", str(wanted["num_train"]),
           "--num-val", str(wanted["num_val"]), "--size", str(wanted["size"]),
           "--max-things", str(wanted["max_things"]), "--seed", "0"]
    with open(log_path, "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO_ROOT)
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    return True


_ITER = re.compile(r"\biter: (\d+)\b")
_INFERENCE = re.compile(r"Inference done (\d+)/(\d+)")
_STEP_TRAIN = re.compile(r"^== step (\d+)")
_FINAL_EVAL = re.compile(r"^== evaluation of step")


def run_script(env: Mapping[str, str], log_path: str, progress: Progress, stage_of_line, iters_of_stage) -> None:
    """Run script/synthetic/6_2.sh with ``env``, its output into ``log_path``; moves ``progress``
    to the stage ``stage_of_line(line)`` names and reports iterations and inference."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", SCRIPT], env=dict(env), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: List[str] = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-40:]
            key = stage_of_line(line)
            if key is not None:
                progress.begin(key)
                continue
            stage = progress.stages[progress.current] if progress.current is not None else None
            m = _ITER.search(line)
            if m and stage is not None and iters_of_stage(stage.key):
                total = iters_of_stage(stage.key)
                done = int(m.group(1)) + 1
                progress.update(0.85 * done / total, f"iter {done}/{total}")
                continue
            m = _INFERENCE.search(line)
            if m and stage is not None:
                done, total = int(m.group(1)), int(m.group(2))
                base = 0.85 if iters_of_stage(stage.key) else 0.0
                progress.update(base + (1 - base) * done / total, f"evaluating {done}/{total} images")
        rc = proc.wait()
    if rc != 0:
        sys.stderr.write("".join(tail))
        raise RuntimeError(f"{os.path.relpath(SCRIPT, REPO_ROOT)} failed (exit code {rc}); full log: {log_path}")


# =============================================================================================
# overlays
# =============================================================================================
def _validation_json(data_root: str) -> Dict:
    with open(os.path.join(data_root, "synthetic", "synthetic_panoptic_val.json")) as f:
        return json.load(f)


def _ground_truth(data_root: str, annotation: Mapping):
    """The ground-truth panoptic id map of one validation annotation of the synthetic set."""
    path = os.path.join(data_root, "synthetic", "synthetic_panoptic_val", annotation["file_name"])
    return rgb2id(np.asarray(Image.open(path).convert("RGB")))


def pick_validation_images(data_root: str, count: int) -> List[str]:
    """``count`` validation images, preferring ones that show classes of several steps (base,
    step 1, step 2), in file order."""
    folder = os.path.join(data_root, "synthetic")
    data = _validation_json(data_root)
    files = {img["id"]: os.path.join(folder, "images", "validation", img["file_name"]) for img in data["images"]}

    def steps_shown(ann):
        cats = {s["category_id"] for s in ann["segments_info"]}
        return len({0 if c <= 6 else 1 if c <= 8 else 2 for c in cats})

    ranked = sorted(data["annotations"], key=lambda a: -steps_shown(a))  # stable: file order among equals
    return [files[a["image_id"]] for a in ranked[:count]]


def draw_overlays(runs: Mapping[str, Tuple[str, str, str, List[str]]], images: Sequence[str], data_root: str,
                  output: str, threads: int) -> List[str]:
    """Overlays of each model (``runs``: label -> (folder, config.yaml, checkpoint, overrides))
    with tools/demo.py into ``output/<folder>``, plus ``output/compare_<image>.png``: image |
    ground truth | one column per model."""
    torch.set_num_threads(threads)
    panels: Dict[str, List[np.ndarray]] = {}
    classes = None
    for label, (folder, config, weights, opts) in runs.items():
        cfg, mode = demo.setup_cfg(config, opts, "panoptic", "cpu")
        classes = demo.class_table(cfg, palette="distinct")  # the dataset's colours are the objects' own
        predictor = demo.Predictor(cfg, weights)
        records = demo.run_on_images(predictor, classes, images, os.path.join(output, folder), mode, scale=3.0)
        panels[label] = [np.asarray(Image.open(r["panoptic_overlay"]).convert("RGB")) for r in records]

    annotations = {a["image_id"]: a for a in _validation_json(data_root)["annotations"]}
    written = []
    for i, image_file in enumerate(images):
        image = np.asarray(Image.open(image_file).convert("RGB"))
        annotation = annotations[os.path.splitext(os.path.basename(image_file))[0]]
        pan = _ground_truth(data_root, annotation)
        gt = demo.draw_panoptic(image, torch.as_tensor(pan.astype(np.int32)),
                                [{"id": s["id"], "category_id": s["category_id"], "isthing": bool(s["isthing"])}
                                 for s in annotation["segments_info"]], classes, scale=3.0)
        plain = np.asarray(Image.fromarray(image).resize((gt.shape[1], gt.shape[0]), Image.NEAREST))
        columns = [("image", plain), ("ground truth", gt)] + [(label, panels[label][i]) for label in runs]
        h = max(c.shape[0] for _, c in columns)
        strip = Image.new("RGB", (sum(c.shape[1] for _, c in columns) + 8 * (len(columns) - 1), h + 22), "white")
        draw = ImageDraw.Draw(strip)
        x = 0
        for title, col in columns:
            strip.paste(Image.fromarray(col), (x, 22))
            draw.text((x + 4, 4), title, fill="black")
            x += col.shape[1] + 8
        path = os.path.join(output, f"compare_{os.path.splitext(os.path.basename(image_file))[0]}.png")
        strip.save(path)
        written.append(path)
    return written


# =============================================================================================
# main
# =============================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="tools/synthetic_benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="output/demo", help="output folder (default: output/demo)")
    p.add_argument("--data-root", default=None,
                   help="datasets root; the data go to <root>/synthetic (default: <output>/data)")
    p.add_argument("--quick", action="store_true", help="tiny data, a few iterations: a smoke test of the pipeline")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the baselines (fine-tuning, CoMFormer)")
    p.add_argument("--joint", action="store_true",
                   help="also train the joint upper bound (all classes at once; off by default: time budget)")
    p.add_argument("--joint-iters", type=int, default=None, help="iterations of the joint upper bound (default: step 0's)")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: min(2, CPUs))")
    p.add_argument("--num-vis", type=int, default=4, help="validation images to draw (0: none)")
    p.add_argument("--num-train", type=int, default=None, help="training images (default: the preset's)")
    p.add_argument("--num-val", type=int, default=None, help="validation images (default: the preset's)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the preset's)")
    p.add_argument("--step0-iters", type=int, default=None, help="step-0 iterations (default: the script's)")
    p.add_argument("--iters", type=int, default=None, help="iterations of each later step (default: the script's)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the training commands")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the outputs of an earlier run in --output (default: move them to <output>/previous/)")
    p.add_argument("--check", action="store_true", help="exit with code 1 when a benchmark expectation fails")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="config overrides (KEY VALUE pairs) appended to every training and evaluation command of "
                        "every method, e.g. --opts MODEL.CPU_BF16 True")
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        p.error(f"--opts takes KEY VALUE pairs, got an odd number of words: {' '.join(args.opts)}")
    if any(not word or any(c.isspace() for c in word) for word in args.opts):
        p.error("--opts: keys and values may not be empty or contain spaces (the scripts split them on spaces)")
    return args


def _estimates(settings: Mapping[str, str], preset: Mapping, threads: int) -> Dict[str, float]:
    """A-priori seconds per stage on an idle 2-core CPU with 2 threads (measured: 0.15 s per
    step-0 or fine-tuning iteration and 0.05 s per prompt-tuning iteration at 128x128, 0.04 s
    per validation image; a CoMFormer iteration adds the teacher's forward pass, assumed +40 %);
    the ETA corrects them by the speed of the run so far."""
    pixels = (preset["size"] / 128.0) ** 2
    startup = 14.0  # interpreter, imports, data and model set-up of one train_continual.py call
    per_eval = preset["num_val"] * (0.01 + 0.035 * pixels) + 3.0
    step0 = int(settings["STEP0_ITERS"]) * (0.04 + 0.11 * pixels)
    prompt = int(settings["ITERS"]) * (0.015 + 0.035 * pixels)
    finetune = int(settings.get("FT_ITERS", settings["ITERS"])) * (0.04 + 0.11 * pixels)
    comformer = 1.4 * finetune
    scale = 1.0 if threads >= 2 else 1.4
    return {k: v * scale for k, v in {
        "data": 3.0 + 0.02 * (preset["num_train"] + preset["num_val"]) * pixels,
        "step0": startup + step0 + per_eval,
        "eclipse1": startup + prompt + per_eval, "eclipse2": startup + prompt + per_eval,
        "eclipse_eval": startup + per_eval,
        "finetune1": startup + finetune + per_eval, "finetune2": startup + finetune + per_eval,
        "comformer1": startup + comformer + per_eval, "comformer2": startup + comformer + per_eval,
        "joint": startup + int(settings.get("JOINT_ITERS", 0)) * (0.04 + 0.11 * pixels) + per_eval,
        "report": 15.0,
    }.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("num_train", "num_val", "size"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    output = os.path.abspath(args.output)
    data_root = os.path.abspath(args.data_root or os.path.join(output, "data"))
    threads = args.threads or max(1, min(2, os.cpu_count() or 1))
    runs_root, results_dir = os.path.join(output, "runs"), os.path.join(output, "results")
    logs, vis = os.path.join(output, "logs"), os.path.join(output, "vis")
    archived = set_aside_previous_run(output, delete=args.overwrite)
    os.makedirs(logs, exist_ok=True)

    env = dict(os.environ, PYTHON=args.python, DETECTRON2_DATASETS=data_root, OUTPUT_ROOT=runs_root, NUM_GPUS="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    # OpenMP (GNU libgomp, as in the PyTorch wheels) threads spin a short while, then sleep, when
    # they wait for work: with the default (long) spinning, a CPU shared with other jobs slows
    # training down by more than ten times; on an idle CPU the short spin is as fast (measured on
    # 2 cores: 0.15 s per step-0 iteration idle and 0.36 s next to two busy processes, against
    # 0.17 s and > 5 s with the default)
    env.setdefault("GOMP_SPINCOUNT", "20000")
    for key in ("RESUME", "FIRST_STEP", "LAST_STEP", "EVAL_WEIGHTS", "NAME", "EXTRA_ARGS", "METHOD", "BASELINE_ITERS",
                "BASELINE_LR"):
        env.pop(key, None)  # the benchmark decides these
    for key, value in (("STEP0_ITERS", args.step0_iters or preset["step0_iters"]),
                       ("ITERS", args.iters or preset["iters"])):
        if value is not None:
            env[key] = str(value)
    settings = script_settings(env)
    ft_iters = str(args.iters or preset["finetune_iters"] or settings["ITERS"])
    ft_lr = str(preset["finetune_lr"] or settings["STEP0_LR"])
    settings.update(FT_ITERS=ft_iters, FT_LR=ft_lr)
    if args.joint:
        settings["JOINT_ITERS"] = str(args.joint_iters or preset["joint_iters"] or settings["STEP0_ITERS"])
    env["EXTRA_ARGS"] = " ".join(["CONT.RESULTS_DIR", results_dir] + list(preset["extra"]) + list(args.opts))

    stages = [Stage("data", "synthetic data"),
              Stage("step0", f"step 0: {settings['BASE']} base classes"),
              Stage("eclipse1", "ECLIPSE step 1: +2 classes (prompt tuning)"),
              Stage("eclipse2", "ECLIPSE step 2: +2 classes (prompt tuning)"),
              Stage("eclipse_eval", f"ECLIPSE final evaluation (deltas {settings['EVAL_DELTAS']})")]
    if not args.skip_baseline:
        stages += [Stage("finetune1", "fine-tuning step 1: +2 classes (whole model)"),
                   Stage("finetune2", "fine-tuning step 2: +2 classes (whole model)"),
                   Stage("comformer1", "CoMFormer step 1: +2 classes (whole model, teacher)"),
                   Stage("comformer2", "CoMFormer step 2: +2 classes (whole model, teacher)")]
    if args.joint:
        stages.append(Stage("joint", "joint upper bound: all 10 classes at once"))
    stages.append(Stage("report", "table, plot and overlays"))
    for stage, seconds in ((s, _estimates(settings, preset, threads)[s.key]) for s in stages):
        stage.estimate = seconds
    iters = {"step0": int(settings["STEP0_ITERS"]), "eclipse1": int(settings["ITERS"]),
             "eclipse2": int(settings["ITERS"]), "finetune1": int(ft_iters), "finetune2": int(ft_iters),
             "comformer1": int(ft_iters), "comformer2": int(ft_iters),
             "joint": int(settings.get("JOINT_ITERS", 0))}

    if archived:
        print(f"The earlier run in {output} was moved to {archived} (delete it when you no longer need it, "
              "or pass --overwrite to replace earlier runs).")
    mode = "quick smoke run" if args.quick else "full run"
    print(f"Synthetic continual benchmark ({mode}): 10 classes, 6 base then 2 steps of 2; "
          f"ECLIPSE{'' if args.skip_baseline else ', fine-tuning and CoMFormer'}; {threads} thread(s).\n"
          f"Settings of {os.path.relpath(SCRIPT, REPO_ROOT)}: step 0 {settings['STEP0_ITERS']} iterations "
          f"(LR {settings['STEP0_LR']}); ECLIPSE steps {settings['ITERS']} iterations (LR {settings['LR']}, "
          f"{settings['PROMPTS']} prompts, deltas {settings['EVAL_DELTAS']})"
          + ("" if args.skip_baseline else f"; fine-tuning and CoMFormer steps {ft_iters} iterations (LR {ft_lr})")
          + f".\nOutputs in {output}; logs in {logs}.", flush=True)
    progress = Progress(stages)
    wall_start = time.perf_counter()

    progress.begin("data")
    made = ensure_data(data_root, preset, args.python, os.path.join(logs, "generate.log"))
    progress._print(f"  {'generated' if made else 'reusing'} {preset['num_train']} training / {preset['num_val']} "
                    f"validation images of {preset['size']}x{preset['size']} in {os.path.join(data_root, 'synthetic')}")
    progress.finish("data")

    def eclipse_stage(line):
        m = _STEP_TRAIN.match(line)
        if m:
            return "step0" if m.group(1) == "0" else f"eclipse{m.group(1)}"
        return "eclipse_eval" if _FINAL_EVAL.match(line) else None

    run_script(dict(env, NAME=ECLIPSE_NAME, RUN_STEP0="1"), os.path.join(logs, "eclipse.log"), progress,
               eclipse_stage, iters.get)
    progress.finish("eclipse_eval")
    run_dir = os.path.join(runs_root, TASK_NAME)
    step0 = os.path.join(run_dir, ECLIPSE_NAME, "step0", "model_final.pth")

    if not args.skip_baseline:
        for name, method in ((FINETUNE_NAME, "ft"), (COMFORMER_NAME, "comformer")):
            def baseline_stage(line, name=name):
                m = _STEP_TRAIN.match(line)
                return f"{name}{m.group(1)}" if m else None

            run_script(dict(env, NAME=name, METHOD=method, RUN_STEP0="0", STEP0_WEIGHTS=step0, RUN_EVAL="0",
                            BASELINE_ITERS=ft_iters, BASELINE_LR=ft_lr), os.path.join(logs, f"{name}.log"),
                       progress, baseline_stage, iters.get)
            progress.finish(f"{name}2")

    if args.joint:
        run_script(dict(env, NAME=JOINT_NAME, JOINT="1", JOINT_ITERS=settings["JOINT_ITERS"]),
                   os.path.join(logs, "joint.log"), progress, lambda line: "joint" if line.startswith("== joint") else None,
                   iters.get)
        progress.finish("joint")

    progress.begin("report")
    baseline = (lambda name: None if args.skip_baseline else os.path.join(run_dir, name, "metrics.json"))
    summary = summarize(os.path.join(run_dir, ECLIPSE_NAME, "metrics.json"), baseline(FINETUNE_NAME), output,
                        baseline(COMFORMER_NAME))
    compares = []
    if args.num_vis > 0:
        last = int(settings["STEPS"])
        eclipse_dir = os.path.join(run_dir, ECLIPSE_NAME, f"step{last}")
        runs = {"ECLIPSE": ("eclipse", os.path.join(eclipse_dir, "config.yaml"), os.path.join(eclipse_dir, "model_final.pth"),
                            ["CONT.LOGIT_MANI_DELTAS", settings["EVAL_DELTAS"]])}
        if not args.skip_baseline:
            for name, label in ((FINETUNE_NAME, "fine-tuning"), (COMFORMER_NAME, "CoMFormer")):
                step_dir = os.path.join(run_dir, name, f"step{last}")
                runs[label] = (name, os.path.join(step_dir, "config.yaml"), os.path.join(step_dir, "model_final.pth"), [])
        images = pick_validation_images(data_root, args.num_vis)
        compares = draw_overlays(runs, images, data_root, vis, threads)
    progress.finish("report", quiet=True)
    wall = time.perf_counter() - wall_start

    text = [f"# Synthetic continual benchmark (6-2{', quick smoke run' if args.quick else ''})", "",
            "PQ per method and step (base: the 6 step-0 classes; old: the classes of the earlier steps; new: "
            "the classes of the step; all: PQ over all 10 classes, those not learnt yet counting 0, as in the "
            "official evaluation), and the costs of training the step: trainable parameters, median seconds "
            "per training iteration, peak resident memory of the training process (step 0 is shared).", "",
            summary["markdown"], ""]
    if args.joint:
        joint_metrics = os.path.join(run_dir, f"{JOINT_NAME}_joint", "metrics.json")
        summary["joint"] = joint_row(read_metrics_json(joint_metrics))
        summary["joint_markdown"] = format_joint_table(summary["joint"], int(settings["STEPS"]))
        text += [f"Joint upper bound ({settings['JOINT_ITERS']} iterations, step-0 settings):", "",
                 summary["joint_markdown"], ""]
    if summary["checks"]:
        text += ["Checks:", "", "```", format_checks(summary["checks"]), "```", ""]
    text += [f"Wall time {_clock(wall)} ({wall:.0f} s), {threads} thread(s). Settings: " +
             ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) + "; data: " +
             ", ".join(f"{k}={preset[k]}" for k in ("num_train", "num_val", "size", "max_things"))
             + (f"; config overrides: {' '.join(args.opts)}" if args.opts else "")]
    with open(os.path.join(output, "summary.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    summary.update(wall_seconds=round(wall, 1), threads=threads, settings=settings,
                   data={k: preset[k] for k in ("num_train", "num_val", "size", "max_things")}, quick=args.quick,
                   opts=list(args.opts))
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    print("\nPQ per method and step (base / old / new / all) and training costs:\n")
    print(summary["markdown"])
    if summary.get("joint_markdown"):
        print("\n" + summary["joint_markdown"])
    if summary["checks"]:
        print("\nChecks" + (" (quick run: not meaningful)" if args.quick else "") + ":")
        print(format_checks(summary["checks"]))
    print(f"\nTotal wall time {_clock(wall)} ({wall:.0f} s).")
    print(f"Metrics JSON: {os.path.join(run_dir, ECLIPSE_NAME, 'metrics.json')}"
          + ("" if args.skip_baseline else f", {os.path.join(run_dir, FINETUNE_NAME, 'metrics.json')}, "
                                           f"{os.path.join(run_dir, COMFORMER_NAME, 'metrics.json')}"))
    print(f"Official CSV: {os.path.join(results_dir, TASK_NAME + '.csv')}")
    print(f"Plot: {summary['plot']}")
    if compares:
        print(f"Overlays: {vis}/compare_*.png ({len(compares)} images), {vis}/eclipse/"
              + ("" if args.skip_baseline else f", {vis}/finetune/, {vis}/comformer/"))
    print(f"Summary: {os.path.join(output, 'summary.md')}")
    if args.check and not all(c["passed"] for c in summary["checks"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
