"""The continual-learning protocol of ECLIPSE around the network of ``mask2former``.

Owns: the one config entry point (``config.setup_cfg``) with the protocol's ``CONT.*`` keys and
run names, scenarios (class order, steps, image membership), the step loaders, what changes
between steps (``prompt_tuning``: initialisation and freezing, driven by the decoder's
``step_modules``), checkpoint validation, evaluation and result files, the trainer, the
distillation baselines (``distillation``: losses and teacher), which official keys act or stop
(``compat``, with weight aligning), the per-step training costs (``costs``), the joint upper
bound (``joint``: its training and evaluation configs), gradient accumulation over micro-batches
(``accumulation``), and the comparison with the official reference fixtures
(``reference_check``).

May import: ``mask2former``, torch, detectron2 and its own modules. See docs/design.md#code-layout.
"""
from .config import add_continual_config, setup_cfg
