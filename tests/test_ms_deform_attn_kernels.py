"""The deformable-attention implementations other than pure PyTorch, and their selection.

The Triton kernel runs on CPU tensors in Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before ``triton`` is first imported: ``triton.jit`` decides at decoration
time, and triton's own helpers (``tl.sum``...) are decorated on import. A test process may
already have imported triton, so ``test_triton_kernel_under_the_interpreter`` runs the
``test_interpreted_*`` tests of this file in a fresh pytest subprocess with the variable set;
in the parent process they are skipped. They compare forward and backward with the pure-PyTorch
core. The compiled extension cannot be built here, so its wrapper is checked with a stand-in
module that has the extension's two functions. The Triton tests are skipped without ``triton``.
"""
import importlib
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mask2former.modeling.pixel_decoder.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    resolve_ms_deform_attn_impl,
    set_ms_deform_attn_impl,
)

# the module (the package re-exports a function of the same name)
msda = importlib.import_module("mask2former.modeling.pixel_decoder.ms_deform_attn")
KERNEL_MODULE = "mask2former.modeling.pixel_decoder.ms_deform_attn_triton"
# three levels, one of them 1x1; heads 3 x 6 channels and L*P = 6: nothing a power of two
SHAPES = torch.tensor([[5, 7], [3, 4], [1, 1]])
STARTS = torch.tensor([0, 35, 47])
B, LQ, M, DH, L, P = 2, 5, 3, 6, 3, 2


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_values = int((SHAPES[:, 0] * SHAPES[:, 1]).sum())
    value = torch.randn(B, num_values, M, DH, dtype=dtype, generator=g)
    # mostly inside, some outside the map ([-0.25, 1.25]), and a few exactly on the edges
    loc = torch.rand(B, LQ, M, L, P, 2, dtype=dtype, generator=g) * 1.5 - 0.25
    loc[0, 0, 0, :, 0] = 0.0
    loc[0, 0, 1, :, 0] = 1.0
    weights = torch.rand(B, LQ, M, L, P, dtype=dtype, generator=g)
    return value, loc, weights


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NO_TRITON = "triton is not installed (PyTorch's Linux CUDA wheels bring it; `pip install triton` otherwise)"


def test_triton_kernel_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("this is the subprocess")
    if importlib.util.find_spec("triton") is None:
        pytest.skip(NO_TRITON)
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(msda.ENV_VAR, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
           str(Path(__file__).resolve()), "-k", "test_interpreted_"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "6 passed" in output and "skipped" not in output, output[-3000:]


@pytest.fixture
def triton_kernel(monkeypatch):
    """The kernel module imported under the interpreter, registered as "triton" for CPU."""
    if not INTERPRETED:
        pytest.skip("run by test_triton_kernel_under_the_interpreter in a subprocess")
    pytest.importorskip("triton", reason=NO_TRITON)
    monkeypatch.delenv(msda.ENV_VAR, raising=False)
    saved_impls = dict(msda._implementations)
    sys.modules.pop(KERNEL_MODULE, None)
    module = importlib.import_module(KERNEL_MODULE)
    msda.register_ms_deform_attn_core("triton", lambda: module.ms_deform_attn_triton, devices=("cpu",))
    yield module
    set_ms_deform_attn_impl(None)
    msda._implementations.clear()
    msda._implementations.update(saved_impls)
    sys.modules.pop(KERNEL_MODULE, None)  # a later import must not get interpreted kernels


@pytest.fixture
def clean_selection(monkeypatch):
    monkeypatch.delenv(msda.ENV_VAR, raising=False)
    saved_impls = dict(msda._implementations)
    yield
    set_ms_deform_attn_impl(None)
    msda._implementations.clear()
    msda._implementations.update(saved_impls)


def _forward_backward(fn, value, loc, weights, grad_out_seed=1):
    value, loc, weights = (t.clone().requires_grad_() for t in (value, loc, weights))
    out = fn(value, loc, weights)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(grad_out_seed))
    grads = torch.autograd.grad(out, (value, loc, weights), grad_out)
    return out, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_interpreted_triton_kernel_matches_pytorch_forward_and_backward(triton_kernel, dtype, tol):
    value, loc, weights = _inputs(dtype)
    ref_out, ref_grads = _forward_backward(
        lambda v, l, a: ms_deform_attn_core_pytorch(v, SHAPES, l, a), value, loc, weights
    )
    out, grads = _forward_backward(
        lambda v, l, a: triton_kernel.ms_deform_attn_triton(v, SHAPES, STARTS, l, a), value, loc, weights
    )
    assert out.shape == (B, LQ, M * DH) and out.dtype == dtype
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10, msg=lambda m: f"grad {name}: {m}")


