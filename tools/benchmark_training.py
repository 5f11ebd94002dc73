#!/usr/bin/env python
"""CPU time and peak memory of one training iteration at step 0 and at a prompt-tuning step.

At steps > 0 only the newest prompt set (and its small heads) is trained: the backbone and the
pixel decoder run without autograd (no graph, no saved activations) and only P queries go
through the decoder. This script measures what that saves, for the models of
``tools/benchmark_inference.py`` (``tiny``: R18 / 64-d; ``real``: R50 / 256-d, ECLIPSE 100-5
settings) on a batch of random images with random targets:

* step 0: all parameters trainable (backbone included, FREEZE_AT 0), all base queries;
* step 1: the official freezing (``CONT.*_FREEZE True``, prompt mask MLPs, deep prompts).

Each (model, step) runs in a fresh subprocess; its peak RSS (``resource.getrusage``) includes
the imported libraries, so compare rows, not absolute numbers. The time is forward + backward +
optimizer step (AdamW, full-model clipping), median / min over ``--runs`` iterations after
``--warmup`` ones.

``--ab`` also times, in the same worker and interleaved iteration by iteration, the CPU code
paths this checkout replaced (``benchmark_inference.previous_cpu_paths``: grid_sample
deformable attention, every decoder prediction computed at a prompt step) and reports the
ratio; ``--baseline-repo PATH`` runs every case with the package of another checkout too (same
weights and batch; its own process, so its peak RSS is comparable); ``--bf16`` adds
``MODEL.CPU_BF16 True``.

Usage::

    python tools/benchmark_training.py                   # tiny and real, batch 2 of 512x512
    python tools/benchmark_training.py --sizes tiny --image-size 256 --output train_bench.md
    python tools/benchmark_training.py --sizes real --threads 1 --ab --bf16 --baseline-repo ../main
"""
import argparse
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import (  # noqa: E402
    _ratio, _timed, _timed_ab, add_common_arguments, answer_worker_or_prepare, build_cfg, machine_description,
    previous_cpu_paths, run_worker,
)
import torch  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

import mask2former  # noqa: E402  (the package whose path the --baseline-repo check reads)
from continual.trainer import IncrementalTrainer  # noqa: E402

TRAIN_KEYS = [
    "CONT.BACKBONE_FREEZE", "True", "CONT.CLS_HEAD_FREEZE", "True", "CONT.MASK_HEAD_FREEZE", "True",
    "CONT.PIXEL_DECODER_FREEZE", "True", "CONT.QUERY_EMBED_FREEZE", "True", "CONT.TRANS_DECODER_FREEZE", "True",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "12544", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
]


def measure(spec: dict) -> dict:
    """One training configuration: returns times (ms), trainable parameters and peak RSS."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = build_cfg(spec["size"], spec["step"])
    cfg.merge_from_list(TRAIN_KEYS)
    if spec.get("bf16"):
        cfg.MODEL.CPU_BF16 = True
    model = IncrementalTrainer.build_model(cfg)  # the step's freezing applied
    model.train()
    optimizer = IncrementalTrainer.build_optimizer(cfg, model)
    size, g = spec["image_size"], torch.Generator().manual_seed(0)
    classes = sum([cfg.CONT.BASE_CLS] + [cfg.CONT.INC_CLS] * spec["step"])
    first = classes - (cfg.CONT.INC_CLS if spec["step"] else cfg.CONT.BASE_CLS) + 1
    batch = []
    for _ in range(spec["batch"]):
        inst = Instances((size, size))
        regions = torch.randint(0, 4, (size // 32, size // 32), generator=g).repeat_interleave(32, 0).repeat_interleave(32, 1)
        inst.gt_masks = torch.stack([regions == r for r in range(4)])
        inst.gt_classes = torch.randint(first, classes + 1, (4,), generator=g)
        batch.append({"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                      "instances": inst, "height": size, "width": size})

    def iteration():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    result = {"package": str(Path(mask2former.__file__).resolve().parent)}
    if spec.get("ab"):
        times, result["previous_ms"] = _timed_ab(
            iteration, lambda: previous_cpu_paths(model), spec["warmup"], spec["runs"])
    else:
        times = _timed(iteration, spec["warmup"], spec["runs"])
    return {
        **result,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "ms": times,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, runs=5, warmup=1)
    parser.add_argument("--batch", type=int, default=2, help="images per iteration (default 2)")
    parser.add_argument("--ab", action="store_true",
                        help="also time the replaced CPU paths in the same worker, interleaved")
    parser.add_argument("--baseline-repo", help="also run every case with the package of this checkout")
    parser.add_argument("--bf16", action="store_true", help="also time MODEL.CPU_BF16 True")
    parser.add_argument("--steps", default="0,1", help="comma-separated subset of 0,1 (default 0,1)")
    args = parser.parse_args(argv)
    if answer_worker_or_prepare(args, measure):
        return 0
    lines = [machine_description(args.threads),
             f"- batch of {args.batch} random {args.image_size}x{args.image_size} images, "
             f"median / min of {args.runs} iterations after {args.warmup} warm-up",
             "",
             "| model | step | variant | trainable parameters | iteration ms | vs baseline, median (min) | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    variants = (["baseline"] if args.baseline_repo else []) + ["float32"] + (["bf16"] if args.bf16 else [])
    for size in args.sizes.split(","):
        for step in [int(x) for x in args.steps.split(",")]:
            base = None
            for variant in variants:
                spec = {"size": size, "step": step, "threads": args.threads, "runs": args.runs,
                        "warmup": args.warmup, "image_size": args.image_size, "batch": args.batch,
                        "bf16": variant == "bf16", "ab": args.ab and variant == "float32"}
                if variant == "baseline":
                    spec["repo"] = str(Path(args.baseline_repo).resolve())
                r = run_worker(__file__, spec)
                if variant == "baseline" and not r["package"].startswith(spec["repo"]):
                    raise RuntimeError(f"the baseline worker imported {r['package']}, not {spec['repo']}")
                ratio = "-"
                if base is not None:
                    ratio = _ratio(r["ms"], base["ms"])
                if variant == "baseline":
                    base = r
                name = {"baseline": "baseline (--baseline-repo)", "float32": "this checkout, float32",
                        "bf16": "this checkout, MODEL.CPU_BF16 True"}[variant]
                if spec["ab"]:
                    ab = _ratio(r["ms"], r["previous_ms"])
                    lines.append(f"| {size} | {step} | previous CPU paths (A/B, same worker) | "
                                 f"{r['trainable']:,} of {r['total']:,} | "
                                 f"{statistics.median(r['previous_ms']):.0f} / {min(r['previous_ms']):.0f} | - | - |")
                    print(lines[-1], flush=True)
                    name += f" (A/B: {ab} of the previous paths)"
                lines.append(f"| {size} | {step} | {name} | {r['trainable']:,} of {r['total']:,} | "
                             f"{statistics.median(r['ms']):.0f} / {min(r['ms']):.0f} | {ratio} | {r['peak_rss_mb']:.0f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
