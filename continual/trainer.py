"""``IncrementalTrainer``: one step of a continual scenario on top of Detectron2's trainer.

For step ``t = CONT.TASK`` it builds the model with the prompt sets of steps 1..t, loads the
previous step (or ``CONT.WEIGHTS``), initialises and freezes for prompt tuning, trains on the
images of step ``t`` with labels remapped to order positions, evaluates all seen classes on the
full validation set, and writes the results files. A step that was interrupted continues from
its last checkpoint with ``--resume`` (its trained prompts are kept).
"""
import itertools
import json
import logging
import os
import random
import weakref
from typing import Any, Dict, List

import numpy as np
import torch
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.modeling import build_model as build_detectron2_model
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mask2former.data.dataset_mappers import build_train_mapper

from . import joint
from .accumulation import build_step_trainer
from .checkpoint import check_backbone_initialisation, check_checkpoint_for_step, read_model_state
from .checkpoint_io import SafeCheckpointer, UnreadableCheckpointError, checkpoint_is_readable
from .compat import WeightAligningHook, check_continual_keys
from .config import step_output_dir
from .costs import TrainingCostHook
from .data import build_step_test_loader, build_step_train_loader
from .distillation import setup_distillation
from .evaluation import ContinualPanopticEvaluator, ContinualSemSegEvaluator
from .evaluation.results import write_metrics_json, write_official_results
from .io import atomic_write
from .prompt_tuning import configure_trainable_parameters, get_predictor, initialize_new_step, trainable_parameter_names
from .resume import apply_changed_solver_settings, latest_readable_checkpoint, solver_settings

__all__ = ["IncrementalTrainer", "previous_step_weights", "build_param_groups", "StepAlreadyFinishedError",
           "refuse_finished_step"]

logger = logging.getLogger(__name__)

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


class StepAlreadyFinishedError(RuntimeError):
    """The output directory already holds the final weights of this step."""


def refuse_finished_step(output_dir: str, step: int, overwrite: bool) -> None:
    """Stop unless step ``step`` may be trained in ``output_dir``: a readable ``model_final.pth``
    means the step is trained (:class:`StepAlreadyFinishedError`, unless ``overwrite``); an
    unreadable one is repaired by ``--resume``, never trained over silently."""
    final = os.path.join(output_dir, "model_final.pth")
    if not os.path.exists(final) or overwrite:
        return
    if not checkpoint_is_readable(final):
        raise UnreadableCheckpointError(
            f"{final} exists but cannot be read (empty or truncated, e.g. a run killed while writing it), so "
            f"step {step} is not finished. Rerun the same command with --resume: it rewrites the file from the "
            f"last intact checkpoint of {output_dir} (and finishes the step if needed)."
        )
    raise StepAlreadyFinishedError(
        f"{final} exists: step {step} of this run is already trained. Use another NAME or "
        f"OUTPUT_DIR, evaluate it with --eval-only, or set CONT.OVERWRITE True to train it again."
    )


def previous_step_weights(cfg) -> str:
    """``OUTPUT_ROOT/TASK_NAME/NAME/step<t-1>/model_final.pth``: what step ``t`` starts from
    when ``CONT.WEIGHTS`` is not set."""
    return os.path.join(
        step_output_dir(cfg.OUTPUT_ROOT, cfg.TASK_NAME, cfg.NAME, cfg.CONT.TASK - 1), "model_final.pth"
    )


def build_param_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    """One AdamW parameter group per trainable tensor, as in Mask2Former / ECLIPSE.

    Backbone LR x ``SOLVER.BACKBONE_MULTIPLIER``, ``predictor.mask_embed`` LR x
    ``SOLVER.HEAD_MULTIPLIER``; normalisation layers get ``WEIGHT_DECAY_NORM``, embeddings
    (queries, prompts, level embeddings) ``WEIGHT_DECAY_EMBED``, Swin position tables none.
    """
    s = cfg.SOLVER
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or id(value) in seen:
                continue
            seen.add(id(value))
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if "backbone" in module_name:
                lr *= s.BACKBONE_MULTIPLIER
            if ".predictor.mask_embed" in f".{module_name}":
                lr *= s.HEAD_MULTIPLIER
            if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                wd = 0.0
            if isinstance(module, _NORM_TYPES):
                wd = s.WEIGHT_DECAY_NORM
            if isinstance(module, nn.Embedding):
                wd = s.WEIGHT_DECAY_EMBED
            groups.append({"params": [value], "lr": lr, "weight_decay": wd})
    return groups