def test_interpreted_triton_kernel_gradcheck_of_locations(triton_kernel):
    """The location gradient (derived by hand in the kernel) against finite differences; the
    comparisons above already pin every gradient to PyTorch's autograd, so this one stays tiny
    (each interpreted launch takes a fraction of a second)."""
    g = torch.Generator().manual_seed(3)
    shapes, starts = torch.tensor([[3, 4], [2, 2]]), torch.tensor([0, 12])
    value = torch.randn(1, 16, 1, 3, dtype=torch.float64, generator=g)
    weights = torch.rand(1, 1, 1, 2, 1, dtype=torch.float64, generator=g)
    # away from pixel centres, where the bilinear weights have kinks
    loc = torch.tensor([[0.3, 0.45], [0.6, 0.1]], dtype=torch.float64).view(1, 1, 1, 2, 1, 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda l: triton_kernel.ms_deform_attn_triton(value, shapes, starts, l, weights), (loc,), eps=1e-6, atol=1e-6
    )


def test_interpreted_triton_kernel_without_value_grad_and_far_points(triton_kernel):
    value, loc, weights = _inputs(torch.float64, seed=5)
    loc[1] = 1e6  # every corner outside: zero output, zero gradients
    loc[0, 1] = float("-inf")
    loc.requires_grad_()
    weights.requires_grad_()
    out = triton_kernel.ms_deform_attn_triton(value, SHAPES, STARTS, loc, weights)
    ref = ms_deform_attn_core_pytorch(value, SHAPES, loc.detach().clamp(-10, 10), weights.detach())
    torch.testing.assert_close(out, ref)
    assert out[1].abs().max() == 0 and out[0, 1].abs().max() == 0
    grad_loc, grad_w = torch.autograd.grad(out.sum(), (loc, weights))
    assert grad_loc[1].abs().max() == 0 and grad_w[1].abs().max() == 0 and grad_loc[0, 1].abs().max() == 0
    assert torch.isfinite(grad_loc).all() and torch.isfinite(grad_w).all()


def test_interpreted_module_with_triton_matches_pytorch_including_parameter_grads(triton_kernel):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=L, n_heads=2, n_points=P).double()
    for p in attn.parameters():  # break the symmetric initialisation
        torch.nn.init.normal_(p, std=0.3)
    num_values = int((SHAPES[:, 0] * SHAPES[:, 1]).sum())
    query = torch.randn(2, 4, 16, dtype=torch.float64)
    ref_points = torch.rand(2, 4, L, 2, dtype=torch.float64)
    feats = torch.randn(2, num_values, 16, dtype=torch.float64, requires_grad=True)
    results = {}
    for impl in ("pytorch", "triton"):
        set_ms_deform_attn_impl(impl)
        attn.zero_grad()
        feats.grad = None
        out = attn(query, ref_points, feats, SHAPES, STARTS)
        out.square().sum().backward()
        results[impl] = (out.detach(), feats.grad.clone(), [p.grad.clone() for p in attn.parameters()])
    torch.testing.assert_close(results["triton"][0], results["pytorch"][0])
    torch.testing.assert_close(results["triton"][1], results["pytorch"][1])
    for got, want in zip(results["triton"][2], results["pytorch"][2]):
        torch.testing.assert_close(got, want)


