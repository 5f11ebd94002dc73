#!/usr/bin/env python
"""Train or evaluate one step of a continual segmentation scenario with ECLIPSE.

    python train_continual.py --config-file configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml \
        --num-gpus 4 CONT.BASE_CLS 100 CONT.INC_CLS 5 CONT.TASK 1 CONT.NUM_PROMPTS 10 ... NAME my_run

Outputs go to ``OUTPUT_DIR/<TASK_NAME>/<NAME>/step<CONT.TASK>`` (see README). Use ``--resume`` to
continue an interrupted step and ``--eval-only`` to evaluate ``CONT.WEIGHTS`` (or MODEL.WEIGHTS).
"""
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import mask2former  # noqa: F401  (registers the model and the datasets)
from continual.checkpoint import check_checkpoint_for_step, read_model_state
from continual.compat import check_continual_keys
from continual.config import setup_cfg, setup_continual_names
from continual.trainer import IncrementalTrainer, write_step_results

logger = logging.getLogger("train_continual")


def setup(args):
    """Config from the file and the command line, with the derived run names."""
    cfg = setup_cfg(args.config_file, args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.MODEL.DEVICE = "cpu"
    setup_continual_names(cfg)
    check_continual_keys(cfg, training=not args.eval_only)
    if args.eval_only:
        # keep an evaluation's files apart from the training run of the same step
        cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "eval_only")
        if cfg.CONT.WEIGHTS:
            cfg.MODEL.WEIGHTS = cfg.CONT.WEIGHTS
    cfg.freeze()
    default_setup(cfg, args)
    for name in ("continual", "mask2former", "train_continual"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name, abbrev_name=name[:4])
    if cfg.WANDB and comm.is_main_process():
        _init_wandb(cfg)
    return cfg


def _init_wandb(cfg):
    try:
        import wandb  # optional dependency, only for WANDB True
    except ImportError as e:
        raise SystemExit("WANDB True needs the `wandb` package (pip install wandb), or pass WANDB False") from e
    wandb.init(project="eclipse-d2", name=f"{cfg.TASK_NAME}/{cfg.NAME}/step{cfg.CONT.TASK}", config=cfg, sync_tensorboard=True)


def evaluate(cfg):
    """Evaluate the weights in ``MODEL.WEIGHTS`` for ``CONT.TASK`` (checked against the step)."""
    model = IncrementalTrainer.build_model(cfg)
    weights = cfg.MODEL.WEIGHTS
    if not weights or not os.path.isfile(weights):
        raise FileNotFoundError(f"--eval-only needs a checkpoint: CONT.WEIGHTS / MODEL.WEIGHTS {weights!r} does not exist")
    check_checkpoint_for_step(read_model_state(weights), model, cfg.CONT.TASK, previous_step=False, source=weights)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights, resume=False)
    results = IncrementalTrainer.test(cfg, model)
    if comm.is_main_process():
        write_step_results(cfg, results, train=False)
    return results


def main(args):
    cfg = setup(args)
    if args.eval_only:
        return evaluate(cfg)
    trainer = IncrementalTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command line arguments:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
