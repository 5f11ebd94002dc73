"""The per-step class heads of ECLIPSE."""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import MLP

__all__ = ["IncrementalClassifier", "COSINE_SCALE"]

#: logit scale of the cosine classifier (fixed in the official code)
COSINE_SCALE = 10.0


class IncrementalClassifier(nn.Module):
    """One class head per step plus a shared no-object head.

    ``cls[0]`` is the no-object head (1 output), ``cls[1]`` the base classes, ``cls[j]`` for
    ``j >= 2`` the classes added at step ``j - 1``. Every head sees every query. The output
    puts the class columns in step order and the no-object column last:
    ``[cls[1](x), cls[2](x), ..., cls[0](x)]``.

    Args:
        head_sizes: output sizes ``[1, C0, Cinc, ...]`` (no-object head first).
        hidden_dim: query dimension.
        deep: 3-layer MLP heads (``layers.{0,1,2}``) instead of one Linear layer.
        bias: bias of the Linear heads (the MLP heads always have biases).
        cosine: cosine classifier (``CONT.COSINE``): bias-free Linear heads and logits
            ``COSINE_SCALE * <x / |x|, w / |w|>``. As in the official code, ``x [B, Q, C]`` is
            normalised over dimension 1, the query axis; each weight row over its features.
    """

    def __init__(self, head_sizes: Sequence[int], hidden_dim: int, deep: bool = True, bias: bool = True,
                 cosine: bool = False):
        super().__init__()
        if cosine and deep:
            raise ValueError("the cosine classifier has Linear heads: deep must be False")
        self.cosine = cosine
        if deep:
            heads = [MLP(hidden_dim, hidden_dim, n, 3) for n in head_sizes]
        else:
            heads = [nn.Linear(hidden_dim, n, bias=bias and not cosine) for n in head_sizes]
        self.cls = nn.ModuleList(heads)

    @property
    def num_classes(self) -> int:
        """Number of real classes (without no-object)."""
        return sum(h.out_features if isinstance(h, nn.Linear) else h.layers[-1].out_features
                   for h in self.cls[1:])

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., hidden_dim] -> logits [..., num_classes + 1], no-object last."""
        heads = list(self.cls[1:]) + [self.cls[0]]
        if self.cosine:
            x = F.normalize(x, p=2, dim=1)
            return COSINE_SCALE * torch.cat([F.linear(x, F.normalize(h.weight, p=2, dim=1)) for h in heads], dim=-1)
        return torch.cat([head(x) for head in heads], dim=-1)
