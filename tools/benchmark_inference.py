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

``--baseline-repo PATH`` adds, for every case, the same measurement with the package of
another checkout (e.g. a pristine copy of the current main, labelled "baseline"), in the same
run, with the same weights (same seeds and construction order), and reports new / baseline
time ratios and the largest output difference between the two. ``--bf16`` adds the
``MODEL.CPU_BF16 True`` variant of this checkout. ``--ab`` adds an in-process A/B row pair: this checkout against
the CPU paths it replaced (see :func:`previous_cpu_paths`), runs interleaved in one process,
which gives the steadiest ratios on a shared machine.

Every (model, step, variant) runs in a fresh subprocess so that its peak RSS
(``resource.getrusage``, whole process, including the ~0.3-0.5 GB of imported libraries) is its
own. Timings: ``--warmup`` untimed runs, then ``--runs`` timed runs; median and min reported.

Usage::

    python tools/benchmark_inference.py                       # tiny + real, 2 threads
    python tools/benchmark_inference.py --quick --output bench.md
    python tools/benchmark_inference.py --sizes tiny --threads 1 --runs 20
    python tools/benchmark_inference.py --sizes real --steps 10 --threads 1 --no-loop \
        --baseline-repo /path/to/pristine/checkout --bf16 --output bench.md
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The packages are imported at module level, so the checkout they come from is put first on the
# path here: this one, or in a --baseline-repo worker the baseline checkout (see run_worker).
BASELINE_REPO_ENV = "ECLIPSE_BENCHMARK_BASELINE_REPO"
if os.environ.get(BASELINE_REPO_ENV):
    sys.path.insert(0, os.environ[BASELINE_REPO_ENV])
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.postprocessing import sem_seg_postprocess  # noqa: E402
from torch import nn  # noqa: E402

import mask2former  # noqa: E402,F401  (registers the model)
from continual.config import setup_cfg  # noqa: E402
from mask2former.modeling import postprocessing  # noqa: E402
try:  # absent from the checkouts before it (--baseline-repo)
    from mask2former.modeling import cpu_conv  # noqa: E402
except ImportError:
    cpu_conv = None
from mask2former.modeling.pixel_decoder import msdeformattn  # noqa: E402
from mask2former.modeling.transformer_decoder import mask2former_transformer_decoder as decoder_module  # noqa: E402

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


