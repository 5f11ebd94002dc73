"""Multi-scale deformable attention as a Triton kernel (forward and backward).

Importing this module needs ``triton``; :mod:`.ms_deform_attn` imports it lazily, only when the
Triton implementation is selected. The kernels run on CUDA tensors, and on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how the
test suite checks them against the pure-PyTorch core without a GPU.

Work split: one program per (batch, query, head). It loads all ``L * P`` sampling points of
that head at once, so the program works on a ``[L*P, Dh]`` tile: for each of the four
bilinear corners it gathers ``L*P`` rows of ``Dh`` channels from the flattened value map and
reduces over the points. The backward pass recomputes the corners, scatters the value gradient
with atomic adds (several queries read the same value rows) and writes the location and weight
gradients of its own points directly.

Arithmetic is float32 (float64 for float64 inputs); half / bfloat16 inputs are read and the
results written in their own dtype. The value gradient is accumulated in float32 (float64) and
cast at the end.
"""
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MSDeformAttnTritonFunction", "ms_deform_attn_triton"]


@triton.jit
def _corner(x0, y0, DX: tl.constexpr, DY: tl.constexpr, width, height, start, valid_point):
    """Row index in the flattened value map of one bilinear corner and whether it is inside."""
    xi = x0 + DX
    yi = y0 + DY
    inside = valid_point & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    row = start + yi * width + xi
    return row, inside


@triton.jit
def _prepare_points(
    shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, LP: tl.constexpr, P: tl.constexpr,
    BLOCK_LP: tl.constexpr, ACC: tl.constexpr,
):
    """Per sampling point of this (batch, query, head): level geometry and bilinear set-up."""
    lp = tl.arange(0, BLOCK_LP)
    point_ok = lp < LP
    level = lp // P
    height = tl.load(shapes_ptr + level * 2, mask=point_ok, other=1).to(tl.int32)
    width = tl.load(shapes_ptr + level * 2 + 1, mask=point_ok, other=1).to(tl.int32)
    start = tl.load(starts_ptr + level, mask=point_ok, other=0).to(tl.int64)
    loc_base = pid.to(tl.int64) * (LP * 2)
    x = tl.load(loc_ptr + loc_base + lp * 2, mask=point_ok, other=0.0).to(ACC)
    y = tl.load(loc_ptr + loc_base + lp * 2 + 1, mask=point_ok, other=0.0).to(ACC)
    a = tl.load(attn_ptr + pid.to(tl.int64) * LP + lp, mask=point_ok, other=0.0).to(ACC)
    # Normalised (0 = left edge of the first pixel, 1 = right edge of the last) to pixel
    # coordinates where pixel centres sit on integers; same convention as
    # grid_sample(align_corners=False). Far-away points are clamped to a place where all four
    # corners are still outside, which keeps the integer conversion defined and changes nothing.
    xp = x * width.to(ACC) - 0.5
    yp = y * height.to(ACC) - 0.5
    xp = tl.minimum(tl.maximum(xp, -2.0), width.to(ACC) + 1.0)
    yp = tl.minimum(tl.maximum(yp, -2.0), height.to(ACC) + 1.0)
    x0f = tl.floor(xp)
    y0f = tl.floor(yp)
    fx = xp - x0f  # weight of the right column
    fy = yp - y0f  # weight of the bottom row
    return (point_ok, height, width, start, a, x0f.to(tl.int32), y0f.to(tl.int32), fx, fy)


