"""Building blocks of the masked-attention transformer decoder.

All blocks use the sequence-first layout ``[L, B, C]`` of :class:`torch.nn.MultiheadAttention`
and post-norm by default (LayerNorm after each residual addition), with an optional pre-norm.
"""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer", "MLP"]


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

    ``memory_mask`` is bool [B*heads, Q, HW] (True = blocked); ``pos`` is added to the keys and
    ``query_pos`` to the queries.
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
