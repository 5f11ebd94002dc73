#!/usr/bin/env python
"""Smoke demo: build the model from a config, train it briefly on generated images, run it on
new generated images and save the panoptic results.

    python tools/demo_smoke.py --config-file configs/synthetic/maskformer2_R18_tiny.yaml \
        --output output/demo [--iters 150] [KEY VALUE ...]

Writes to ``--output``: ``panoptic_<i>.png`` (Detectron2 Visualizer overlays), ``result.json``
(segments per image, losses) and ``model_final.pth``. Runs on a CPU in about a minute.
"""
import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402

import mask2former  # noqa: E402,F401  (registers the model)
from continual.config import add_continual_config  # noqa: E402
from mask2former.config import add_maskformer2_config  # noqa: E402
from mask2former.data.datasets.synthetic import (  # noqa: E402
    register_synthetic_metadata,
    render_sample,
    sample_to_model_input,
)

logger = logging.getLogger("demo_smoke")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--output", default="output/demo")
    p.add_argument("--iters", type=int, default=150, help="training iterations on generated images")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-images", type=int, default=4, help="images to run inference on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def setup_cfg(args):
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    add_continual_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu" if not torch.cuda.is_available() else cfg.MODEL.DEVICE
    if cfg.CONT.TASK != 0:
        raise SystemExit("demo_smoke trains step 0 only; drop the CONT.TASK override")
    cfg.freeze()
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="demo_smoke")
    os.makedirs(args.output, exist_ok=True)
    cfg = setup_cfg(args)
    torch.manual_seed(args.seed)
    metadata = register_synthetic_metadata(cfg.DATASETS.TRAIN[0])
    model = build_model(cfg)  # reads the thing classes from the metadata registered above
    base_classes = set(range(1, cfg.CONT.BASE_CLS + 1))
    rng = np.random.default_rng(args.seed)
    size = cfg.INPUT.CROP.SIZE

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    model.train()
    start, history = time.perf_counter(), []
    for it in range(1, args.iters + 1):
        batch = [sample_to_model_input(*render_sample(rng, *size), classes=base_classes)
                 for _ in range(cfg.SOLVER.IMS_PER_BATCH)]
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
        optimizer.step()
        history.append(loss.item())
        if it % 10 == 0 or it == args.iters:
            elapsed = time.perf_counter() - start
            eta = elapsed / it * (args.iters - it)
            logger.info(f"iter {it}/{args.iters}  loss {np.mean(history[-10:]):.2f}  "
                        f"{elapsed / it:.2f} s/iter  ETA {eta:.0f} s")
    DetectionCheckpointer(model, save_dir=args.output).save("model_final")

    model.eval()
    results = []
    with torch.no_grad():
        for i in range(args.num_images):
            image, _, gt_segments = render_sample(rng, *size)
            inputs = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()),
                      "height": image.shape[0], "width": image.shape[1]}
            panoptic, segments = model([inputs])[0]["panoptic_seg"]
            vis = Visualizer(image, metadata, scale=3.0, instance_mode=ColorMode.IMAGE)
            out = vis.draw_panoptic_seg(panoptic, segments).get_image()
            path = os.path.join(args.output, f"panoptic_{i}.png")
            from PIL import Image

            Image.fromarray(out).save(path)
            names = [metadata.stuff_classes[s["category_id"]] for s in segments]
            gt_names = [metadata.stuff_classes[s["category_id"]] for s in gt_segments
                        if s["category_id"] in base_classes]
            logger.info(f"image {i}: predicted {names}; ground truth (base classes) {gt_names} -> {path}")
            results.append({"image": i, "segments": segments, "names": names, "ground_truth": gt_names})
    summary = {"config": args.config_file, "iterations": args.iters,
               "first_loss": history[0], "last_loss": float(np.mean(history[-10:])), "images": results}
    with open(os.path.join(args.output, "result.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info(f"loss {history[0]:.1f} -> {summary['last_loss']:.1f}; results in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
