"""Gradient accumulation: one device reproduces the optimizer steps of a multi-device run.

``SOLVER.IMS_PER_BATCH`` is the global batch of one optimizer step, as in Detectron2. With
``SOLVER.ACCUMULATE_STEPS A`` (or the smallest ``A`` that keeps a micro-batch within
``SOLVER.MAX_IMS_PER_DEVICE`` images, :func:`accumulation_plan`) each of the ``W`` processes loads
``A`` micro-batches of ``IMS_PER_BATCH / (W * A)`` images per step, runs forward and backward on
each and then steps the optimizer once. The micro-batches behave like ``W * A`` processes of a DDP run:

* every micro-batch loss is divided by ``A`` (DDP divides the summed gradients by ``W``), so
  per-batch means (the class loss) average over the global batch;
* the mask losses are normalised by the number of target masks of the **whole** step (every
  micro-batch of every process) divided by ``W * A``, at least 1, which is what the set
  criterion's all-reduce gives in a run with ``W * A`` processes. The micro-batches of a step are
  therefore loaded before the first forward and their masks counted
  (:func:`mask2former.modeling.criterion.fixed_num_masks`);
* the sampler hands out the same images per step: one process with ``A = 4`` sees, in every
  step, the 16 images that 4 processes see (grouped differently into micro-batches, which only
  matters for padding and for batch statistics).

With FrozenBN (or no BatchNorm in training) the optimizer therefore sees the gradient of the
multi-process run up to float rounding (tested against a 2-process DDP run). SyncBN computes its
statistics over the global batch; with accumulation they come from each micro-batch, so
SyncBN models (e.g. the ADE20K-semantic R101 config) are close to, not equal to, the
multi-device run. Plain BatchNorm is per-device in both cases, so it matches whenever the
micro-batch equals the per-device batch of the reference run.
"""
import contextlib
import logging
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from mask2former.modeling.criterion import fixed_num_masks

__all__ = ["AccumulatingTrainer", "accumulation_plan", "build_step_trainer", "micro_batch_size", "count_target_masks"]

logger = logging.getLogger(__name__)


