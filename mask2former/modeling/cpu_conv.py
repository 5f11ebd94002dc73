"""Convolutions on CPU through oneDNN, channels-last, when no gradient is needed.

PyTorch sends a 1x1 convolution on CPU with one intra-op thread to its generic
im2col + GEMM kernel (``_slow_conv2d_forward``), which for the ResNet's and the pixel decoder's
1x1 convolutions runs at a third to two thirds of the oneDNN kernel's speed, and a
channel-major (NCHW) input costs oneDNN a layout conversion per call. Without autograd
(inference, and the frozen backbone and pixel decoder of a prompt step), on CPU, in float32
and without autocast, the convolutions of a model prepared by :func:`use_cpu_convolutions`
call oneDNN directly (``torch.mkldnn_convolution``, the kernel ``F.conv2d`` itself picks for
every other convolution there), and a Detectron2 ``Conv2d`` followed by a
``FrozenBatchNorm2d`` runs as one convolution with the norm folded into its weight and bias.
The meta-architecture then feeds the backbone a channels-last image, so every map after it
stays channels-last. Values agree with ``F.conv2d`` (+ norm) up to float summation order.

With autograd (step-0 training) the modules run their own ``forward`` on channel-major
maps: forward + backward measured no faster through oneDNN, and the training numerics stay
those of ``F.conv2d``. So do other cases: GPU, other dtypes, autocast, empty inputs, padding
modes other than zeros.
"""
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from detectron2.layers import Conv2d as D2Conv2d
from detectron2.layers import FrozenBatchNorm2d
from torch import Tensor, nn

__all__ = ["use_cpu_convolutions", "onednn_applies", "backbone_input", "disabled"]

#: off: every convolution goes through ``F.conv2d`` on channel-major maps (A/B timing, tests)
ENABLED = True


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block every convolution goes through ``F.conv2d`` on channel-major maps
    (``ENABLED`` off; its previous value is restored on exit)."""
    global ENABLED
    previous, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = previous


def _path_on(x: Tensor) -> bool:
    return (
        ENABLED
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def backbone_input(images: Tensor) -> Tensor:
    """The padded image batch as the backbone gets it: channels-last where the oneDNN path is
    on (every map after the first convolution then stays channels-last, which oneDNN
    convolves without layout conversions), unchanged otherwise."""
    if _path_on(images) and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def onednn_applies(module: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``module(x)`` takes the oneDNN path (see the module docstring)."""
    return (
        _path_on(x)
        and x.dtype == torch.float32
        and module.weight.dtype == torch.float32
        and x.dim() == 4
        and x.numel() > 0
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
        and not torch.is_autocast_enabled("cpu")
    )


def _onednn(module: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.mkldnn_convolution(
        x, weight, bias, module.padding, module.stride, module.dilation, module.groups
    )


class CpuConv2d(nn.Conv2d):
    """``nn.Conv2d`` that calls oneDNN on CPU (see the module docstring); same parameters."""

    def forward(self, x: Tensor) -> Tensor:
        if not onednn_applies(self, x):
            return super().forward(x)
        return _onednn(self, x, self.weight, self.bias)


class CpuD2Conv2d(D2Conv2d):
    """Detectron2 ``Conv2d`` that calls oneDNN on CPU and folds a ``FrozenBatchNorm2d`` into
    the convolution there (see the module docstring); same parameters and buffers."""

    def forward(self, x: Tensor) -> Tensor:
        if not onednn_applies(self, x):
            return super().forward(x)
        weight, bias, norm = self.weight, self.bias, self.norm
        if isinstance(norm, FrozenBatchNorm2d):
            # norm(conv(x)) = conv(x) * scale + shift per output channel
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            shift = norm.bias - norm.running_mean * scale
            if bias is not None:
                shift = shift + bias * scale
            weight, bias, norm = weight * scale.view(-1, 1, 1, 1), shift, None
        x = _onednn(self, x, weight, bias)
        if norm is not None:
            x = norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def use_cpu_convolutions(model: nn.Module) -> int:
    """Give every plain ``nn.Conv2d`` and Detectron2 ``Conv2d`` of ``model`` the CPU path above,
    in place: only the class changes (parameters, buffers, names, checkpoints stay the same);
    subclasses of those two are left alone. Returns the number of modules changed."""
    changed = 0
    for module in model.modules():
        if type(module) is D2Conv2d:
            module.__class__ = CpuD2Conv2d
        elif type(module) is nn.Conv2d:
            module.__class__ = CpuConv2d
        else:
            continue
        changed += 1
    return changed
