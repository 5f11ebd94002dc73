#!/usr/bin/env python
"""CPU inference latency of the ECLIPSE decoder and of the whole model, per image.

Compares the grouped inference of this implementation (all query groups in one self-attention
call per decoder layer, restricted by a block-diagonal mask) with the per-group Python loop of
the official implementation (one self-attention call per query group and layer), implemented
here as a wrapper around the decoder's self-attention layers and labelled
"official per-group loop (reference)".

Models (random weights, one random 512x512 image, panoptic inference on):

* ``tiny``: the reference-fixture configuration ``tests/fixtures/ade_ps_t3_deltas_pos`` (R18,
  hidden 64, 3 decoder layers, 16 queries, 4 prompts per step) at step 0 and at step 10 of
  ADE20K 100-5;
* ``real``: ``configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml`` with the
  ECLIPSE 100-5 settings (R50, hidden 256, 9 decoder layers, 100 queries, 10 prompts per step)
  at step 0 (100 queries) and step 10 (200 queries).

Step 0 is run with ``CONT.NUM_PROMPTS 0`` as in the official protocol (one query group, so both
variants are the same computation and only one row is reported).

Every (model, step, variant) runs in a fresh subprocess so that its peak RSS
(``resource.getrusage``, whole process, including the ~0.3-0.5 GB of imported libraries) is its
own. Timings: ``--warmup`` untimed runs, then ``--runs`` timed runs; median and min reported.

Usage::

    python tools/benchmark_inference.py                       # tiny + real, 2 threads
    python tools/benchmark_inference.py --quick --output bench.md
    python tools/benchmark_inference.py --sizes tiny --threads 1 --runs 20
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from torch import nn  # noqa: E402

import mask2former  # noqa: E402,F401  (registers the model)
from continual.config import setup_cfg  # noqa: E402

TINY_CONFIG = REPO / "tests" / "fixtures" / "ade_ps_t3_deltas_pos" / "config.yaml"
REAL_CONFIG = REPO / "configs" / "ade20k" / "panoptic-segmentation" / "maskformer2_R50_bs16_160k.yaml"
# the network-size overrides of the real model, used when REAL_CONFIG does not exist
REAL_SIZE_OVERRIDES = [
    "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "256", "MODEL.SEM_SEG_HEAD.MASK_DIM", "256",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "6",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "256", "MODEL.MASK_FORMER.NHEADS", "8",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "2048", "MODEL.MASK_FORMER.DEC_LAYERS", "10",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "100",
]
# ECLIPSE 100-5 settings of the brief / script/ade_ps/100_5.sh
ECLIPSE_100_5 = [
    "CONT.BASE_CLS", "100", "CONT.INC_CLS", "5", "CONT.PROMPT_DEEP", "True",
    "CONT.PROMPT_MASK_MLP", "True", "CONT.DEEP_CLS", "True", "CONT.SOFTCLS", "False",
    "MODEL.MASK_FORMER.FOCAL", "True", "MODEL.MASK_FORMER.TEST.MASK_BG", "False",
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True",
]
PROMPTS = {"tiny": 4, "real": 10}
STEPS = (0, 10)

GROUPED = "grouped (block-diagonal, 1 call/layer)"
LOOP = "official per-group loop (reference)"
SINGLE = "single group (both variants identical)"


# --------------------------------------------------------------------------------------------
# the official per-group self-attention loop
# --------------------------------------------------------------------------------------------
class PerGroupSelfAttention(nn.Module):
    """Official per-group loop (reference): the shared self-attention layer applied to each
    query group's slice separately, as the official ``forward_infer`` does, instead of one
    call with a block-diagonal mask."""

    def __init__(self, layer: nn.Module, sizes):
        super().__init__()
        self.layer = layer
        self.sizes = list(sizes)

    def forward(self, tgt, tgt_mask=None, tgt_key_padding_mask=None, query_pos=None):
        if tgt_mask is None or len(self.sizes) <= 1:
            return self.layer(tgt, tgt_mask=tgt_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                              query_pos=query_pos)
        if tgt.shape[0] != sum(self.sizes):
            raise ValueError(f"{tgt.shape[0]} queries do not match the groups {self.sizes}")
        outputs, start = [], 0
        for n in self.sizes:
            outputs.append(self.layer(tgt[start:start + n], tgt_mask=None, query_pos=query_pos[start:start + n]))
            start += n
        return torch.cat(outputs)


@contextlib.contextmanager
def official_per_group_loop(decoder):
    """Within the block, ``decoder`` runs the official per-group self-attention loop (reference)."""
    wrapper = PerGroupSelfAttention
    original = decoder.transformer_self_attention_layers
    decoder.transformer_self_attention_layers = nn.ModuleList(
        wrapper(layer, decoder.query_group_sizes) for layer in original
    )
    try:
        yield decoder
    finally:
        decoder.transformer_self_attention_layers = original


# --------------------------------------------------------------------------------------------
# one measurement (runs in a worker process)
# --------------------------------------------------------------------------------------------
def build_cfg(size: str, step: int):
    opts, config_file = [], TINY_CONFIG
    if size != "tiny":
        if REAL_CONFIG.is_file():
            config_file = REAL_CONFIG
        else:
            opts += REAL_SIZE_OVERRIDES
    prompts = PROMPTS[size] if step > 0 else 0  # the official step 0 runs without prompts
    opts += ECLIPSE_100_5 + ["CONT.TASK", str(step), "CONT.NUM_PROMPTS", str(prompts),
                             "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    cfg = setup_cfg(config_file, opts)
    # the evaluation deltas of script/ade_ps/100_5.sh ([0.4, 0.6 x 10]); set directly because the
    # YAML may hold a list or None
    cfg.CONT.LOGIT_MANI_DELTAS = [0.4, 0.6]
    return cfg


def _timed(fn, warmup: int, runs: int):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def measure(spec: dict) -> dict:
    """Time the decoder and the whole model for one (size, step, variant)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = build_cfg(spec["size"], spec["step"])
    model = build_model(cfg).eval()
    pred = model.sem_seg_head.predictor
    size = spec["image_size"]
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
               "height": size, "width": size}]

    with torch.no_grad():
        images = model.preprocess_images(inputs)
        features = model.backbone(images.tensor)
        mask_features, _, multi_scale = model.sem_seg_head.pixel_decoder.forward_features(features)

        def decoder():
            return pred(multi_scale, mask_features, None)

        def whole():
            return model(inputs)

        result = {
            "queries": sum(pred.query_group_sizes),
            "groups": len(pred.query_group_sizes),
            "max_abs_diff": None,
        }
        loop = spec["variant"] == LOOP
        ctx = official_per_group_loop(pred) if loop else contextlib.nullcontext()
        if loop:
            reference = decoder()
        with ctx:
            if loop:
                out = decoder()
                result["max_abs_diff"] = max(
                    (out[k] - reference[k]).abs().max().item() for k in ("pred_logits", "pred_masks")
                )
            dec_times = _timed(decoder, spec["warmup"], spec["runs"])
            whole_times = _timed(whole, spec["warmup"], spec["runs"])
    result.update(
        decoder_ms=dec_times,
        whole_ms=whole_times,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # KiB on Linux
    )
    return result


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
def machine_description(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"- CPU: {cpu} ({os.cpu_count()} logical cores visible)\n"
        f"- torch {torch.__version__}, {threads} intra-op thread(s) (torch.set_num_threads); "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}\n"
        f"- load average at start (1/5/15 min): {load}"
    )