@contextlib.contextmanager
def previous_cpu_paths(model):
    """Within the block, ``model`` runs the computation paths of the official implementation
    that this checkout replaced on CPU, for an in-process A/B comparison (same weights, same
    inputs, runs interleaved):

    * every decoder layer's class logits and full-resolution masks
      (``full_intermediate_predictions``), the attention masks resized with ``F.interpolate``
      from full-resolution mask logits, a bool attention mask repeated for every head, one
      mask-head call per query group, the mask einsum's full backward, and the official
      per-group self-attention loop at inference (:func:`official_per_group_loop`);
    * decoder memory tokens in the official ``[HW, B, C]`` permuted (non-contiguous) layout;
    * the ``grid_sample`` deformable-attention core (``MSDeformAttn.forward``);
    * ``F.conv2d`` on channel-major maps for every convolution (no oneDNN call, no
      channels-last input, the frozen norms after the convolutions; ``modeling/cpu_conv.py``);
    * the crop/resize pass of the post-processing even when it is the identity, the sigmoid
      of every map into a fresh stack and a boolean index for the kept ones, the ``argmax``
      over the queries of the full-resolution score-times-probability stack, and
      ``F.one_hot`` for the semantic map.
    """
    def grid_sample_attention(attn, query, reference_points, src, shapes, start, padding_mask):
        return attn(query, reference_points, src, shapes, start, padding_mask)

    def mask_input(mask_pred, image_size, output_size, settings):
        if settings.sem_seg_postprocess_before_inference:
            return sem_seg_postprocess(mask_pred, image_size, output_size[0], output_size[1])
        return mask_pred

    def kept_queries(mask_cls, mask_pred, num_classes, object_mask_threshold, use_sigmoid, in_place=False):
        # the sigmoid of every map, then a boolean index over the queries
        scores, labels = postprocessing.class_scores_and_labels(mask_cls, use_sigmoid)
        keep = postprocessing._keep_rule(scores, labels, num_classes, object_mask_threshold)
        return scores[keep], labels[keep], mask_pred.sigmoid()[keep]

    def best_query(scores, masks):
        return (scores.view(-1, 1, 1) * masks).argmax(0)

    def interpolate(x, size):
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)

    pred = model.sem_seg_head.predictor
    prepare_memories = pred._prepare_memories

    def bool_per_head_mask(attn_logits):
        blocked = attn_logits.detach().sigmoid().flatten(2) < 0.5
        blocked[blocked.all(-1)] = False
        return blocked.unsqueeze(1).repeat(1, pred.num_heads, 1, 1).flatten(0, 1)

    def permuted_memories(x):
        # the same values in the layout of ``feature.flatten(2).permute(2, 0, 1)``
        return [tuple(t.permute(1, 2, 0).contiguous().permute(2, 0, 1) for t in (src, pos)) + (size,)
                for src, pos, size in prepare_memories(x)]

    names = ((msdeformattn, "_deformable_attention", grid_sample_attention),
             (postprocessing, "inference_mask_input", mask_input),
             (postprocessing, "_kept_queries", kept_queries),
             (postprocessing, "_best_query", best_query),
             (postprocessing, "_one_hot_map",
              lambda labels, channels: torch.nn.functional.one_hot(labels, channels).permute(2, 0, 1).float()),
             (decoder_module, "resize_bilinear", interpolate),
             (decoder_module, "mask_logits", lambda emb, features: torch.einsum("bqc,bchw->bqhw", emb, features)))
    saved = [getattr(module, name) for module, name, _ in names]
    for module, name, previous in names:
        setattr(module, name, previous)
    pred.full_intermediate_predictions = True
    pred._blocked = bool_per_head_mask
    pred._inference_mask_heads = lambda sizes: (pred._mask_heads(), sizes)
    pred._prepare_memories = permuted_memories
    conv2d = cpu_conv.disabled() if cpu_conv is not None else contextlib.nullcontext()
    try:
        with official_per_group_loop(pred), conv2d:
            yield model
    finally:
        for (module, name, _), current in zip(names, saved):
            setattr(module, name, current)
        del pred.full_intermediate_predictions, pred._blocked, pred._inference_mask_heads, pred._prepare_memories