@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    num_values, queries_times_heads,
    M: tl.constexpr, DH: tl.constexpr, LP: tl.constexpr, P: tl.constexpr,
    BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)  # (b * Lq + q) * M + m
    b = pid // queries_times_heads
    m = pid % M
    point_ok, height, width, start, a, x0, y0, fx, fy = _prepare_points(
        shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, LP, P, BLOCK_LP, ACC
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    # value is [B, S, M, DH]: row s of head m of image b starts at ((b*S + s)*M + m)*DH
    head_base = value_ptr + (b.to(tl.int64) * num_values * M + m) * DH
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for corner in tl.static_range(4):
        dx = corner % 2
        dy = corner // 2
        row, inside = _corner(x0, y0, dx, dy, width, height, start, point_ok)
        wx = fx if dx == 1 else 1.0 - fx
        wy = fy if dy == 1 else 1.0 - fy
        ptrs = head_base + row[:, None] * (M * DH) + d[None, :]
        v = tl.load(ptrs, mask=inside[:, None] & d_ok[None, :], other=0.0).to(ACC)
        acc += tl.sum(v * (a * wx * wy)[:, None], axis=0)
    tl.store(out_ptr + pid.to(tl.int64) * DH + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _ms_deform_attn_bwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_values, queries_times_heads,
    M: tl.constexpr, DH: tl.constexpr, LP: tl.constexpr, P: tl.constexpr,
    BLOCK_LP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    NEED_VALUE: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // queries_times_heads
    m = pid % M
    point_ok, height, width, start, a, x0, y0, fx, fy = _prepare_points(
        shapes_ptr, starts_ptr, loc_ptr, attn_ptr, pid, LP, P, BLOCK_LP, ACC
    )
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    g = tl.load(grad_out_ptr + pid.to(tl.int64) * DH + d, mask=d_ok, other=0.0).to(ACC)
    head_offset = (b.to(tl.int64) * num_values * M + m) * DH
    head_base = value_ptr + head_offset

    sample_dot = tl.zeros([BLOCK_LP], dtype=ACC)  # <grad_out, bilinear sample> per point
    dfx = tl.zeros([BLOCK_LP], dtype=ACC)  # d<grad_out, sample>/d fx
    dfy = tl.zeros([BLOCK_LP], dtype=ACC)
    for corner in tl.static_range(4):
        dx = corner % 2
        dy = corner // 2
        row, inside = _corner(x0, y0, dx, dy, width, height, start, point_ok)
        wx = fx if dx == 1 else 1.0 - fx
        wy = fy if dy == 1 else 1.0 - fy
        sx = 1.0 if dx == 1 else -1.0  # d wx / d fx
        sy = 1.0 if dy == 1 else -1.0
        tile_off = row[:, None] * (M * DH) + d[None, :]
        tile_ok = inside[:, None] & d_ok[None, :]
        v = tl.load(head_base + tile_off, mask=tile_ok, other=0.0).to(ACC)
        gv = tl.sum(v * g[None, :], axis=1)  # [BLOCK_LP]
        sample_dot += wx * wy * gv
        dfx += sx * wy * gv
        dfy += sy * wx * gv
        if NEED_VALUE:
            contrib = (a * wx * wy)[:, None] * g[None, :]
            tl.atomic_add(grad_value_ptr + head_offset + tile_off, contrib, mask=tile_ok)

    lp = tl.arange(0, BLOCK_LP)
    # x_pixel = x * W - 0.5, so d/dx = W * d/dx_pixel (and likewise for y with H)
    loc_base = pid.to(tl.int64) * (LP * 2)
    gx = a * dfx * width.to(ACC)
    gy = a * dfy * height.to(ACC)
    tl.store(grad_loc_ptr + loc_base + lp * 2, gx.to(grad_loc_ptr.dtype.element_ty), mask=point_ok)
    tl.store(grad_loc_ptr + loc_base + lp * 2 + 1, gy.to(grad_loc_ptr.dtype.element_ty), mask=point_ok)
    tl.store(
        grad_attn_ptr + pid.to(tl.int64) * LP + lp, sample_dot.to(grad_attn_ptr.dtype.element_ty), mask=point_ok
    )


def _check_device(value: Tensor) -> None:
    if not value.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton deformable-attention kernel needs CUDA tensors (got {value.device}); "
            "on CPU use the 'pytorch' implementation, or set TRITON_INTERPRET=1 before importing "
            "triton to run the kernel in Triton's interpreter"
        )


def _launch_config(value: Tensor, sampling_locations: Tensor):
    batch, num_values, heads, head_dim = value.shape
    _, num_queries, heads_loc, levels, points, two = sampling_locations.shape
    if heads_loc != heads or two != 2:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
            f"{tuple(value.shape)}: expected [B, Lq, {heads}, L, P, 2]"
        )
    acc = tl.float64 if value.dtype == torch.float64 else tl.float32
    meta = dict(
        M=heads, DH=head_dim, LP=levels * points, P=points,
        BLOCK_LP=triton.next_power_of_2(levels * points), BLOCK_D=triton.next_power_of_2(head_dim), ACC=acc,
    )
    return (batch * num_queries * heads,), num_queries * heads, meta


class MSDeformAttnTritonFunction(torch.autograd.Function):
    """Autograd wrapper: differentiable in ``value``, ``sampling_locations`` and
    ``attention_weights`` (as the pure-PyTorch core), not in the integer shape tensors."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        _check_device(value)
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
        starts = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
        if attention_weights.shape != sampling_locations.shape[:-1]:
            raise ValueError(
                f"attention_weights {tuple(attention_weights.shape)} do not match sampling_locations "
                f"{tuple(sampling_locations.shape)}"
            )
        if shapes.shape != (sampling_locations.shape[3], 2) or starts.shape != (sampling_locations.shape[3],):
            raise ValueError(
                f"spatial_shapes {tuple(shapes.shape)} / level_start_index {tuple(starts.shape)} do not "
                f"match {sampling_locations.shape[3]} levels"
            )
        grid, queries_times_heads, meta = _launch_config(value, sampling_locations)
        batch, num_values, heads, head_dim = value.shape
        out = value.new_empty(batch, sampling_locations.shape[1], heads, head_dim)
        if out.numel():
            _ms_deform_attn_fwd_kernel[grid](
                value, shapes, starts, sampling_locations, attention_weights, out,
                num_values, queries_times_heads, **meta,
            )
        ctx.save_for_backward(value, shapes, starts, sampling_locations, attention_weights)
        return out.view(batch, sampling_locations.shape[1], heads * head_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, sampling_locations, attention_weights = ctx.saved_tensors
        need_value = ctx.needs_input_grad[0]
        grid, queries_times_heads, meta = _launch_config(value, sampling_locations)
        acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
        grad_loc = torch.empty_like(sampling_locations)
        grad_attn = torch.empty_like(attention_weights)
        if grad_loc.numel():
            _ms_deform_attn_bwd_kernel[grid](
                value, shapes, starts, sampling_locations, attention_weights, grad_out.contiguous(),
                grad_value, grad_loc, grad_attn,
                value.shape[1], queries_times_heads, NEED_VALUE=need_value, **meta,
            )
        else:
            grad_loc.zero_()
            grad_attn.zero_()
        return (
            grad_value.to(value.dtype) if need_value else None,
            None,
            None,
            grad_loc if ctx.needs_input_grad[3] else None,
            grad_attn if ctx.needs_input_grad[4] else None,
        )


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Shapes and conventions of :func:`.ms_deform_attn.ms_deform_attn_core_pytorch`;
    ``spatial_shapes`` ``[L, 2]`` and ``level_start_index`` ``[L]`` as tensors."""
    return MSDeformAttnTritonFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