def cases(sizes):
    for size in sizes:
        for step in STEPS:
            if step == 0:
                yield size, step, SINGLE
            else:
                yield size, step, GROUPED
                yield size, step, LOOP


def run_worker(script: str, spec: dict) -> dict:
    """Run ``script --worker SPEC`` in a fresh process with ``spec["threads"]`` threads; its JSON
    result (the last line starting with ``{``)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no result from worker for {spec}:\n{proc.stdout[-2000:]}")


def run_case(spec: dict, in_process: bool) -> dict:
    return measure(spec) if in_process else run_worker(__file__, spec)


def add_common_arguments(parser: argparse.ArgumentParser, runs: int, warmup: int) -> None:
    """Options shared by the benchmarks: threads, runs, warm-up, sizes, image size, quick,
    output, and the hidden ``--worker`` of the per-case subprocess."""
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--runs", type=int, default=runs, help=f"timed runs per measurement (default {runs})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs (default {warmup})")
    parser.add_argument("--sizes", default="tiny,real", help="comma-separated subset of tiny,real")
    parser.add_argument("--quick", action="store_true", help="1 warm-up run and 2 timed runs")
    parser.add_argument("--image-size", type=int, default=512, help="square image side (default 512)")
    parser.add_argument("--output", help="also write the Markdown report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def answer_worker_or_prepare(args, measure_fn) -> bool:
    """With ``--worker``: measure its case, print the JSON and return True (the process is a
    worker). Otherwise apply ``--quick`` and return False."""
    if args.worker:
        print(json.dumps(measure_fn(json.loads(args.worker))))
        return True
    if args.quick:
        args.warmup, args.runs = 1, 2
    return False


def _fmt(times):
    return f"{statistics.median(times):.1f} / {min(times):.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, runs=10, warmup=2)
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (no per-case peak RSS)")
    args = parser.parse_args(argv)
    if answer_worker_or_prepare(args, measure):
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = set(sizes) - set(PROMPTS)
    if unknown or not sizes:
        parser.error(f"--sizes must be a comma-separated subset of tiny,real (got {args.sizes!r})")
    if args.threads < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--threads and --runs must be >= 1 and --warmup >= 0")

    header = [
        "# ECLIPSE inference latency (CPU)",
        "",
        machine_description(args.threads),
        f"- one random {args.image_size}x{args.image_size} image, random weights, panoptic inference on; "
        f"{args.warmup} warm-up + {args.runs} timed run(s) per cell; times are per image, median / min",
        "- decoder = transformer decoder alone (on precomputed pixel-decoder features, incl. logit "
        "manipulation); whole model = preprocessing + backbone + pixel decoder + decoder + "
        "panoptic post-processing",
        f"- real model: {REAL_CONFIG.relative_to(REPO) if REAL_CONFIG.is_file() else 'tiny config with real-size overrides'}"
        f"; tiny model: {TINY_CONFIG.relative_to(REPO)}; ADE20K 100-5, deltas [0.4, 0.6 x 10]",
        "- peak RSS = peak resident memory of the whole worker process (libraries included)"
        + (" - not measured (--in-process)" if args.in_process else ""),
        "",
        "| model | step | queries (groups) | variant | decoder ms | whole-model ms | peak RSS MB | max abs diff vs grouped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows = []
    for size, step, variant in cases(sizes):
        spec = {"size": size, "step": step, "variant": variant, "threads": args.threads,
                "runs": args.runs, "warmup": args.warmup, "image_size": args.image_size}
        res = run_case(spec, args.in_process)
        rss = "n/a" if args.in_process else f"{res['peak_rss_mb']:.0f}"
        diff = "-" if res["max_abs_diff"] is None else f"{res['max_abs_diff']:.1e}"
        row = (f"| {size} | {step} | {res['queries']} ({res['groups']}) | {variant} | "
               f"{_fmt(res['decoder_ms'])} | {_fmt(res['whole_ms'])} | {rss} | {diff} |")
        rows.append(row)
        print(row, flush=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    footer = ["", f"load average at end (1/5/15 min): {load}"]
    print("\n".join(footer))
    if args.output:
        Path(args.output).write_text("\n".join(header + rows + footer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