def accumulation_plan(cfg, world_size: int) -> Tuple[int, int]:
    """``(accumulate_steps, micro_batch)`` of a run with ``world_size`` processes.

    ``SOLVER.IMS_PER_BATCH`` is the global batch. The number of micro-batches per step is the
    smallest ``A >= SOLVER.ACCUMULATE_STEPS`` such that the global batch splits evenly into
    ``world_size * A`` micro-batches and, when ``SOLVER.MAX_IMS_PER_DEVICE > 0``, a micro-batch
    holds at most that many images. The micro-batch is ``IMS_PER_BATCH / (world_size * A)``.

    Raises:
        ValueError: a setting below 1 / below 0, or no ``A`` satisfies the rule.
    """
    solver = cfg.SOLVER
    requested = int(solver.get("ACCUMULATE_STEPS", 1))
    limit = int(solver.get("MAX_IMS_PER_DEVICE", 0))
    batch = int(solver.IMS_PER_BATCH)
    if requested < 1:
        raise ValueError(f"SOLVER.ACCUMULATE_STEPS must be >= 1, got {requested}")
    if limit < 0:
        raise ValueError(f"SOLVER.MAX_IMS_PER_DEVICE must be >= 0 (0 = no limit), got {limit}")
    for steps in range(requested, batch + 1):
        if batch % (world_size * steps) == 0 and (limit == 0 or batch // (world_size * steps) <= limit):
            return steps, batch // (world_size * steps)
        if limit == 0:
            break
    fits = [a for a in range(1, batch + 1) if batch % (world_size * a) == 0]
    raise ValueError(
        f"SOLVER.IMS_PER_BATCH={batch} (the global batch) cannot be split into {world_size} "
        f"process(es) x SOLVER.ACCUMULATE_STEPS (>= {requested}) micro-batches"
        + (f" of at most SOLVER.MAX_IMS_PER_DEVICE={limit} images" if limit else "")
        + f": the global batch must be a multiple of processes x micro-batches; values that "
        f"divide it on {world_size} process(es): ACCUMULATE_STEPS in {fits}"
    )


def micro_batch_size(cfg, world_size: int) -> int:
    """Images per micro-batch and process (:func:`accumulation_plan`)."""
    return accumulation_plan(cfg, world_size)[1]


def build_step_trainer(cfg, model, data_loader, optimizer, use_amp: bool) -> SimpleTrainer:
    """The inner trainer of a step: Detectron2's ``SimpleTrainer`` / ``AMPTrainer`` when one
    micro-batch makes the step, else :class:`AccumulatingTrainer`. Logs the plan."""
    world = comm.get_world_size()
    steps, micro = accumulation_plan(cfg, world)
    logger.info(f"global batch {cfg.SOLVER.IMS_PER_BATCH} = {world} process(es) x {steps} micro-batches "
                f"x {micro} images")
    if steps == 1:
        return (AMPTrainer if use_amp else SimpleTrainer)(model, data_loader, optimizer)
    scaler = None
    if use_amp:
        from torch.cuda.amp import GradScaler

        scaler = GradScaler()
    return AccumulatingTrainer(model, data_loader, optimizer, steps, grad_scaler=scaler)


def count_target_masks(batch: Sequence[Dict]) -> int:
    """Number of ground-truth masks of a mapped batch (``len(instances)`` summed)."""
    try:
        return sum(len(x["instances"]) for x in batch)
    except KeyError:
        raise ValueError(
            "SOLVER.ACCUMULATE_STEPS > 1 needs training inputs with 'instances' (the MaskFormer "
            "dataset mappers) to count the masks of an optimizer step"
        ) from None


class AccumulatingTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` (or, with ``grad_scaler``, AMP) that accumulates ``accumulate_steps``
    micro-batches per optimizer step, as described in the module docstring.

    Args:
        model, data_loader, optimizer: as for :class:`SimpleTrainer`; the loader yields
            micro-batches (:func:`micro_batch_size`).
        accumulate_steps: micro-batches per optimizer step (``SOLVER.ACCUMULATE_STEPS``).
        grad_scaler: a ``torch.cuda.amp.GradScaler`` for mixed precision, or None (float32).
        precision: autocast dtype with ``grad_scaler``.
    """

    def __init__(self, model, data_loader, optimizer, accumulate_steps: int, grad_scaler=None,
                 precision: torch.dtype = torch.float16):
        super().__init__(model, data_loader, optimizer)
        if accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
        self.accumulate_steps = int(accumulate_steps)
        self.grad_scaler = grad_scaler
        self.precision = precision

    def run_step(self):
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        steps = self.accumulate_steps
        start = time.perf_counter()
        micro = [next(self._data_loader_iter) for _ in range(steps)]
        data_time = time.perf_counter() - start

        counts = [count_target_masks(batch) for batch in micro]
        world = comm.get_world_size()
        total = torch.tensor([float(sum(counts))], device=next(self.model.parameters()).device)
        if world > 1:
            dist.all_reduce(total)
        num_masks = max(total.item() / (world * steps), 1.0)

        self.optimizer.zero_grad()
        logged: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            last = i == steps - 1
            sync = (self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last
                    else contextlib.nullcontext())
            with sync, contextlib.ExitStack() as stack:
                # every set criterion of the process (the model's, a distillation step's)
                stack.enter_context(fixed_num_masks(num_masks, counts[i]))
                if self.grad_scaler is not None:
                    stack.enter_context(torch.autocast("cuda", dtype=self.precision))
                loss_dict = self.model(batch)
                losses = sum(loss_dict.values()) / steps
                stack.close()  # leave autocast before backward, as AMPTrainer does
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(losses).backward()
                else:
                    losses.backward()
            for key, value in loss_dict.items():
                logged[key] = logged.get(key, 0.0) + value.detach() / steps

        self.after_backward()
        self._write_metrics(logged, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
