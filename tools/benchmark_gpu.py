#!/usr/bin/env python
"""GPU time and peak memory of the deformable-attention implementations (needs CUDA).

Compares the pure-PyTorch deformable attention with the kernels available on this machine
(``triton``; ``cuda_ext`` when the compiled ``MultiScaleDeformableAttention`` extension is
installed), selected with ``set_ms_deform_attn_impl``:

* ``op``: the deformable-attention core alone at the shapes of the real model's pixel decoder
  for a batch of 2 images of ``--image-size`` (levels at strides 8, 16, 32; 8 heads of 32
  channels, 4 points): forward, and forward + backward; max difference of the output from
  the pure-PyTorch result;
* ``inference``: the whole model (``tiny`` / ``real`` of ``tools/benchmark_inference.py``,
  step 0, random weights), one image, panoptic inference;
* ``training``: one training iteration of the same models (forward, backward, AdamW step;
  batch of 2 random images with random targets), step 0 with everything trainable.

Times are CUDA-synchronised wall times in ms (median / min over ``--runs`` after ``--warmup``);
peak memory is ``torch.cuda.max_memory_allocated`` of the case, in MB. The table is printed and
written to ``--output`` (Markdown) and the same path with ``.json``.

Usage (on a machine with a CUDA GPU)::

    python tools/benchmark_gpu.py                       # output/benchmark_gpu.md and .json
    python tools/benchmark_gpu.py --sizes tiny --runs 5 --output gpu.md
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import REPO, build_cfg  # noqa: E402  (puts the repository on sys.path)
from benchmark_training import TRAIN_KEYS  # noqa: E402

import torch  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

import mask2former  # noqa: E402,F401  (registers the model)
from continual.trainer import IncrementalTrainer  # noqa: E402
from mask2former.modeling.pixel_decoder.ms_deform_attn import (  # noqa: E402
    available_ms_deform_attn_impls,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    set_ms_deform_attn_impl,
)


def _cuda_timed(fn, warmup, runs):

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _peak(fn):

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def op_inputs(image_size, batch=2, heads=8, head_dim=32, points=4, queries=None, seed=0):

    shapes = torch.tensor([[image_size // s, image_size // s] for s in (8, 16, 32)], device="cuda")
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_values = int(sizes.sum())
    queries = queries or num_values  # the encoder: every position is a query
    g = torch.Generator(device="cuda").manual_seed(seed)
    value = torch.randn(batch, num_values, heads, head_dim, device="cuda", generator=g)
    loc = torch.rand(batch, queries, heads, 3, points, 2, device="cuda", generator=g)
    weights = torch.rand(batch, queries, heads, 3, points, device="cuda", generator=g).softmax(-1)
    return value, shapes, starts, loc, weights


def bench_op(impl, args):
    value, shapes, starts, loc, weights = op_inputs(args.image_size)
    reference = ms_deform_attn_core_pytorch(value, shapes, loc, weights)
    out = ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)
    diff = (out - reference).abs().max().item()
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]

    def forward():
        with torch.no_grad():
            ms_deform_attn(value, shapes, starts, loc, weights, impl=impl)

    def forward_backward():
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
        torch.autograd.grad(out.sum(), leaves)

    return {
        "forward_ms": _cuda_timed(forward, args.warmup, args.runs),
        "forward_backward_ms": _cuda_timed(forward_backward, args.warmup, args.runs),
        "peak_mb": _peak(forward_backward),
        "max_abs_diff": diff,
    }


def _model_and_batch(size, image_size, batch, train):
    torch.manual_seed(0)
    cfg = build_cfg(size, 0)
    cfg.merge_from_list(TRAIN_KEYS + ["MODEL.DEVICE", "cuda"])
    model = IncrementalTrainer.build_model(cfg).train(train)
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(batch):
        item = {"image": torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8, generator=g),
                "height": image_size, "width": image_size}
        if train:
            inst = Instances((image_size, image_size))
            cells = torch.randint(0, 4, (image_size // 32, image_size // 32), generator=g)
            regions = cells.repeat_interleave(32, 0).repeat_interleave(32, 1)
            inst.gt_masks = torch.stack([regions == r for r in range(4)])
            inst.gt_classes = torch.randint(1, cfg.CONT.BASE_CLS + 1, (4,), generator=g)
            item["instances"] = inst
        inputs.append(item)
    return cfg, model, inputs


def bench_inference(impl, size, args):
    set_ms_deform_attn_impl(impl)
    _, model, inputs = _model_and_batch(size, args.image_size, 1, train=False)

    def run():
        with torch.no_grad():
            model(inputs)

    result = {"ms": _cuda_timed(run, args.warmup, args.runs), "peak_mb": _peak(run)}
    del model
    return result


def bench_training(impl, size, args):
    set_ms_deform_attn_impl(impl)
    cfg, model, inputs = _model_and_batch(size, args.image_size, args.batch, train=True)
    optimizer = IncrementalTrainer.build_optimizer(cfg, model)

    def iteration():
        losses = model(inputs)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    result = {"ms": _cuda_timed(iteration, args.warmup, args.runs), "peak_mb": _peak(iteration)}
    del model, optimizer
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,real")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="training batch")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output", default=str(REPO / "output" / "benchmark_gpu.md"))
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("tools/benchmark_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "the CPU benchmarks are tools/benchmark_inference.py and tools/benchmark_training.py")

    available = available_ms_deform_attn_impls()
    impls = ["pytorch"] + [name for name in ("triton", "cuda_ext") if available.get(name) is None]
    skipped = {name: available[name] for name in ("triton", "cuda_ext") if available.get(name) is not None}
    torch.backends.cudnn.benchmark = False
    rows, results = [], []

    def record(case, impl, r):
        times = r.get("ms") or r.get("forward_backward_ms")
        results.append({"case": case, "impl": impl, **r})
        extra = ""
        if "forward_ms" in r:
            extra = (f"forward {statistics.median(r['forward_ms']):.2f} / {min(r['forward_ms']):.2f}; "
                     f"max diff {r['max_abs_diff']:.1e}")
        rows.append(f"| {case} | {impl} | {statistics.median(times):.2f} / {min(times):.2f} | "
                    f"{r['peak_mb']:.0f} | {extra} |")
        print(rows[-1], flush=True)

    for impl in impls:
        record(f"op (forward + backward, batch 2, {args.image_size}x{args.image_size} levels)", impl, bench_op(impl, args))
    for size in args.sizes.split(","):
        for impl in impls:
            record(f"inference {size}, 1 image", impl, bench_inference(impl, size, args))
        for impl in impls:
            record(f"training iteration {size}, batch {args.batch}", impl, bench_training(impl, size, args))

    header = [
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}",
        f"- images {args.image_size}x{args.image_size}; median / min of {args.runs} runs after {args.warmup} warm-up",
    ]
    header += [f"- not measured: {name} ({why})" for name, why in skipped.items()]
    table = "\n".join(header + ["", "| case | implementation | ms (median / min) | peak MB | notes |",
                                "|---|---|---|---|---|"] + rows)
    print("\n" + table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
         "not_measured": skipped, "results": results}, indent=2))
    print(f"written: {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
