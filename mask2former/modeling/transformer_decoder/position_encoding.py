"""Sinusoidal 2-D positional encoding (the DETR / Mask2Former variant)."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of the row and column index of every pixel.

    For a position with (1-based, cumulative over unmasked pixels) row coordinate ``y`` and
    column coordinate ``x``, and ``n = num_pos_feats``, the output channels are::

        [0, n)    y-part: channel 2k -> sin(y / T^(2k/n)), channel 2k+1 -> cos(y / T^(2k/n))
        [n, 2n)   x-part: the same with x

    with ``T = temperature``. With ``normalize=True`` the coordinates are first divided by the
    last coordinate of their row/column (so they end at 1) and multiplied by ``scale``
    (default ``2*pi``). The module has no parameters.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: int = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        """
        Args:
            num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
                Should be even so that sin and cos channels pair up.
            temperature: base ``T`` of the geometric frequency progression.
            normalize: rescale coordinates to ``(0, scale]``.
            scale: only valid with ``normalize=True``; defaults to ``2*pi``.
        """
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used when normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: ``[B, C, H, W]``; only its shape and device are used.
            mask: optional ``[B, H, W]`` bool, True at padded pixels (they do not advance the
                coordinate count).

        Returns:
            ``[B, 2 * num_pos_feats, H, W]`` float32.
        """
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), dtype=torch.bool, device=x.device)
        valid = ~mask
        y_pos = valid.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x_pos = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_pos = y_pos / (y_pos[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale

        # Channels 2k and 2k+1 share the frequency 1 / T^(2k/n).
        channel = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        wavelengths = self.temperature ** (2 * (channel // 2) / self.num_pos_feats)  # [n]

        y_enc = self._sin_cos(y_pos[..., None] / wavelengths)  # [B, H, W, n]
        x_enc = self._sin_cos(x_pos[..., None] / wavelengths)
        return torch.cat((y_enc, x_enc), dim=-1).permute(0, 3, 1, 2)

    @staticmethod
    def _sin_cos(phase: Tensor) -> Tensor:
        """sin on even channels, cos on odd channels of the last axis."""
        out = torch.empty_like(phase)
        out[..., 0::2] = phase[..., 0::2].sin()
        out[..., 1::2] = phase[..., 1::2].cos()
        return out

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
