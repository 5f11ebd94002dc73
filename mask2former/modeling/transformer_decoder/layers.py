"""Building blocks of the masked-attention transformer decoder.

All blocks use the sequence-first layout ``[L, B, C]`` of :class:`torch.nn.MultiheadAttention`
and post-norm by default (LayerNorm after each residual addition), with an optional pre-norm.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer", "MLP", "StackedMLPs", "resize_bilinear",
           "mask_logits"]


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _AttentionBlock(nn.Module):
    """Attention with dropout, a residual and a LayerNorm (after the residual, or before the
    attention with ``normalize_before``). The attention module is registered under
    ``ATTENTION_NAME`` (the official state-dict names differ between the two blocks)."""

    ATTENTION_NAME = ""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        setattr(self, self.ATTENTION_NAME, nn.MultiheadAttention(d_model, nhead, dropout=dropout))
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def _residual(self, tgt: Tensor, attend) -> Tensor:
        """``attend(x)`` gets the (pre-normalised) queries and returns the attended values."""
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(attend(x))
        return tgt if self.normalize_before else self.norm(tgt)


class SelfAttentionLayer(_AttentionBlock):
    """Self-attention among queries; the positional embedding is added to queries and keys.

    Args of ``forward``: ``tgt`` [Q, B, C], ``query_pos`` [Q, B, C], ``tgt_mask`` bool
    [Q, Q] or [B*heads, Q, Q] (True = not allowed).
    """

    ATTENTION_NAME = "self_attn"

    def forward(
        self,
        tgt: Tensor,
        tgt_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        def attend(x):
            q = k = _with_pos(x, query_pos)
            return self.self_attn(
                q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, need_weights=False
            )[0]

        return self._residual(tgt, attend)


class CrossAttentionLayer(_AttentionBlock):
    """Masked cross-attention from queries [Q, B, C] to image tokens ``memory`` [HW, B, C].

    ``memory_mask`` is bool [B*heads, Q, HW] (True = blocked) or additive float (-inf = blocked);
    ``pos`` is added to the keys and ``query_pos`` to the queries.
    """

    ATTENTION_NAME = "multihead_attn"

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        def attend(x):
            return self.multihead_attn(
                query=_with_pos(x, query_pos), key=_with_pos(memory, pos), value=memory,
                attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask, need_weights=False,
            )[0]

        return self._residual(tgt, attend)


class FFNLayer(nn.Module):
    """Position-wise feed-forward block ``linear2(relu(linear1(x)))`` with a residual."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (parameters ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x


class StackedMLPs:
    """Several :class:`MLP` of one shape applied to consecutive query groups of equal size, with
    one batched matrix product per layer instead of one small product per group and layer.

    Built from the MLPs' current parameters (a stacked copy: build it for one forward, do not
    keep it across parameter updates). Same results as applying each MLP to its own group, up
    to float summation order.
    """

    def __init__(self, mlps: Sequence[MLP], group_size: int):
        depth = len(mlps[0].layers)
        if any(len(m.layers) != depth for m in mlps):
            raise ValueError("StackedMLPs needs MLPs of the same depth")
        self.group_size = group_size
        self.num_groups = len(mlps)
        # [G, in, out] weights and [G, 1, out] biases, per layer
        self.weights = [torch.stack([m.layers[i].weight for m in mlps]).transpose(1, 2) for i in range(depth)]
        self.biases = [torch.stack([m.layers[i].bias for m in mlps]).unsqueeze(1) for i in range(depth)]

    def __call__(self, x: Tensor) -> Tensor:
        """``[B, G * group_size, C]`` -> ``[B, G * group_size, out]``."""
        batch, rows, channels = x.shape
        groups, size = self.num_groups, self.group_size
        if rows != groups * size:
            raise ValueError(f"{rows} queries do not make {groups} groups of {size}")
        h = x.reshape(batch, groups, size, channels).transpose(0, 1).reshape(groups, batch * size, channels)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < last:
                h = F.relu(h)
        return h.reshape(groups, batch, size, -1).transpose(0, 1).reshape(batch, rows, -1)


def resize_bilinear(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``[N, C, H, W]``.

    When both sides shrink by an integer factor ``r``, output pixel ``i`` sits at input
    position ``r * i + (r - 1) / 2``: on a pixel for odd ``r`` (a strided pick) and halfway
    between two pixels for even ``r`` (their mean, the interpolation weights being exactly
    1/2). That is computed here by strided slicing, which on CPU costs a small fraction of
    ``F.interpolate`` on a channel-major map; other sizes go to ``F.interpolate``.
    Differentiable either way.
    """
    height, width = x.shape[-2:]
    out_h, out_w = size
    if out_h <= 0 or out_w <= 0 or height % out_h or width % out_w:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    for dim, factor in ((-1, width // out_w), (-2, height // out_h)):
        if factor == 1:
            continue
        first = (factor - 1) // 2
        picked = x.narrow(dim, first, x.shape[dim] - first)
        index = [slice(None)] * x.dim()
        index[dim] = slice(None, None, factor)
        if factor % 2:
            x = picked[tuple(index)]
        else:
            following = x.narrow(dim, first + 1, x.shape[dim] - first - 1)
            x = (picked[tuple(index)] + following[tuple(index)]) * 0.5
    return x


class _MaskLogits(torch.autograd.Function):
    """``einsum("bqc,bchw->bqhw", embeddings, features)`` whose backward skips the queries of
    an image whose output gradient is zero everywhere.

    In training only the matched queries' masks enter a loss, so most rows of the gradient are
    zero; the two gradient products then run over the other rows only (the skipped rows
    contribute exact zeros; only the float summation order changes).
    """

    @staticmethod
    def forward(ctx, embeddings: Tensor, features: Tensor) -> Tensor:
        ctx.save_for_backward(embeddings, features)
        return torch.einsum("bqc,bchw->bqhw", embeddings, features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        embeddings, features = ctx.saved_tensors
        need_embeddings, need_features = ctx.needs_input_grad
        batch, _, height, width = grad.shape
        grad = grad.reshape(batch, grad.shape[1], height * width)
        flat = features.reshape(batch, features.shape[1], height * width)
        grad_embeddings = torch.zeros_like(embeddings) if need_embeddings else None
        grad_features = torch.zeros_like(flat) if need_features else None
        for b in range(batch):
            rows = grad[b].ne(0).any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            g = grad[b].index_select(0, rows)
            if need_embeddings:
                grad_embeddings[b].index_copy_(0, rows, g @ flat[b].t())
            if need_features:
                grad_features[b] = embeddings[b].index_select(0, rows).t() @ g
        if grad_features is not None:
            grad_features = grad_features.view(features.shape)
        return grad_embeddings, grad_features


def mask_logits(embeddings: Tensor, features: Tensor) -> Tensor:
    """``[B, Q, C] x [B, C, H, W] -> [B, Q, H, W]`` mask logits; when a gradient is needed
    (and no autocast is active), through :class:`_MaskLogits`, whose backward skips the
    queries without a gradient."""
    if torch.is_grad_enabled() and (embeddings.requires_grad or features.requires_grad) \
            and not torch.is_autocast_enabled(embeddings.device.type):
        return _MaskLogits.apply(embeddings, features)
    return torch.einsum("bqc,bchw->bqhw", embeddings, features)