def _timed_ab(fn, previous, warmup: int, runs: int):
    """Times of ``fn`` (new) and of ``fn`` within ``previous()`` (old), runs interleaved."""
    new, old = [], []
    for i in range(warmup + runs):
        for times, ctx in ((new, contextlib.nullcontext), (old, previous)):
            with ctx():
                t0 = time.perf_counter()
                fn()
                elapsed = (time.perf_counter() - t0) * 1000.0
            if i >= warmup:
                times.append(elapsed)
    return new, old


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
    if spec.get("bf16"):
        cfg.MODEL.CPU_BF16 = True
    model = build_model(cfg).eval()
    bf16 = {"on": bool(spec.get("bf16"))}  # switched off inside float32_paths() below

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16["on"] else contextlib.nullcontext()

    @contextlib.contextmanager
    def float32_paths():
        """The same model and inputs with MODEL.CPU_BF16 switched off (in-process A/B)."""
        bf16["on"] = model.cpu_bf16 = model.sem_seg_head.pixel_decoder.cpu_bf16 = False
        try:
            yield
        finally:
            bf16["on"] = model.cpu_bf16 = model.sem_seg_head.pixel_decoder.cpu_bf16 = True
    pred = model.sem_seg_head.predictor
    size = spec["image_size"]
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
               "height": size, "width": size}]

    with torch.no_grad():
        images = model.preprocess_images(inputs)
        # float32 inputs for the decoder-only and pixel-decoder-only timings, in both modes
        features = model.backbone(images.tensor)
        mask_features, _, multi_scale = model.sem_seg_head.pixel_decoder.forward_features(features)

        def decoder():
            with autocast():
                return pred(multi_scale, mask_features, None)

        def pixel_decoder():
            with autocast():
                return model.sem_seg_head.pixel_decoder.forward_features(features)

        def whole():
            return model(inputs)

        result = {
            "package": str(Path(mask2former.__file__).resolve().parent),
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
            if spec["variant"] in (AB, BF16):
                prev = (lambda: previous_cpu_paths(model)) if spec["variant"] == AB else float32_paths
                with prev():
                    old = decoder()
                new = decoder()
                result["max_abs_diff"] = max(
                    (new[k] - old[k]).abs().max().item() for k in ("pred_logits", "pred_masks")
                )
                dec_times, result["previous_decoder_ms"] = _timed_ab(decoder, prev, spec["warmup"], spec["runs"])
                pix_times, result["previous_pixel_decoder_ms"] = _timed_ab(
                    pixel_decoder, prev, spec["warmup"], spec["runs"])
                whole_times, result["previous_whole_ms"] = _timed_ab(whole, prev, spec["warmup"], spec["runs"])
            else:
                dec_times = _timed(decoder, spec["warmup"], spec["runs"])
                pix_times = _timed(pixel_decoder, spec["warmup"], spec["runs"])
                whole_times = _timed(whole, spec["warmup"], spec["runs"])
        if spec.get("save"):
            out = decoder()
            torch.save({"pixel_decoder": mask_features.float(), "pred_logits": out["pred_logits"].float(),
                        "pred_masks": out["pred_masks"].float()}, spec["save"])
    result.update(
        decoder_ms=dec_times,
        pixel_decoder_ms=pix_times,
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


BASELINE = "baseline (--baseline-repo), float32"
BF16 = "this checkout, MODEL.CPU_BF16 True"
AB = "this checkout vs its previous CPU paths, in-process A/B"


def cases(sizes, steps=STEPS, loop=True, baseline=False, bf16=False, ab=False):
    for size in sizes:
        for step in steps:
            if baseline:
                yield size, step, BASELINE
            yield size, step, SINGLE if step == 0 else GROUPED
            if ab:
                yield size, step, AB
            if step > 0 and loop:
                yield size, step, LOOP
            if bf16:
                yield size, step, BF16


def run_worker(script: str, spec: dict) -> dict:
    """Run ``script --worker SPEC`` in a fresh process with ``spec["threads"]`` threads; its JSON
    result (the last line starting with ``{``)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env.pop(BASELINE_REPO_ENV, None)
    if spec.get("repo"):  # the baseline checkout's packages come first on the worker's path
        env[BASELINE_REPO_ENV] = spec["repo"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=spec.get("repo") or str(REPO))
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


def _output_diff(path, base_path) -> str:
    """Largest |difference| of pixel-decoder mask features, final class logits and final mask
    logits between two saved runs."""
    mine, base = torch.load(path, weights_only=True), torch.load(base_path, weights_only=True)
    return ", ".join(f"{k} {(mine[k] - base[k]).abs().max().item():.1e}"
                     for k in ("pixel_decoder", "pred_logits", "pred_masks"))


def _ratio(new, old) -> str:
    """``median ratio (min ratio)`` of two lists of times."""
    return f"{statistics.median(new) / statistics.median(old):.2f}x ({min(new) / min(old):.2f}x)"


def _fmt(times):
    return f"{statistics.median(times):.1f} / {min(times):.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, runs=10, warmup=2)
    parser.add_argument("--in-process", action="store_true",
                        help="run every case in this process (no per-case peak RSS)")
    parser.add_argument("--steps", default="0,10", help="comma-separated steps of 100-5 (default 0,10)")
    parser.add_argument("--no-loop", action="store_true", help="skip the official per-group loop rows")
    parser.add_argument("--baseline-repo", help="also time the package of this checkout (same weights); "
                        "ratios are new / baseline")
    parser.add_argument("--bf16", action="store_true", help="also time MODEL.CPU_BF16 True")
    parser.add_argument("--ab", action="store_true", help="also time this checkout against its previous "
                        "CPU paths in one process, runs interleaved (robust ratios on a noisy machine)")
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
        "| model | step | queries (groups) | variant | pixel decoder ms | decoder ms | whole-model ms "
        "| ratio, median (min): pixel decoder / decoder / whole | peak RSS MB | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows, baselines = [], {}
    steps = [int(x) for x in args.steps.split(",") if x.strip()]
    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    for size, step, variant in cases(sizes, steps, not args.no_loop, bool(args.baseline_repo), args.bf16,
                                     args.ab):
        spec = {"size": size, "step": step, "variant": variant, "threads": args.threads,
                "runs": args.runs, "warmup": args.warmup, "image_size": args.image_size,
                "bf16": variant == BF16, "save": os.path.join(tmp, f"{size}_{step}_{len(rows)}.pt")}
        if variant == BASELINE:
            spec["repo"] = str(Path(args.baseline_repo).resolve())
        res = run_case(spec, args.in_process and variant != BASELINE)
        rss = "n/a" if args.in_process else f"{res['peak_rss_mb']:.0f}"
        diff = "-" if res["max_abs_diff"] is None else f"{res['max_abs_diff']:.1e} vs grouped"
        ratio = "-"
        if variant == BASELINE:
            if not res["package"].startswith(spec["repo"]):
                raise RuntimeError(f"the baseline worker imported {res['package']}, not {spec['repo']}")
            baselines[(size, step)] = (res, spec["save"])
        elif (size, step) in baselines and variant not in (AB, BF16):
            base, base_file = baselines[(size, step)]
            ratio = " / ".join(_ratio(res[k], base[k]) for k in ("pixel_decoder_ms", "decoder_ms", "whole_ms"))
            diff = _output_diff(spec["save"], base_file) + " vs baseline"
        if variant in (AB, BF16):
            what = "previous paths" if variant == AB else "float32"
            ratio = " / ".join(_ratio(res[k], res["previous_" + k])
                               for k in ("pixel_decoder_ms", "decoder_ms", "whole_ms")) + f" (vs {what}, A/B)"
            if (size, step) in baselines:
                base = baselines[(size, step)][0]
                ratio += "; vs baseline: " + " / ".join(
                    _ratio(res[k], base[k]) for k in ("pixel_decoder_ms", "decoder_ms", "whole_ms"))
            diff = f"{res['max_abs_diff']:.1e} vs {what}"
            if variant == BF16:
                diff += "; " + _output_diff(spec["save"], baselines[(size, step)][1]) + " vs baseline" \
                    if (size, step) in baselines else ""
            label = "previous CPU paths (A/B)" if variant == AB else "this checkout, float32 (A/B with the bf16 row)"
            prev_row = (f"| {size} | {step} | {res['queries']} ({res['groups']}) | {label} | "
                        f"{_fmt(res['previous_pixel_decoder_ms'])} | {_fmt(res['previous_decoder_ms'])} | "
                        f"{_fmt(res['previous_whole_ms'])} | - | - | - |")
            rows.append(prev_row)
            print(prev_row, flush=True)
        row = (f"| {size} | {step} | {res['queries']} ({res['groups']}) | {variant} | "
               f"{_fmt(res['pixel_decoder_ms'])} | {_fmt(res['decoder_ms'])} | {_fmt(res['whole_ms'])} | "
               f"{ratio} | {rss} | {diff} |")
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