def test_interpreted_triton_kernel_refuses_cpu_tensors_outside_the_interpreter(triton_kernel, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    value, loc, weights = _inputs(torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        triton_kernel.ms_deform_attn_triton(value, SHAPES, STARTS, loc, weights)


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
def _fake(name_log):
    def loader():
        name_log.append("loaded")
        return lambda v, s, i, l, a: ms_deform_attn_core_pytorch(v, s, l, a) + 1.0
    return loader


def _failing(reason):
    def loader():
        raise ImportError(reason)
    return loader


def test_auto_prefers_extension_then_triton_then_pytorch(clean_selection):
    log = []
    msda.register_ms_deform_attn_core("cuda_ext", _fake(log))
    msda.register_ms_deform_attn_core("triton", _fake(log))
    assert resolve_ms_deform_attn_impl("cuda") == "cuda_ext"
    assert resolve_ms_deform_attn_impl("cpu") == "pytorch"  # auto never leaves PyTorch on CPU
    msda.register_ms_deform_attn_core("cuda_ext", _failing("No module named 'MultiScaleDeformableAttention'"))
    assert resolve_ms_deform_attn_impl("cuda") == "triton"
    msda.register_ms_deform_attn_core("triton", _failing("No module named 'triton'"))
    assert resolve_ms_deform_attn_impl("cuda") == "pytorch"
    assert resolve_ms_deform_attn_impl("cuda", "pytorch") == "pytorch"


def test_explicit_request_never_falls_back(clean_selection, monkeypatch):
    msda.register_ms_deform_attn_core("cuda_ext", _failing("No module named 'MultiScaleDeformableAttention'"))
    with pytest.raises(RuntimeError, match="'cuda_ext' is not available: ImportError: No module named"):
        resolve_ms_deform_attn_impl("cuda", "cuda_ext")
    # a CUDA-only implementation asked for CPU inputs
    msda.register_ms_deform_attn_core("triton", _fake([]))
    monkeypatch.setenv(msda.ENV_VAR, "triton")
    value, loc, weights = _inputs(torch.float32)
    with pytest.raises(ValueError, match="runs on cuda tensors, the inputs are on cpu"):
        ms_deform_attn(value, SHAPES, STARTS, loc, weights)
    monkeypatch.setenv(msda.ENV_VAR, "tritonn")
    with pytest.raises(ValueError, match="unknown deformable-attention implementation 'tritonn'"):
        ms_deform_attn(value, SHAPES, STARTS, loc, weights)
    with pytest.raises(ValueError, match="unknown"):
        set_ms_deform_attn_impl("cuda")


def test_selection_order_function_then_environment(clean_selection, monkeypatch):
    log = []
    msda.register_ms_deform_attn_core("fake", _fake(log), devices=("cpu",))
    value, loc, weights = _inputs(torch.float32)
    ref = ms_deform_attn_core_pytorch(value, SHAPES, loc, weights)
    torch.testing.assert_close(ms_deform_attn(value, SHAPES, STARTS, loc, weights), ref)  # auto
    monkeypatch.setenv(msda.ENV_VAR, "fake")
    torch.testing.assert_close(ms_deform_attn(value, SHAPES, STARTS, loc, weights), ref + 1)
    set_ms_deform_attn_impl("pytorch")  # the function wins over the environment
    torch.testing.assert_close(ms_deform_attn(value, SHAPES, STARTS, loc, weights), ref)
    torch.testing.assert_close(ms_deform_attn(value, SHAPES, STARTS, loc, weights, impl="fake"), ref + 1)
    assert log == ["loaded"]  # loaded once


def test_compiled_extension_wrapper_with_a_stand_in(clean_selection, monkeypatch):
    """The wrapper passes the extension's argument order and maps its three gradients back."""
    calls = []

    def forward(value, shapes, starts, loc, weights, im2col_step):
        calls.append(("forward", value.dtype, im2col_step))
        assert shapes.dtype == starts.dtype == torch.int64
        assert value.shape[0] % im2col_step == 0
        return ms_deform_attn_core_pytorch(value, shapes, loc, weights)

    def backward(value, shapes, starts, loc, weights, grad_out, im2col_step):
        calls.append(("backward", grad_out.dtype, im2col_step))
        with torch.enable_grad():
            v, l, a = (t.detach().requires_grad_() for t in (value, loc, weights))
            out = ms_deform_attn_core_pytorch(v, shapes, l, a)
            return list(torch.autograd.grad(out, (v, l, a), grad_out))

    fake = types.ModuleType("MultiScaleDeformableAttention")
    fake.ms_deform_attn_forward, fake.ms_deform_attn_backward = forward, backward
    monkeypatch.setitem(sys.modules, "MultiScaleDeformableAttention", fake)
    msda.register_ms_deform_attn_core("cuda_ext", msda._load_cuda_ext, devices=("cpu",))
    assert msda.available_ms_deform_attn_impls()["cuda_ext"] is None

    value, loc, weights = _inputs(torch.float64)
    ref_out, ref_grads = _forward_backward(
        lambda v, l, a: ms_deform_attn_core_pytorch(v, SHAPES, l, a), value, loc, weights
    )
    out, grads = _forward_backward(
        lambda v, l, a: ms_deform_attn(v, SHAPES, STARTS, l, a, impl="cuda_ext"), value, loc, weights
    )
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert calls == [("forward", torch.float64, 2), ("backward", torch.float64, 2)]

    # half inputs go through the extension in float32 and come back as half
    calls.clear()
    out = ms_deform_attn(value.half(), SHAPES, STARTS, loc.half(), weights.half(), impl="cuda_ext")
    assert out.dtype == torch.float16 and calls == [("forward", torch.float32, 2)]


def test_gpu_benchmark_stops_with_a_clear_message_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run tools/benchmark_gpu.py itself")
    from conftest import load_script

    tool = load_script("tools/benchmark_gpu.py")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tool.main([])
