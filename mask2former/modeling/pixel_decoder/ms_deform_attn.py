"""Multi-scale deformable attention (Deformable DETR), written in plain PyTorch.

The sampling core is a single function, :func:`ms_deform_attn_core_pytorch`, built on
``F.grid_sample``. :func:`ms_deform_attn` is what :class:`MSDeformAttn` calls; it forwards to
an accelerated implementation for CUDA tensors when one has been registered with
:func:`register_ms_deform_attn_core`, and to the pure-PyTorch core otherwise. Nothing here needs
a compiled extension.

Notation used in the shape comments:

* ``B``: batch size
* ``Lq``: number of queries
* ``S``: total number of flattened value positions over all levels, ``sum_l H_l * W_l``
* ``M``: number of heads, ``Dh``: channels per head
* ``L``: number of feature levels, ``P``: sampling points per head and level
"""
import math
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "register_ms_deform_attn_core",
]

SpatialShapes = Union[Tensor, Sequence[Tuple[int, int]]]


def _shapes_as_ints(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core_pytorch(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinearly sample every level at the given locations and sum with the given weights.

    Args:
        value: ``[B, S, M, Dh]``, the levels flattened row-major and concatenated in the order of
            ``spatial_shapes``.
        spatial_shapes: ``[L, 2]`` long tensor (or sequence) of ``(H_l, W_l)``.
        sampling_locations: ``[B, Lq, M, L, P, 2]``, normalised ``(x, y)``: ``(0, 0)`` is the
            top-left corner of the top-left pixel and ``(1, 1)`` the bottom-right corner of the
            bottom-right pixel. Locations outside ``[0, 1]`` are allowed; positions outside the
            map read zeros.
        attention_weights: ``[B, Lq, M, L, P]``, used as given (no normalisation here).

    Returns:
        ``[B, Lq, M * Dh]``, heads concatenated along channels.
    """
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = _shapes_as_ints(spatial_shapes)
    if len(shapes) != num_levels:
        raise ValueError(f"{len(shapes)} spatial shapes given for {num_levels} levels")

    per_level_values = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample's coordinate system is [-1, 1] with the same corner convention
    # (align_corners=False), so this is an affine change only.
    grids = 2 * sampling_locations - 1

    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # Fold heads into the batch so one grid_sample call serves every head:
        # [B, H*W, M, Dh] -> [B, M, Dh, H*W] -> [B*M, Dh, H, W]
        level_value = per_level_values[lvl].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        # [B, Lq, M, P, 2] -> [B, M, Lq, P, 2] -> [B*M, Lq, P, 2]
        level_grid = grids[:, :, :, lvl].transpose(1, 2).reshape(batch * heads, num_queries, num_points, 2)
        samples.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*M, Dh, Lq, P]

    # Level-major, point-minor along the last axis, matching the weight layout below.
    sampled = torch.cat(samples, dim=-1)  # [B*M, Dh, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, num_levels * num_points)
    out = (sampled * weights).sum(dim=-1)  # [B*M, Dh, Lq]
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()


_accelerated_core: Optional[Callable[..., Tensor]] = None


def register_ms_deform_attn_core(fn: Optional[Callable[..., Tensor]]) -> None:
    """Install (or, with ``None``, remove) a fast implementation used for CUDA inputs.

    ``fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``
    must follow the shape contract of :func:`ms_deform_attn_core_pytorch` (``spatial_shapes``
    and ``level_start_index`` are then long tensors on the value's device), which is the
    interface of the usual compiled kernels.
    """
    global _accelerated_core
    _accelerated_core = fn


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Dispatch to the registered fast core for CUDA tensors, else the pure-PyTorch core.

    Shapes as in :func:`ms_deform_attn_core_pytorch`; ``level_start_index`` is ``[L]`` (the
    offset of each level in the flattened value) and only the fast core reads it.
    """
    if _accelerated_core is not None and value.is_cuda:
        return _accelerated_core(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Each query predicts, per head, ``L * P`` sampling offsets around its reference point (in
    pixels of the respective level) and ``L * P`` softmax-normalised weights; the output is the
    weighted sum of the bilinearly sampled, projected values, followed by an output projection.

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) follow Deformable DETR so that Mask2Former checkpoints load unchanged.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: channels of queries and values.
            n_levels: number of feature levels.
            n_heads: number of attention heads; must divide ``d_model``.
            n_points: sampling points per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed pattern independent of the query: head h looks along the
        # direction at angle 2*pi*h/M, scaled so the larger coordinate is 1, and point p sits
        # p+1 pixels out along it on every level. Uniform attention weights at the start.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [M, 2]
        directions = directions / directions.abs().amax(dim=-1, keepdim=True)
        radii = torch.arange(1, self.n_points + 1, dtype=torch.float32)  # [P]
        pattern = directions[:, None, None, :] * radii[None, None, :, None]  # [M, 1, P, 2]
        pattern = pattern.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(pattern.reshape(-1))

        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: ``[B, Lq, C]`` (positional embedding already added by the caller).
            reference_points: ``[B, Lq, L, 2]``, normalised ``(x, y)`` per level, ``(0, 0)``
                top-left and ``(1, 1)`` bottom-right of the (padded) map.
            input_flatten: ``[B, S, C]``, all levels flattened and concatenated.
            input_spatial_shapes: ``[L, 2]`` long, ``(H_l, W_l)``.
            input_level_start_index: ``[L]`` long, offset of each level in ``S``.
            input_padding_mask: optional ``[B, S]`` bool, True at padded positions; their values
                are zeroed so that they contribute nothing to any sample.

        Returns:
            ``[B, Lq, C]``.
        """
        batch, num_queries, _ = query.shape
        _, num_values, _ = input_flatten.shape
        if int((input_spatial_shapes[:, 0] * input_spatial_shapes[:, 1]).sum()) != num_values:
            raise ValueError("input_spatial_shapes do not add up to the length of input_flatten")
        if reference_points.shape[-1] != 2:
            raise ValueError(
                f"reference_points must end with (x, y); got last dim {reference_points.shape[-1]}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        # One softmax over all levels and points of a head.
        weights = weights.softmax(dim=-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)

        # Offsets are in pixels of each level; (H, W) -> (W, H) to match the (x, y) order.
        offset_normalizer = input_spatial_shapes.flip(-1).to(offsets.dtype)  # [L, 2]
        sampling_locations = (
            reference_points[:, :, None, :, None, :] + offsets / offset_normalizer[None, None, None, :, None, :]
        )

        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, sampling_locations, weights)
        return self.output_proj(out)
