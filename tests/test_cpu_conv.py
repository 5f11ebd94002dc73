"""The oneDNN convolution path on CPU (``mask2former/modeling/cpu_conv.py``) against
``F.conv2d`` (+ norm): values and gradients, which modules get it, when it steps aside, and a
whole model fed channels-last against the channel-major one. Small and seeded."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from conftest import FIXTURES
from mask2former.modeling import cpu_conv
from mask2former.modeling.cpu_conv import (CpuConv2d, CpuD2Conv2d, backbone_input, onednn_applies,
                                            use_cpu_convolutions)
from test_cpu_fast_paths import _image_batch, build_fixture_model


@pytest.fixture(autouse=True)
def _single_thread_and_restore():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the case where PyTorch picks its slow 1x1 kernel
    yield
    torch.set_num_threads(previous)
    cpu_conv.ENABLED = True


def _frozen_bn(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.randn(channels, generator=g))
    bn.bias.copy_(torch.randn(channels, generator=g))
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def _both_paths(module, x):
    """Outputs without autograd with the oneDNN path on and off."""
    outputs = []
    with torch.no_grad():
        for enabled in (True, False):
            cpu_conv.ENABLED = enabled
            outputs.append(module(x))
    return outputs


@pytest.mark.parametrize("kernel,stride,bias,channels_last", [
    (1, 1, False, True), (1, 2, False, True), (3, 1, True, True), (7, 2, False, False), (1, 1, True, False),
])
def test_d2_conv_with_frozen_norm_matches_conv_then_norm(kernel, stride, bias, channels_last):
    torch.manual_seed(0)
    conv = Conv2d(6, 10, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias,
                  norm=_frozen_bn(10, 1), activation=F.relu)
    assert use_cpu_convolutions(conv) == 1 and type(conv) is CpuD2Conv2d
    x = torch.randn(2, 6, 13, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert onednn_applies(conv, x)
    new, old = _both_paths(conv, x)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    assert new.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_plain_conv_and_group_norm_after_it():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 32, kernel_size=1), nn.GroupNorm(4, 32))
    assert use_cpu_convolutions(block) == 1 and type(block[0]) is CpuConv2d
    x = torch.randn(1, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    new, old = _both_paths(block, x)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_with_autograd_the_modules_own_forward_and_backward_run():
    """Training keeps F.conv2d + norm, bit for bit (and its gradients)."""
    torch.manual_seed(0)
    conv = Conv2d(6, 10, kernel_size=1, bias=False, norm=_frozen_bn(10, 1), activation=F.relu)
    plain = Conv2d(6, 10, kernel_size=1, bias=False, norm=_frozen_bn(10, 1), activation=F.relu)
    plain.load_state_dict(conv.state_dict())
    use_cpu_convolutions(conv)
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    assert not onednn_applies(conv, x)
    outputs = [m(x) for m in (conv, plain)]
    assert torch.equal(outputs[0], outputs[1])
    for out in outputs:
        out.square().sum().backward()
    assert torch.equal(conv.weight.grad, plain.weight.grad)


def test_only_exact_classes_change_and_nothing_else():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Conv2d(4, 4, 3, padding=1, norm=_frozen_bn(4, 0)), MyConv(4, 4, 1))
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    assert use_cpu_convolutions(model) == 2
    assert [type(m) for m in model] == [CpuConv2d, CpuD2Conv2d, MyConv]
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    assert use_cpu_convolutions(model) == 0  # already changed


def test_other_inputs_take_the_modules_own_forward():
    torch.manual_seed(0)
    conv = Conv2d(4, 6, kernel_size=1, norm=_frozen_bn(6, 0))
    use_cpu_convolutions(conv)
    x64 = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert onednn_applies(conv, torch.randn(1, 4, 5, 5))
        assert not onednn_applies(conv, x64)
        assert not onednn_applies(conv, torch.randn(0, 4, 5, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not onednn_applies(conv, torch.randn(1, 4, 5, 5))
        with cpu_conv.disabled():
            assert not onednn_applies(conv, torch.randn(1, 4, 5, 5))
        assert onednn_applies(conv, torch.randn(1, 4, 5, 5))  # restored on exit
        conv64 = Conv2d(4, 6, kernel_size=1, norm=_frozen_bn(6, 0)).double()
        reference = conv64.norm(F.conv2d(x64, conv64.weight, conv64.bias))
        use_cpu_convolutions(conv64)
        assert torch.equal(conv64(x64), reference)  # float64: exactly the F.conv2d + norm path


def test_model_convolutions_changed_and_channels_last_outputs_close():
    """A whole small model: every convolution has the path, the backbone gets a channels-last
    image on CPU, and the outputs equal those of the channel-major F.conv2d run."""
    _, model = build_fixture_model(str(FIXTURES / "ade_ps_t3_deltas_pos"))
    model.eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) in (CpuConv2d, CpuD2Conv2d) for m in convs)
    batch = _image_batch()
    outputs, seen = {}, []
    hook = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    for enabled in (True, False):
        cpu_conv.ENABLED = enabled
        with torch.no_grad():
            model(batch)
            images = model.preprocess_images(batch)
            outputs[enabled] = model.sem_seg_head(model.backbone(backbone_input(images.tensor)))
        model(batch)  # with autograd: channel-major
    hook.remove()
    # channels-last (not channel-major) only with the path on and without autograd
    assert seen == [False, False, True, True, True, True]
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(outputs[True][key], outputs[False][key], rtol=1e-4, atol=1e-4)