def _with_full_model_clipping(optim_cls, clip_norm: float, norm_type: float):
    """An optimizer class whose ``step`` first clips the gradient norm over all parameters."""

    class FullModelClipping(optim_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type)
            return super().step(closure=closure)

    FullModelClipping.__name__ = f"{optim_cls.__name__}WithFullModelClipping"
    return FullModelClipping


# ------------------------------------------------------------------ Detectron2 internals
# The only private Detectron2 attributes this package touches, each behind one function.


def _replace_data_stream(trainer: SimpleTrainer, stream) -> None:
    """Make ``trainer`` read its batches from ``stream``. SimpleTrainer creates its iterator
    lazily in the private ``_data_loader_iter_obj`` and has no public setter; a resumed step
    needs its own stream to restore torch's RNG after the loader has drawn its seed."""
    trainer._data_loader_iter_obj = stream


def _last_eval_results(trainer: DefaultTrainer):
    """The results of the last evaluation: DefaultTrainer keeps them in the private
    ``_last_eval_results`` and returns them from ``train()`` only with ``TEST.EXPECTED_RESULTS``."""
    return getattr(trainer, "_last_eval_results", None)


class IncrementalTrainer(DefaultTrainer):
    """Trains and evaluates one step ``CONT.TASK`` of a continual scenario."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ is replaced to (a) wrap CPU models in DDP without device ids
        # (gloo), (b) fall back to float32 when AMP is asked for without a GPU.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        check_continual_keys(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = self._wrap_ddp(model, cfg)
        use_amp = cfg.SOLVER.AMP.ENABLED and torch.cuda.is_available() and cfg.MODEL.DEVICE != "cpu"
        if cfg.SOLVER.AMP.ENABLED and not use_amp:
            logger.info("SOLVER.AMP.ENABLED is ignored without a GPU: training in float32")
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer, use_amp)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @staticmethod
    def _wrap_ddp(model: nn.Module, cfg) -> nn.Module:
        if comm.get_world_size() == 1:
            return model
        on_gpu = next(model.parameters()).is_cuda
        return DistributedDataParallel(
            model,
            device_ids=[comm.get_local_rank()] if on_gpu else None,
            broadcast_buffers=False,
            # at steps > 0 most of the network is frozen and some trainable heads may not be
            # reached by every forward pass
            find_unused_parameters=cfg.CONT.TASK > 0,
        )

    # ------------------------------------------------------------------ builders
    @classmethod
    def build_model(cls, cfg) -> nn.Module:
        """The model of step ``CONT.TASK`` with the step's trainable set (docs/design.md#per-step-modules);
        with ``CONT.JOINT`` one step with every class (:func:`continual.joint.training_config`)."""
        model = build_detectron2_model(joint.training_config(cfg))
        configure_trainable_parameters(model, cfg)
        names = trainable_parameter_names(model)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info(f"step {cfg.CONT.TASK}: {count:,} of {total:,} parameters trainable "
                    f"({100.0 * count / max(total, 1):.2f}%) in {len(names)} tensors")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model: nn.Module) -> torch.optim.Optimizer:
        groups = build_param_groups(cfg, model)
        if not groups:
            raise ValueError("no trainable parameters: check the CONT.*_FREEZE keys and CONT.NUM_PROMPTS")
        name = cfg.SOLVER.OPTIMIZER
        if name == "SGD":
            optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
        elif name == "ADAMW":
            optim_cls, kwargs = torch.optim.AdamW, {}
        else:
            raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {name!r}")
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
            optimizer = optim_cls(groups, cfg.SOLVER.BASE_LR, **kwargs)
        else:
            optimizer = maybe_add_gradient_clipping(cfg, optim_cls)(groups, cfg.SOLVER.BASE_LR, **kwargs)
        return optimizer

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # handles WarmupPolyLR (ADE) and falls back to detectron2's schedulers (COCO). Imported
        # here: detectron2.projects is optional in a Detectron2 install and only training needs it.
        from detectron2.projects.deeplab import build_lr_scheduler

        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_step_train_loader(joint.training_config(cfg), build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_step_test_loader(joint.evaluation_config(cfg), dataset_name, DatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        cfg = joint.evaluation_config(cfg)  # CONT.JOINT: the split of the scenario's last step
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        test = cfg.MODEL.MASK_FORMER.TEST
        evaluators = []
        if test.PANOPTIC_ON and kind in ("ade20k_panoptic_seg", "coco_panoptic_seg"):
            evaluators.append(ContinualPanopticEvaluator.from_config(cfg, dataset_name, output_folder))
        if test.SEMANTIC_ON and kind == "sem_seg":
            evaluators.append(ContinualSemSegEvaluator.from_config(cfg, dataset_name, output_folder))
        if not evaluators:
            raise ValueError(
                f"no evaluator for dataset {dataset_name!r} (evaluator_type {kind!r}) with "
                f"PANOPTIC_ON={test.PANOPTIC_ON}, SEMANTIC_ON={test.SEMANTIC_ON}"
            )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    def build_hooks(self):
        hook_list = super().build_hooks()
        # keep only the newest periodic checkpoint (plus model_final) as the official code does
        for h in hook_list:
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.max_to_keep = 1
                self._periodic_checkpointer = h
        # before the checkpointer and evaluation hooks: times the iterations alone, and writes
        # its file before the final evaluation
        hook_list.insert(2, TrainingCostHook(self.cfg.OUTPUT_DIR))
        if self.cfg.CONT.WA_STEP > 0 and self.cfg.CONT.TASK > 0:
            # before the checkpointer and evaluation hooks, which then see the aligned heads
            hook_list.insert(2, WeightAligningHook(get_predictor(self.model).class_embed))
        return hook_list

    # ------------------------------------------------------------------ weights
    def resume_or_load(self, resume: bool = True) -> None:
        """Resume this step from its last checkpoint, or start it.

        Starting step ``t > 0`` loads ``CONT.WEIGHTS`` (or the previous step's
        ``model_final.pth``), checks that it is the previous step's checkpoint, then initialises
        the new prompt set (:func:`initialize_new_step`). Resuming restores model, optimizer,
        scheduler and iteration and does **not** re-initialise the prompts.
        """
        cfg = self.cfg
        step = cfg.CONT.TASK
        # the baselines' teacher: always the weights the step starts from, also when resuming
        setup_distillation(cfg, self.model, self.step_start_weights(cfg))
        final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if resume and self.checkpointer.has_checkpoint():
            path = latest_readable_checkpoint(cfg.OUTPUT_DIR, self.checkpointer.get_checkpoint_file())
            if path is None:
                raise UnreadableCheckpointError(
                    f"--resume: no checkpoint in {cfg.OUTPUT_DIR} can be read (all empty or truncated). Start "
                    f"the step again without --resume after moving the folder aside, or restore a checkpoint."
                )
            check_checkpoint_for_step(read_model_state(path), self.model, step, previous_step=False, source=path)
            before = solver_settings(self.optimizer, self.scheduler)
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
            changed = apply_changed_solver_settings(self.optimizer, self.scheduler, before)
            if changed:
                logger.warning(
                    "The config changes SOLVER settings of %s; they apply from iteration %d on (the schedule "
                    "continues from the new base values): %s", path, self.start_iter, "; ".join(changed))
            if self.start_iter >= self.max_iter and not checkpoint_is_readable(final):
                logger.warning("%s is missing or unreadable: rewriting it from %s", final, path)
                self.checkpointer.save("model_final", iteration=self.iter)
            elif os.path.basename(path) != "model_final.pth" and getattr(self, "_periodic_checkpointer", None):
                # removed like any older periodic checkpoint once a newer one is written
                self._periodic_checkpointer.recent_checkpoints = [path]
            self._skip_consumed_images(self.start_iter)
            self._continue_random_streams(getattr(self, "_pending_rng", None))
            logger.info(f"resumed step {step} from {path} at iteration {self.start_iter}")
            return
        refuse_finished_step(cfg.OUTPUT_DIR, step, cfg.CONT.OVERWRITE)
        weights = self.step_start_weights(cfg)
        if step > 0:
            if not weights or not os.path.isfile(weights):
                raise FileNotFoundError(
                    f"step {step} starts from the step {step - 1} checkpoint {weights!r}, which does not "
                    f"exist: train step {step - 1} first, or pass it with CONT.WEIGHTS <path>"
                )
            check_checkpoint_for_step(read_model_state(weights), self.model, step, previous_step=True, source=weights)
        self.checkpointer.resume_or_load(weights, resume=False)
        if step == 0 and weights:
            check_backbone_initialisation(self.checkpointer.last_incompatible, weights)
        if step > 0:
            written = initialize_new_step(self.model)
            logger.info(f"initialised step {step}'s prompts and class head from the base model ({len(written)} tensors)")
        self.start_iter = 0

    def _skip_consumed_images(self, start_iter: int) -> None:
        # the data stream continues where the interrupted run stopped (exact with
        # DATALOADER.NUM_WORKERS 0 and one aspect-ratio group; see README)
        sampler = getattr(self.data_loader, "resumable_sampler", None)
        if sampler is not None:
            sampler.start = start_iter * self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()

    def _continue_random_streams(self, rng) -> None:
        """Continue the random streams of the checkpoint. NumPy and Python (augmentation) are
        restored now; torch's once the first batch is fetched, because opening the data stream
        draws a loader seed from torch's generator, which the uninterrupted run did at its start."""
        if not rng:
            return
        self._restore_rng({k: v for k, v in rng.items() if k != "torch"})
        batches = iter(self.data_loader)

        def resumed_stream():
            first = next(batches)
            torch.set_rng_state(rng["torch"])
            yield first
            yield from batches

        _replace_data_stream(self._trainer, resumed_stream())

    def state_dict(self):
        state = super().state_dict()
        # random streams (augmentation, point sampling) so that a resumed step continues them
        # (stored as tensors and plain Python values so checkpoints load with weights_only=True)
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        # applied by resume_or_load once the data stream is open
        self._pending_rng = state.get("rng")

    @staticmethod
    def _restore_rng(rng) -> None:
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng:
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "python" in rng:
            version, internal, gauss_next = rng["python"]
            random.setstate((version, tuple(internal), gauss_next))

    @staticmethod
    def step_start_weights(cfg) -> str:
        """Weights a fresh step starts from: ``CONT.WEIGHTS``, else the previous step's final
        checkpoint (t > 0), else ``MODEL.WEIGHTS`` (step 0, e.g. an ImageNet backbone)."""
        if cfg.CONT.WEIGHTS:
            return cfg.CONT.WEIGHTS
        if cfg.CONT.TASK > 0:
            return previous_step_weights(cfg)
        return cfg.MODEL.WEIGHTS

    # ------------------------------------------------------------------ results
    def train(self):
        try:
            results = super().train()
        except FloatingPointError as e:
            # detectron2 stops before the optimizer step, so the weights on disk are intact
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            lr = self.cfg.SOLVER.BASE_LR
            where = (f"The last good checkpoint is {last}. Rerun the same command with --resume and a lower "
                     f"learning rate, e.g. SOLVER.BASE_LR {lr / 10:g} (now {lr:g}): the resumed run applies it "
                     f"from the checkpoint's iteration on. Or check the data." if last else
                     f"No checkpoint of this step was written yet (see SOLVER.CHECKPOINT_PERIOD): train it again "
                     f"with a lower SOLVER.BASE_LR (now {lr:g}), or check the data.")
            raise FloatingPointError(f"{e}\nStep {self.cfg.CONT.TASK} stopped. {where}") from e
        if comm.is_main_process():
            results = results or _last_eval_results(self)
            if results:
                write_step_results(self.cfg, results, train=True)
        return results


def write_step_results(cfg, results: Dict, train: bool) -> None:
    """Write the results of one step: ``OUTPUT_DIR/eval_results.json``, the run's
    ``metrics.json`` (every step), and after training the official CSV rows in
    ``CONT.RESULTS_DIR/<TASK_NAME>.csv``."""
    with atomic_write(os.path.join(cfg.OUTPUT_DIR, "eval_results.json")) as f:
        json.dump(_to_builtin(results), f, indent=2)
    run_dir = step_output_dir(cfg.OUTPUT_ROOT, cfg.TASK_NAME, cfg.NAME, cfg.CONT.TASK)
    run_dir = os.path.dirname(os.path.normpath(run_dir))
    key = cfg.CONT.TASK if train else f"{cfg.CONT.TASK}-eval"
    write_metrics_json(os.path.join(run_dir, "metrics.json"), key, _to_builtin(results))
    if train:
        write_official_results(cfg.CONT.RESULTS_DIR, cfg.TASK_NAME, cfg.NAME, cfg.CONT.TASK, results)


def _to_builtin(obj):
    if isinstance(obj, dict):
        return {str(k): _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_builtin(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item() if getattr(obj, "ndim", 0) == 0 else obj.tolist()
    return obj
