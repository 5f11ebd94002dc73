#!/usr/bin/env python
"""Parameters (total / trainable) per continual step and FLOPs per image of a config.

For every step in ``--tasks`` the model of that step is built as the trainer builds it
(``CONT.TASK t``, the step's freezing applied, random weights) and reports

* parameters: total, trainable, and both per top-level part (backbone, pixel decoder,
  transformer decoder);
* FLOPs of one image through the network (backbone, pixel decoder, transformer decoder: what
  runs before post-processing), counted by fvcore's ``FlopCountAnalysis`` on a synthetic
  image of the config's test size (``INPUT.MIN_SIZE_TEST`` square, or ``--image-size``),
  padded to ``SIZE_DIVISIBILITY``. fvcore counts one fused multiply-add as one flop. Operators
  it has no formula for (e.g. ``grid_sample`` of the deformable attention) are listed in a
  warning and count zero, so the total is a lower bound when the list is not empty.

Usage::

    python tools/analyze_model.py --config-file configs/synthetic/maskformer2_R18_tiny.yaml \\
        --tasks 0,1 CONT.NUM_PROMPTS 4
    python tools/analyze_model.py --config-file F --tasks 0,1,2 --no-flops --output analysis.md
"""
import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from continual.config import setup_cfg  # noqa: E402
from continual.trainer import IncrementalTrainer  # noqa: E402
from mask2former.modeling import cpu_conv  # noqa: E402

PARTS = (("backbone", "backbone."), ("pixel decoder", "sem_seg_head.pixel_decoder."),
         ("transformer decoder", "sem_seg_head.predictor."))


def build_config(config_file, opts):
    """The config as train_continual.py builds it (file, then command-line ``KEY VALUE`` pairs)."""
    return setup_cfg(config_file, opts)


def count_parameters(model):
    """``{"total", "trainable", "parts": {part: {"total", "trainable"}}}``."""
    result = {"total": 0, "trainable": 0, "parts": {name: {"total": 0, "trainable": 0} for name, _ in PARTS}}
    result["parts"]["other"] = {"total": 0, "trainable": 0}
    for name, p in model.named_parameters():
        part = next((label for label, prefix in PARTS if name.startswith(prefix)), "other")
        for bucket in (result, result["parts"][part]):
            bucket["total"] += p.numel()
            bucket["trainable"] += p.numel() if p.requires_grad else 0
    return result


class _Network(nn.Module):
    """The network without pre/post-processing: a normalised image batch to (class logits, mask
    logits)."""

    def __init__(self, model):
        super().__init__()
        self.backbone, self.sem_seg_head = model.backbone, model.sem_seg_head

    def forward(self, images):
        out = self.sem_seg_head(self.backbone(images))
        return out["pred_logits"], out["pred_masks"]


def _sdpa_flops(inputs, outputs):
    """fvcore handle for scaled_dot_product_attention: q @ k^T and weights @ v (multiply-adds)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for n in q[:-2]:
        batch *= n
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_flops(model, cfg, image_size):
    """FLOPs of one image through the network; returns (flops, {unsupported op: count})."""
    height, width = image_size
    div = max(int(cfg.INPUT.SIZE_DIVISIBILITY), 1)
    height, width = -(-height // div) * div, -(-width // div) * div
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    network = _Network(model).eval()
    analysis = FlopCountAnalysis(network, (images,)).set_op_handle(
        "aten::scaled_dot_product_attention", _sdpa_flops
    )
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    # the convolutions as F.conv2d (fvcore counts them; the oneDNN call of the CPU path it does not)
    with cpu_conv.disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent Python values
        total = analysis.total()
    return total, dict(analysis.unsupported_ops()), (height, width)


def analyze(cfg, tasks, image_size=None, flops=True):
    """One row per step: parameters and (optionally) FLOPs."""
    logging.getLogger("continual").setLevel(logging.WARNING)
    rows = []
    for task in tasks:
        step_cfg = cfg.clone()
        step_cfg.defrost()
        step_cfg.merge_from_list(["CONT.TASK", str(task), "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
        torch.manual_seed(0)
        model = IncrementalTrainer.build_model(step_cfg)
        row = {"task": task, "num_prompts": step_cfg.CONT.NUM_PROMPTS, "params": count_parameters(model)}
        if flops:
            size = image_size or (step_cfg.INPUT.MIN_SIZE_TEST, step_cfg.INPUT.MIN_SIZE_TEST)
            row["flops"], row["unsupported_ops"], row["image_size"] = count_flops(model, step_cfg, size)
        rows.append(row)
    return rows


def format_table(rows):
    lines = ["| step | prompts | parameters | trainable | trainable % | "
             + " | ".join(f"{label} (trainable)" for label, _ in PARTS) + " | GFLOPs / image |",
             "|---|---|---|---|---|" + "---|" * len(PARTS) + "---|"]
    for r in rows:
        p = r["params"]
        parts = " | ".join(f"{p['parts'][label]['total']:,} ({p['parts'][label]['trainable']:,})" for label, _ in PARTS)
        flops = "-"
        if "flops" in r:
            flops = f"{r['flops'] / 1e9:.3f} at {r['image_size'][0]}x{r['image_size'][1]}"
            if r["unsupported_ops"]:
                flops += " (lower bound)"
        lines.append(f"| {r['task']} | {r['num_prompts']} | {p['total']:,} | {p['trainable']:,} | "
                     f"{100.0 * p['trainable'] / max(p['total'], 1):.2f} | {parts} | {flops} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", default=None,
                        help="comma-separated steps (default: 0 and the config's CONT.TASK)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="FLOPs input size (default: INPUT.MIN_SIZE_TEST square)")
    parser.add_argument("--no-flops", action="store_true", help="parameters only")
    parser.add_argument("--output", help="write the table to this .md file and the numbers to the .json next to it")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)

    cfg = build_config(args.config_file, args.opts)
    if args.tasks:
        tasks = [int(t) for t in args.tasks.split(",")]
    else:
        tasks = sorted({0, int(cfg.CONT.TASK)})
    rows = analyze(cfg, tasks, tuple(args.image_size) if args.image_size else None, flops=not args.no_flops)
    unsupported = sorted({op for r in rows for op in r.get("unsupported_ops", {})})
    if unsupported:
        warnings.warn(f"fvcore cannot count these operators; they count 0 FLOPs: {', '.join(unsupported)}")
    table = format_table(rows)
    print(table)
    if unsupported:
        print(f"\nnot counted by fvcore (0 FLOPs): {', '.join(unsupported)}")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        note = f"\n\nnot counted by fvcore (0 FLOPs): {', '.join(unsupported)}" if unsupported else ""
        out.with_suffix(".md").write_text(f"config: {args.config_file} {' '.join(args.opts)}\n\n{table}{note}\n")
        out.with_suffix(".json").write_text(json.dumps(
            {"config_file": args.config_file, "opts": args.opts, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
