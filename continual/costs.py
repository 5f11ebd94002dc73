"""The training costs of a step, written next to its checkpoints (``training_costs.json``): how
many parameters it trains, seconds per training iteration and peak memory. The synthetic
benchmark compares them across methods."""
import json
import os
import resource
import statistics
import time

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["TrainingCostHook", "COSTS_FILE"]

COSTS_FILE = "training_costs.json"


class TrainingCostHook(HookBase):
    """After training, writes ``<output_dir>/training_costs.json`` (main process):

    * ``trainable_parameters`` / ``total_parameters`` of the student (a teacher is not counted);
    * ``seconds_per_iteration``: median wall time of one training iteration (forward with the
      teacher's, backward, optimizer step), the first iteration left out (warm-up);
    * ``peak_rss_mb``: peak resident memory of the process up to the end of training (the
      final evaluation comes after); ``peak_gpu_mb``: peak CUDA memory allocated, on GPU.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self._times = []
        self._start = None

    def before_step(self):
        self._start = time.perf_counter()

    def after_step(self):
        if self._start is not None:
            self._times.append(time.perf_counter() - self._start)

    def after_train(self):
        if not comm.is_main_process() or not self._times:
            return
        model = getattr(self.trainer.model, "module", self.trainer.model)
        times = self._times[1:] or self._times
        costs = {
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "iterations_timed": len(times),
            "seconds_per_iteration": round(statistics.median(times), 4),
            # ru_maxrss is in KiB on Linux
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            "torch_threads": torch.get_num_threads(),
        }
        if torch.cuda.is_available():
            costs["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, COSTS_FILE), "w") as f:
            json.dump(costs, f, indent=2)
