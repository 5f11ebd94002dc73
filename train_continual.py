#!/usr/bin/env python
"""Train or evaluate one step of a continual segmentation scenario with ECLIPSE.

    python train_continual.py --config-file configs/ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml \
        --num-gpus 4 CONT.BASE_CLS 100 CONT.INC_CLS 5 CONT.TASK 1 CONT.NUM_PROMPTS 10 ... NAME my_run

Outputs go to ``OUTPUT_DIR/<TASK_NAME>/<NAME>/step<CONT.TASK>`` (see README). Use ``--resume`` to
continue an interrupted step and ``--eval-only`` to evaluate ``CONT.WEIGHTS`` (or MODEL.WEIGHTS).
"""
import logging
import os
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import mask2former  # noqa: F401  (registers the model and the datasets)
from continual.checkpoint import CheckpointMismatchError, check_checkpoint_for_step, read_model_state
from continual.checkpoint_io import SafeCheckpointer, UnreadableCheckpointError
from continual.cli import move_flags_first
from continual.compat import check_continual_keys
from continual.config import setup_cfg, setup_continual_names
from continual.run_lock import RunLock, RunLockedError
from continual.trainer import IncrementalTrainer, StepAlreadyFinishedError, refuse_finished_step, write_step_results

logger = logging.getLogger("train_continual")


def build_config(args):
    """Config from the file and the command line, with the derived run names (writes nothing)."""
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
    return cfg


def setup(args):
    """The run's config; writes its ``config.yaml`` and log into ``OUTPUT_DIR``."""
    cfg = build_config(args)
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
    SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights, resume=False)
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


def run(argv=None) -> int:
    """Parse the command line (flags anywhere), refuse a finished step before anything is
    written, hold the step folder's lock (one run per folder) and launch the run."""
    parser = default_argument_parser()
    args = parser.parse_args(move_flags_first(parser, sys.argv[1:] if argv is None else argv))
    print("Command line arguments:", args)
    try:
        cfg = build_config(args)
        if not args.eval_only and not args.resume and args.machine_rank == 0:
            refuse_finished_step(cfg.OUTPUT_DIR, cfg.CONT.TASK, cfg.CONT.OVERWRITE)
        lock = RunLock(cfg.OUTPUT_DIR).acquire() if args.machine_rank == 0 else None
    except (StepAlreadyFinishedError, RunLockedError, UnreadableCheckpointError, CheckpointMismatchError,
            FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(run())
