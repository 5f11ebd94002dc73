"""Mask2Former's pixel decoder: a deformable-attention encoder over res3-res5 plus an FPN level.

Module and parameter names follow the official implementation, so that the
``sem_seg_head.pixel_decoder.*`` entries of official checkpoints load with ``strict=True``:

* ``input_proj.{i}.{0,1}``: 1x1 conv + GroupNorm(32) per encoder level, lowest resolution first
* ``transformer.level_embed`` and ``transformer.encoder.layers.{j}.*``
* ``mask_features``: 1x1 conv producing the per-pixel embedding
* ``adapter_{k}`` / ``layer_{k}``: lateral and output convs of the extra FPN levels
"""
import copy
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .ms_deform_attn import MSDeformAttn, resolve_ms_deform_attn_impl

__all__ = [
    "deform_attn_cpu",
    "DeformableEncoderLayer",
    "DeformableEncoder",
    "MSDeformAttnEncoderOnly",
    "MSDeformAttnPixelDecoder",
]


def deform_attn_cpu(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable sampling as one weighted ``embedding_bag`` sum, for CPU tensors.

    Same contract and result (up to float summation order) as
    :func:`.ms_deform_attn.ms_deform_attn_core_pytorch`: bilinear sampling with
    ``align_corners=False`` and zero padding, weighted by ``attention_weights``. Every output
    vector ``[b, q, m]`` is a weighted sum of ``4 * L * P`` rows of the value (the four
    bilinear corners of every sampling point), which ``F.embedding_bag`` computes directly on
    the ``[B*S*M, Dh]`` value table, without the per-level ``grid_sample`` on a channel-major
    copy of the value, the concatenation of the samples and the weighting product. Corners
    outside the map get weight 0. Differentiable with respect to the value, the locations and
    the weights (through :class:`_BagSampling`'s backward).

    Args:
        value: ``[B, S, M, Dh]``; spatial_shapes: ``[L, 2]`` long ``(H_l, W_l)``;
        sampling_locations: ``[B, Lq, M, L, P, 2]`` normalised ``(x, y)``;
        attention_weights: ``[B, Lq, M, L, P]``.

    Returns:
        ``[B, Lq, M * Dh]``.
    """
    loc = sampling_locations.permute(5, 0, 2, 3, 4, 1).contiguous()  # [2, B, M, L, P, Lq]
    return _sample_bags(value, spatial_shapes, loc[0], loc[1], attention_weights.permute(0, 2, 3, 4, 1).contiguous())


def _starts(sizes: Tensor) -> Tensor:
    """Offset of each level in the concatenation of levels of the given sizes (``[L]``)."""
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def _bilinear_corners(loc_x: Tensor, loc_y: Tensor, shapes: Tensor, index_dtype: torch.dtype):
    """Integer top-left corner ``(ix, iy)`` of every sampling point, the in-map flags of its two
    columns ``(ix, ix + 1)`` and rows ``(iy, iy + 1)``, and their bilinear weights
    ``(wx0, wx1, wy0, wy1)``, zero for a column / row outside the map (zero padding); in the
    layout of ``loc_x`` / ``loc_y`` (``[B, M, L, P, Lq]``; ``shapes`` is ``[L, 2]`` long)."""
    num_levels = loc_x.shape[2]
    level = (1, 1, num_levels, 1, 1)
    heights, widths = shapes[:, 0].to(index_dtype).view(level), shapes[:, 1].to(index_dtype).view(level)
    # pixel coordinates, pixel centres at integers (align_corners=False)
    x = loc_x * widths.to(loc_x.dtype) - 0.5
    y = loc_y * heights.to(loc_y.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    ix, iy = x0.to(index_dtype), y0.to(index_dtype)
    inside = ((ix >= 0) & (ix < widths), (ix >= -1) & (ix < widths - 1),
              (iy >= 0) & (iy < heights), (iy >= -1) & (iy < heights - 1))
    fx, fy = x - x0, y - y0
    axis_weights = ((1 - fx) * inside[0], fx * inside[1], (1 - fy) * inside[2], fy * inside[3])
    return ix, iy, inside, axis_weights, heights, widths


def _bag_layout(value_shape, spatial_shapes: Tensor, loc_x: Tensor, loc_y: Tensor,
                attention_weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Rows of the value table and weights of the ``4 * L * P`` bilinear corners of every bag
    ``(b, m, q)`` (one bag per output vector): two ``[B, M, Lq, 4, L, P]`` tensors (corners in
    the order (y0, x0), (y0, x1), (y1, x0), (y1, x1)). Inputs query-minor ``[B, M, L, P, Lq]``,
    as in :func:`_sample_bags`.

    The bags are ordered (b, m, q) because the corners are computed query-minor: the
    transposition to bags stays within each (b, m) block; the sampled output, 6 times smaller
    than the indices and weights, is what gets reordered to query-major instead."""
    batch, num_values, heads, _ = value_shape
    _, _, num_levels, num_points, num_queries = loc_x.shape
    device = loc_x.device
    shapes = spatial_shapes.to(device=device, dtype=torch.long)
    # int32 row numbers halve the index traffic; int64 only for tables beyond its range
    index_dtype = torch.int32 if batch * num_values * heads < 2**31 - 1 else torch.long
    ix, iy, _, (wx0, wx1, wy0, wy1), heights, widths = _bilinear_corners(loc_x, loc_y, shapes, index_dtype)
    starts = _starts(shapes[:, 0] * shapes[:, 1]).to(index_dtype)
    # the attention weight folded into the rows' weights; a corner of weight zero may read any
    # row, so indices are clamped
    wy0, wy1 = wy0 * attention_weights, wy1 * attention_weights
    col0 = torch.minimum(ix.clamp(min=0), widths - 1) * heads
    col1 = torch.minimum((ix + 1).clamp(min=0), widths - 1) * heads
    # row of (b, level, y, m) in the value table: (b * S + start_l + y * W_l) * M + m
    base = (torch.arange(batch, dtype=index_dtype, device=device).view(batch, 1, 1) * num_values
            + starts.view(1, 1, num_levels)) * heads + torch.arange(heads, dtype=index_dtype, device=device).view(1, heads, 1)
    base = base.view(batch, heads, num_levels, 1, 1)
    row_step = widths * heads
    row0 = base + torch.minimum(iy.clamp(min=0), heights - 1) * row_step
    row1 = base + torch.minimum((iy + 1).clamp(min=0), heights - 1) * row_step
    corners = ((row0, col0, wy0, wx0), (row0, col1, wy0, wx1), (row1, col0, wy1, wx0), (row1, col1, wy1, wx1))
    # the corners written query-minor [B, M, 4, L, P, Lq] (contiguous writes), then one batched
    # transposing copy per tensor to the bag layout [B, M, Lq, 4, L, P]: half the time of
    # writing each corner through a transposed view (no autograd here: callers run this
    # without gradients, see _sample_bags and _BagSampling)
    corner_shape = (batch, heads, 4, num_levels, num_points, num_queries)
    indices = torch.empty(corner_shape, dtype=index_dtype, device=device)
    weights = torch.empty(corner_shape, dtype=wx0.dtype, device=device)
    for corner, (row, col, wy, wx) in enumerate(corners):
        torch.add(row, col, out=indices[:, :, corner])
        torch.mul(wy, wx, out=weights[:, :, corner])
    bag_shape = (batch, heads, num_queries, 4, num_levels, num_points)

    def to_bags(t: Tensor) -> Tensor:
        return t.view(batch * heads, -1, num_queries).transpose(1, 2).contiguous().view(bag_shape)

    return to_bags(indices), to_bags(weights)


def _sample_bags(
    value: Tensor, spatial_shapes: Tensor, loc_x: Tensor, loc_y: Tensor, attention_weights: Tensor
) -> Tensor:
    """The core of :func:`deform_attn_cpu`, on query-minor inputs.

    ``loc_x``, ``loc_y`` (normalised sampling locations) and ``attention_weights`` are
    ``[B, M, L, P, Lq]``: the query axis last and contiguous, so that every element-wise step
    runs over long contiguous rows with per-level constants broadcast over them (the
    query-major layout ``[B, Lq, M, L, P]`` broadcasts over rows of 4 and 12 elements, which
    costs several times more). The bilinear corners are written, once, into the bag layout
    ``[B, M, Lq, 4, L, P]`` that ``embedding_bag`` reads (:func:`_bag_layout`); its
    ``[B, M, Lq, Dh]`` output is returned query-major. The value is read in its own layout
    ``[B, S, M, Dh]`` (row ``(b * S + s) * M + m``), without a copy.

    When a gradient is needed, :class:`_BagSampling` computes the same forward with a backward
    written for CPU (``embedding_bag``'s own backward sorts every index in a slow loop and does
    not reach the locations).
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (value, loc_x, loc_y, attention_weights)):
        return _BagSampling.apply(value, spatial_shapes, loc_x, loc_y, attention_weights)
    indices, weights = _bag_layout(value.shape, spatial_shapes, loc_x, loc_y, attention_weights)
    return _bags_to_output(_embedding_bag_sum(value, indices, weights), indices.shape)


def _embedding_bag_sum(value: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
    """The weighted sum of every bag of :func:`_bag_layout`: ``[B*M*Lq, Dh]``."""
    bag = indices.shape[3] * indices.shape[4] * indices.shape[5]
    return F.embedding_bag(indices.view(-1, bag), value.reshape(-1, value.shape[3]),
                           per_sample_weights=weights.view(-1, bag), mode="sum")


def _bags_to_output(out: Tensor, bag_shape) -> Tensor:
    """Bag sums ``[B*M*Lq, Dh]`` (bags ordered (b, m, q)) -> ``[B, Lq, M * Dh]``."""
    batch, heads, num_queries = bag_shape[:3]
    return out.view(batch, heads, num_queries, -1).transpose(1, 2).reshape(batch, num_queries, -1)


#: bags per block of the gather in :meth:`_BagSampling.backward` (a few MB of gathered rows)
_GATHER_BLOCK = 1024


class _BagSampling(torch.autograd.Function):
    """:func:`_sample_bags` with a CPU backward.

    Forward: one weighted ``embedding_bag`` (no ``[B*M, Dh, Lq, L*P]`` sample tensor); saved for
    the backward: the value, the rows and weights of the bags and the query-minor inputs.

    Backward, with ``g`` the output gradient of a bag and ``v`` the value rows of its entries:

    * the weight of every entry gets ``<g, v>``: its rows are gathered in blocks of bags and
      multiplied with ``g``;
    * the value table gets, for every row, the sum of ``weight * g`` over the entries that read
      it: sorting the sampling points turns this scatter into weighted ``embedding_bag`` sums
      like the forward's, on the output gradient as table (:func:`_value_gradient`);
    * the attention weights and locations follow from the entry gradients: the sum of the four
      corners times their bilinear weights, and the derivative of the bilinear weights
      (``+-1`` per pixel along one axis times the weight along the other, zero for corners
      outside the map, as ``grid_sample`` with zero padding), times the attention weight and
      the map size (locations are normalised).
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, loc_x, loc_y, attention_weights):
        with torch.autocast("cpu", enabled=False):
            indices, weights = _bag_layout(value.shape, spatial_shapes, loc_x, loc_y, attention_weights)
            out = _bags_to_output(_embedding_bag_sum(value, indices, weights), indices.shape)
        ctx.save_for_backward(value, spatial_shapes, loc_x, loc_y, attention_weights, indices, weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, spatial_shapes, loc_x, loc_y, attention_weights, indices, weights = ctx.saved_tensors
        need_value, _, need_x, need_y, need_weights = ctx.needs_input_grad
        grad_value = grad_x = grad_y = grad_weights = None
        with torch.autocast("cpu", enabled=False):
            head_dim = value.shape[3]
            bag_shape = indices.shape
            bag = bag_shape[3] * bag_shape[4] * bag_shape[5]
            batch, heads, num_queries = bag_shape[:3]
            # one row per bag, bags ordered (b, m, q)
            grad_rows = grad_out.to(value.dtype).view(batch, num_queries, heads, head_dim).transpose(1, 2)
            grad_rows = grad_rows.reshape(-1, head_dim)
            rows = indices.view(-1, bag)
            table = value.reshape(-1, head_dim)
            shapes = spatial_shapes.to(dtype=torch.long)
            ix, iy, (in_x0, in_x1, in_y0, in_y1), (wx0, wx1, wy0, wy1), heights, widths = _bilinear_corners(
                loc_x, loc_y, shapes, indices.dtype)
            if need_value:
                grad_value = _value_gradient(grad_rows, weights, ix, iy, shapes, value.shape)
            if need_x or need_y or need_weights:
                grad_entries = torch.empty(rows.shape, dtype=value.dtype)
                for start in range(0, rows.shape[0], _GATHER_BLOCK):
                    block = slice(start, start + _GATHER_BLOCK)
                    gathered = table.index_select(0, rows[block].reshape(-1)).view(-1, bag, head_dim)
                    torch.sum(gathered.mul_(grad_rows[block, None]), dim=2, out=grad_entries[block])
                # [B, M, Lq, 4, L, P] -> [4, B, M, L, P, Lq], the layout of the inputs
                g00, g01, g10, g11 = grad_entries.view(bag_shape).permute(3, 0, 1, 4, 5, 2).contiguous()
                along_y0 = g00 * wx0 + g01 * wx1  # the entry gradients summed along x, per row
                along_y1 = g10 * wx0 + g11 * wx1
                if need_weights:
                    grad_weights = wy0 * along_y0 + wy1 * along_y1
                if need_x:
                    # d/dx of (1 - fx) is -1 and of fx is +1; x = loc_x * W - 0.5
                    dx = wy0 * (g01 * in_x1 - g00 * in_x0) + wy1 * (g11 * in_x1 - g10 * in_x0)
                    grad_x = dx.mul_(attention_weights).mul_(widths.to(dx.dtype))
                if need_y:
                    dy = along_y1 * in_y1 - along_y0 * in_y0
                    grad_y = dy.mul_(attention_weights).mul_(heights.to(dy.dtype))
        return grad_value, None, grad_x, grad_y, grad_weights


def _value_gradient(grad_rows: Tensor, weights: Tensor, ix: Tensor, iy: Tensor, shapes: Tensor,
                    value_shape) -> Tensor:
    """Gradient of the value table, ``[B, S, M, Dh]``: every value row gets the sum of
    ``weight * grad_rows[bag]`` over the bag entries that read it.

    The scatter is turned into a gather: the sampling points are sorted by their top-left
    corner, which makes every corner of a point a bag of a weighted ``embedding_bag`` over the
    output gradient. Sorting points rather than entries (a quarter of them) works because the
    four corners of a point sit at fixed offsets from the top-left one in a map padded by one
    pixel on every side: clamped to ``[-1, W-1] x [-1, H-1]`` (a point beyond that has weight
    zero at all its corners), that corner is a padded pixel whose right and lower neighbours
    exist. One ``embedding_bag`` per corner type sums into the padded top-left pixels; each
    sum is then added, shifted by the corner's offset and cropped, to the value gradient.

    ``grad_rows``: ``[B*M*Lq, Dh]`` (bag order); ``weights``: ``[B, M, Lq, 4, L, P]`` as in
    :func:`_bag_layout`; ``ix``, ``iy``: top-left corners ``[B, M, L, P, Lq]``.
    """
    batch, _, heads, head_dim = value_shape
    num_levels, num_points = weights.shape[4:]
    level = (1, 1, num_levels, 1, 1)
    heights, widths = shapes[:, 0], shapes[:, 1]
    padded_sizes = (heights + 2) * (widths + 2)
    padded_starts = _starts(padded_sizes)
    num_padded = int(padded_sizes.sum())
    index_dtype = ix.dtype if batch * num_padded * heads < 2**31 - 1 else torch.long
    px = torch.minimum(ix.clamp(min=-1), (widths - 1).to(ix.dtype).view(level)).to(index_dtype) + 1
    py = torch.minimum(iy.clamp(min=-1), (heights - 1).to(iy.dtype).view(level)).to(index_dtype) + 1
    # row of (b, level, py, px, m) in the padded table, in bag order [B, M, Lq, L, P]
    base = ((torch.arange(batch, dtype=index_dtype).view(batch, 1, 1) * num_padded
             + padded_starts.to(index_dtype).view(1, 1, num_levels)) * heads
            + torch.arange(heads, dtype=index_dtype).view(1, heads, 1))
    rows = (py * (widths + 2).to(index_dtype).view(level) + px) * heads + base.view(batch, heads, num_levels, 1, 1)
    sorted_rows, order = rows.permute(0, 1, 4, 2, 3).reshape(-1).sort()
    offsets = torch.searchsorted(sorted_rows, torch.arange(batch * num_padded * heads, dtype=sorted_rows.dtype))
    offsets = offsets.to(order.dtype)
    bags = torch.div(order, num_levels * num_points, rounding_mode="floor")
    grad_value = torch.zeros(value_shape, dtype=grad_rows.dtype)
    starts = _starts(heights * widths)
    for corner in range(4):
        dy, dx = divmod(corner, 2)
        corner_weights = weights[:, :, :, corner].reshape(-1).index_select(0, order)
        summed = F.embedding_bag(bags, grad_rows, offsets, per_sample_weights=corner_weights, mode="sum")
        summed = summed.view(batch, num_padded, heads, head_dim)
        for lvl in range(num_levels):
            h, w, start, padded_start = (int(t[lvl]) for t in (heights, widths, starts, padded_starts))
            # value pixel (y, x) is the corner (dy, dx) of padded top-left pixel (y + 1 - dy, x + 1 - dx)
            padded = summed[:, padded_start:padded_start + (h + 2) * (w + 2)].view(batch, h + 2, w + 2, heads, head_dim)
            grad_value[:, start:start + h * w].view(batch, h, w, heads, head_dim).add_(
                padded[:, 1 - dy:h + 1 - dy, 1 - dx:w + 1 - dx])
    return grad_value


def _deformable_attention(attn: MSDeformAttn, query: Tensor, reference_points: Tensor, src: Tensor,
                          spatial_shapes: Tensor, level_start_index: Tensor,
                          padding_mask: Optional[Tensor]) -> Tensor:
    """``attn(query, reference_points, src, ...)``, with :func:`_sample_bags` as the sampling
    core for CPU tensors when the selected implementation is ``pytorch`` (what ``auto`` picks
    on CPU), with or without gradients (inference, a frozen or a trainable pixel decoder); the
    module's own forward, unchanged, everywhere else (so an explicitly selected kernel runs, or
    refuses CPU inputs, as :func:`.ms_deform_attn.ms_deform_attn` decides).

    The sampling offsets and attention logits are computed query-minor (``W @ query^T``, one
    matrix product for both, differentiable in the two linear layers and the query), the layout
    :func:`_sample_bags` works in; the softmax runs over the ``L * P`` axis of that layout.
    """
    if src.device.type != "cpu" or resolve_ms_deform_attn_impl(src.device) != "pytorch":
        return attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)
    batch, num_queries, _ = query.shape
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    value = attn.value_proj(src)
    # at least fp32 sampling locations and sampling, also under bfloat16 autocast
    work = torch.promote_types(value.dtype, torch.float32)
    if padding_mask is not None and bool(padding_mask.any()):  # nothing to zero without padding
        value = value.masked_fill(padding_mask[..., None], 0.0)
    value = value.view(batch, src.shape[1], heads, attn.d_model // heads).to(work)
    # [B, M*L*P*2 + M*L*P, Lq]: offsets (x, y) then attention logits, queries last
    weight = torch.cat((attn.sampling_offsets.weight, attn.attention_weights.weight))
    bias = torch.cat((attn.sampling_offsets.bias, attn.attention_weights.bias))
    projected = torch.matmul(weight, query.transpose(1, 2)).add_(bias[:, None]).to(work)
    num_offsets = heads * levels * points * 2
    offsets = projected[:, :num_offsets].view(batch, heads, levels, points, 2, num_queries)
    weights = projected[:, num_offsets:].view(batch, heads, levels * points, num_queries).softmax(dim=2)
    # locations = reference + offset / (W, H) of the level, as in MSDeformAttn.forward
    ref = reference_points.to(work).permute(0, 2, 3, 1)  # [B, L, 2, Lq]
    widths = spatial_shapes[:, 1].to(work).view(1, 1, levels, 1, 1)
    heights = spatial_shapes[:, 0].to(work).view(1, 1, levels, 1, 1)
    loc_x = ref[:, None, :, None, 0] + offsets[:, :, :, :, 0] / widths
    loc_y = ref[:, None, :, None, 1] + offsets[:, :, :, :, 1] / heights
    sampled = _sample_bags(value, spatial_shapes, loc_x, loc_y, weights.view(batch, heads, levels, points, num_queries))
    return attn.output_proj(sampled)


def _cpu_bf16_autocast() -> bool:
    """Whether CPU autocast to bfloat16 (``MODEL.CPU_BF16``) is active."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN.

    ``x = norm1(x + attn(x + pos, x)); x = norm2(x + linear2(relu(linear1(x))))``
    """

    #: rows per block of the feed-forward sublayer on CPU without autograd (see forward)
    FFN_BLOCK_ROWS = 512

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            src: ``[B, S, C]`` flattened multi-level features.
            pos: ``[B, S, C]`` positional + level embedding, added to the queries only, or None.
            reference_points: ``[B, S, L, 2]``.
            spatial_shapes: ``[L, 2]`` long; level_start_index: ``[L]`` long.
            padding_mask: ``[B, S]`` bool or None.

        Returns:
            ``[B, S, C]``.
        """
        query = src if pos is None else src + pos
        attended = _deformable_attention(
            self.self_attn, query, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attended))
        if src.device.type != "cpu" or torch.is_grad_enabled() or (
                self.training and (self.dropout2.p > 0 or self.dropout3.p > 0)):
            return self._feed_forward(src)
        # On CPU without autograd or dropout, in blocks of rows: the [rows, dim_feedforward]
        # activations of a block stay in cache instead of a fresh [B*S, dim_feedforward]
        # tensor per layer (same values, row by row).
        flat = src.reshape(-1, src.shape[-1])
        blocks = [self._feed_forward(flat[i:i + self.FFN_BLOCK_ROWS]) for i in range(0, flat.shape[0], self.FFN_BLOCK_ROWS)]
        return torch.cat(blocks).view(src.shape)

    def _feed_forward(self, src: Tensor) -> Tensor:
        hidden = self.dropout2(F.relu(self.linear1(src)))
        return self.norm2(src + self.dropout3(self.linear2(hidden)))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` sharing the per-pixel reference points."""

    def __init__(self, encoder_layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        # Independent deep copies; the owner re-initialises their weights afterwards.
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised to the padded map, for every level.

        Args:
            spatial_shapes: ``[L, 2]`` long, ``(H_l, W_l)``.
            valid_ratios: ``[B, L, 2]``, ``(valid_w / W_l, valid_h / H_l)`` per level.

        Returns:
            ``[B, S, L, 2]`` normalised ``(x, y)``.
        """
        device = valid_ratios.device
        per_level = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
            xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
            # Normalise by the valid extent of this level, so a centre in the unpadded part of
            # one level maps to the same image location in every other level below.
            ys = ys[None, :] / (valid_ratios[:, None, lvl, 1] * h)  # [B, h]
            xs = xs[None, :] / (valid_ratios[:, None, lvl, 0] * w)  # [B, w]
            grid_y = ys[:, :, None].expand(-1, h, w)
            grid_x = xs[:, None, :].expand(-1, h, w)
            per_level.append(torch.stack((grid_x, grid_y), dim=-1).flatten(1, 2))  # [B, h*w, 2]
        reference_points = torch.cat(per_level, dim=1)  # [B, S, 2]
        # Back to each target level's padded coordinates.
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Shapes as in :meth:`DeformableEncoderLayer.forward`; valid_ratios ``[B, L, 2]``."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnEncoderOnly(nn.Module):
    """Deformable transformer encoder with a learnable per-level embedding.

    Attribute names (``encoder.layers``, ``level_embed``) match the official checkpoints.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
        self.encoder = DeformableEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier for every matrix first, then let the attention modules restore their own
        # structured initialisation (zero offset weights, fixed offset pattern).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """``[B, H, W]`` padding mask -> ``[B, 2]`` ``(valid_w / W, valid_h / H)``.

        Assumes the padding is at the bottom/right, so the first column/row is representative.
        """
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], dim=-1)

    def forward(
        self,
        srcs: List[Tensor],
        pos_embeds: List[Tensor],
        masks: Optional[List[Tensor]] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            srcs: ``L`` maps ``[B, C, H_l, W_l]``.
            pos_embeds: ``L`` maps ``[B, C, H_l, W_l]``.
            masks: optional ``L`` bool maps ``[B, H_l, W_l]`` (True = padding); default none.

        Returns:
            memory ``[B, S, C]``, spatial_shapes ``[L, 2]`` long, level_start_index ``[L]`` long.
        """
        if masks is None:
            masks = [torch.zeros((s.size(0), s.size(2), s.size(3)), dtype=torch.bool, device=s.device) for s in srcs]

        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))  # [B, H*W, C]
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flat = torch.cat(src_flat, 1)
        mask_flat = torch.cat(mask_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)

        spatial_shapes = torch.as_tensor([tuple(s) for s in shapes], dtype=torch.long, device=src_flat.device)
        sizes = spatial_shapes.prod(1)
        level_start_index = _starts(sizes)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)  # [B, L, 2]

        memory = self.encoder(src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, mask_flat)
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former.

    The ``transformer_in_features`` (res3-res5 in all configs) are projected to ``conv_dim``
    channels and refined jointly by a deformable-attention encoder. Higher-resolution inputs
    (res2) are merged FPN-style, top-down, until ``common_stride`` is reached; the finest map
    gives the mask features.
    """

    cpu_bf16 = False
    """Let CPU bfloat16 autocast reach the convolutions and linear layers (``MODEL.CPU_BF16``);
    otherwise the pixel decoder runs in fp32 under any autocast."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_n_points: int = 4,
    ):
        """
        Args:
            input_shape: channels and stride of every backbone feature the decoder uses.
            transformer_dropout: dropout inside the encoder layers.
            transformer_nheads: attention heads of the deformable attention.
            transformer_dim_feedforward: FFN width of the encoder layers.
            transformer_enc_layers: number of encoder layers.
            conv_dim: channels of the encoder and of all FPN maps.
            mask_dim: channels of the output mask features.
            norm: norm of the FPN convs (``get_norm`` name or callable); empty means none, in
                which case those convs get a bias.
            transformer_in_features: names of the features fed to the encoder.
            common_stride: stride of the mask features.
            transformer_n_points: sampling points per head and level.
        """
        super().__init__()
        # Everything is kept ordered from high to low resolution (increasing stride).
        ordered = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in ordered]
        self.feature_strides = [v.stride for _, v in ordered]
        self.feature_channels = [v.channels for _, v in ordered]

        enc_ordered = [(k, v) for k, v in ordered if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in enc_ordered]
        enc_in_channels = [v.channels for _, v in enc_ordered]
        self.transformer_feature_strides = [v.stride for _, v in enc_ordered]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        if self.transformer_num_feature_levels == 0:
            raise ValueError("none of transformer_in_features is in input_shape")

        # The encoder sees levels lowest resolution first, so the projections are built in
        # that order (input_proj.0 is the res5 projection). The GroupNorm here is fixed,
        # independent of `norm`.
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
                for c in enc_in_channels[::-1]
            ]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)

        self.transformer = MSDeformAttnEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        # The transformer decoder always consumes exactly three scales.
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride

        finest_enc_stride = min(self.transformer_feature_strides)
        ratio = finest_enc_stride // common_stride
        if ratio < 1 or ratio * common_stride != finest_enc_stride or ratio & (ratio - 1):
            raise ValueError(
                f"common_stride {common_stride} must be the finest encoder stride "
                f"{finest_enc_stride} divided by a power of two"
            )
        self.num_fpn_levels = int(math.log2(ratio))

        use_bias = not norm
        lateral_convs, output_convs = [], []
        # Registered high resolution first (adapter_1 = res2), as in the official checkpoints.
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral)
            weight_init.c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        # Plain lists (not ModuleList) so the convs are not registered twice; reversed into
        # the top-down order in which forward visits them.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            # The official decoder hard-codes these two, ignoring DIM_FEEDFORWARD and
            # DEFORMABLE_TRANSFORMER_ENCODER_N_{HEADS,POINTS}.
            "transformer_dim_feedforward": 1024,
            "transformer_n_points": 4,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """
        Args:
            features: backbone maps by name, e.g. ``res2 [B,C2,H/4,W/4]`` ... ``res5 [B,C5,H/32,W/32]``.

        Returns:
            mask_features: ``[B, mask_dim, H/common_stride, W/common_stride]``.
            transformer_encoder_features: ``[B, conv_dim, H/32, W/32]``, the lowest-resolution
                encoder output.
            multi_scale_features: 3 maps ``[B, conv_dim, ., .]``, lowest resolution first
                (strides 32, 16, 8 with the default features).
        """
        device_type = next(iter(features.values())).device.type
        # Deformable sampling is numerically fragile in half precision: run it all in fp32.
        # Only with cpu_bf16 (MODEL.CPU_BF16, set by the meta-architecture) and under CPU
        # bfloat16 autocast do the convolutions and linear layers run in bf16, the sampling
        # locations and the sampling staying fp32 (see _deformable_attention).
        if self.cpu_bf16 and device_type == "cpu" and _cpu_bf16_autocast():
            return self._forward_fp32(features)
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_fp32(features)

    def _forward_fp32(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))

        memory, spatial_shapes, _ = self.transformer(srcs, pos)
        batch = memory.shape[0]

        shapes = [tuple(s) for s in spatial_shapes.tolist()]
        outs = []
        for (h, w), level in zip(shapes, memory.split([h * w for h, w in shapes], dim=1)):
            # a channels-last view of the memory: [B, h, w, C] with its dimensions permuted
            outs.append(level.reshape(batch, h, w, -1).permute(0, 3, 1, 2))

        # Extra FPN levels, top-down from the finest encoder level.
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[name].float()
            lateral = self.lateral_convs[idx](x)
            # outs[-1] is a transposed view of the encoder memory (channel stride 1): on CPU,
            # resizing it and adding it to a lateral map of another layout costs several times
            # more than one copy to the lateral map's layout first (channels-last after a CPU
            # backbone, see modeling/cpu_conv.py; channel-major otherwise)
            layout = torch.contiguous_format if lateral.is_contiguous() else torch.channels_last
            coarser = outs[-1].contiguous(memory_format=layout)
            merged = lateral + F.interpolate(coarser, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[idx](merged))

        multi_scale_features = outs[: self.maskformer_num_feature_levels]
        return self.mask_features(outs[-1]), outs[0], multi_scale_features

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Alias of :meth:`forward_features`."""
        return self.forward_features(features)
