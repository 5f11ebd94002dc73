"""Swin Transformer backbone (Liu et al., ICCV 2021) for Detectron2.

This is an independent implementation of the hierarchical shifted-window transformer used by
Mask2Former/ECLIPSE as an optional backbone. It is registered as ``D2SwinTransformer`` in
Detectron2's ``BACKBONE_REGISTRY`` and is configured by the ``MODEL.SWIN.*`` keys of
:func:`mask2former.config.add_maskformer2_config`.

Compatibility with the official Mask2Former backbone
----------------------------------------------------
* **State-dict keys** are the same as in the official ``D2SwinTransformer`` (and hence as in the
  official Swin classification checkpoints converted by ``tools/convert-pretrained-swin-model-to-d2.py``):
  ``patch_embed.proj.*``, ``patch_embed.norm.*``, ``absolute_pos_embed`` (only if ``APE``),
  ``layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,
  attn.relative_position_index,norm2,mlp.fc1,mlp.fc2}.*``, ``layers.{i}.downsample.{reduction,norm}.*``
  (stages 0..2) and one output norm ``norm{i}.*`` per stage (always all four stages, whatever
  ``OUT_FEATURES`` selects). ``relative_position_index`` is a persistent buffer.
* **Numerics** follow the official detection/segmentation variant: the shifted-window mask uses
  ``-100`` (not ``-inf``) for forbidden pairs; feature maps are zero-padded at the bottom/right
  to a multiple of the window size *after* ``norm1`` and the padded tokens are not masked out
  of the attention (exactly as the official code); odd-sized maps are zero-padded before patch
  merging; the input image is zero-padded at the bottom/right to a multiple of the patch size;
  odd blocks are always shifted by ``window_size // 2`` even when a stage's map is smaller
  than a window; the 4 patches are concatenated in the order (even row, even col),
  (odd row, even col), (even row, odd col), (odd row, odd col) before the merging ``LayerNorm``.
* **Initialisation**: like the official Mask2Former backbone, linear/LayerNorm layers keep the
  PyTorch default initialisation; the relative position bias table and the absolute position
  embedding are drawn from a truncated normal with std 0.02. The backbone is normally
  initialised from an ImageNet checkpoint anyway (``MODEL.WEIGHTS``).

Input normalisation
-------------------
The backbone consumes the batched tensor produced by the meta-architecture, i.e.
``(image - PIXEL_MEAN) / PIXEL_STD`` of an **RGB** image in the 0..255 range. The official
Mask2Former Swin configs (and the ImageNet Swin checkpoints) use ``INPUT.FORMAT: "RGB"``,
``MODEL.PIXEL_MEAN: [123.675, 116.280, 103.530]`` and ``MODEL.PIXEL_STD: [58.395, 57.120, 57.375]``,
which equals torchvision's ``ToTensor()`` followed by ``Normalize`` with the ImageNet mean/std.
Any input size works (the backbone pads internally); ``size_divisibility`` is 32 so that the
meta-architecture pads batches to a multiple of the largest stride, like the official code.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import Tensor, nn

from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

__all__ = [
    "D2SwinTransformer",
    "SwinTransformer",
    "window_partition",
    "window_merge",
    "relative_position_index",
    "shifted_window_attention_mask",
    "DropPath",
]

# value added to the logits of forbidden (cross-region) pairs; the official code uses -100
MASK_VALUE = -100.0


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Cut a channels-last feature map into non-overlapping square windows.

    Args:
        x: ``[B, H, W, C]`` with ``H`` and ``W`` multiples of ``window_size``.
        window_size: side ``ws`` of a window.

    Returns:
        ``[B * (H // ws) * (W // ws), ws * ws, C]``; windows are ordered by batch, then window
        row, then window column, and the tokens of a window are in row-major order.
    """
    b, h, w, c = x.shape
    ws = window_size
    if h % ws or w % ws:
        raise ValueError(f"window_partition: map {h}x{w} is not a multiple of the window {ws}")
    x = x.reshape(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def window_merge(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: ``[B * (H // ws) * (W // ws), ws * ws, C]`` (or ``[..., ws, ws, C]``).
        window_size: side ``ws`` of a window.
        height, width: ``H`` and ``W`` of the map (multiples of ``ws``).

    Returns:
        ``[B, H, W, C]``.
    """
    ws = window_size
    nh, nw = height // ws, width // ws
    c = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: Tuple[int, int]) -> Tensor:
    """Index into the relative position bias table for every (query, key) pair of a window.

    For tokens ``i = (yi, xi)`` and ``j = (yj, xj)`` (row-major inside the window) the index is
    ``(yi - yj + Wh - 1) * (2 * Ww - 1) + (xi - xj + Ww - 1)``, the layout of the official table
    of shape ``[(2 Wh - 1) (2 Ww - 1), num_heads]``.

    Args:
        window_size: ``(Wh, Ww)``.

    Returns:
        int64 ``[Wh * Ww, Wh * Ww]``.
    """
    wh, ww = window_size
    ys = torch.arange(wh).repeat_interleave(ww)  # row of each token, [N]
    xs = torch.arange(ww).repeat(wh)  # column of each token, [N]
    dy = ys[:, None] - ys[None, :] + (wh - 1)
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    return (dy * (2 * ww - 1) + dx).long()


def _region_ids(length: int, window_size: int, shift: int) -> Tensor:
    """Along one axis of a rolled map, label positions by the original band they came from.

    After rolling by ``-shift`` the last ``shift`` positions wrapped around from the start, and
    the last window additionally holds ``window_size - shift`` positions from the original end.
    Returns int64 ``[length]`` with 0 (interior), 1 (last window, not wrapped), 2 (wrapped).
    """
    pos = torch.arange(length)
    ids = torch.zeros(length, dtype=torch.long)
    ids[pos >= length - window_size] = 1
    ids[pos >= length - shift] = 2
    return ids


def shifted_window_attention_mask(
    height: int, width: int, window_size: int, shift: int, device=None, dtype=torch.float32
) -> Tensor:
    """Additive attention mask of the shifted-window attention on a (padded) map.

    Tokens of one window of the rolled map may attend to each other only if they were already
    neighbours before the roll (the same band along both axes).

    Args:
        height, width: size of the padded map (multiples of ``window_size``).
        window_size: window side ``ws``.
        shift: cyclic shift (``0 < shift < ws``).

    Returns:
        ``[nW, ws*ws, ws*ws]`` with 0 for allowed and ``-100`` for forbidden pairs,
        ``nW = (height // ws) * (width // ws)`` in the order of :func:`window_partition`.
    """
    rid_h = _region_ids(height, window_size, shift)
    rid_w = _region_ids(width, window_size, shift)
    region = (rid_h[:, None] * 3 + rid_w[None, :]).to(device)  # [H, W]
    region = window_partition(region[None, :, :, None], window_size)[..., 0]  # [nW, N]
    differ = region[:, :, None] != region[:, None, :]
    mask = torch.zeros(differ.shape, dtype=dtype, device=device)
    return mask.masked_fill(differ, MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``.

    Kept samples are rescaled by ``1 / (1 - p)``; identity in eval mode or when ``p == 0``.
    Input ``[B, ...]`` -> output of the same shape.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ------------------------------------------------------------------------------------------------
# building blocks (attribute names define the state-dict keys; keep them)
# ------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """Token-wise feed-forward network ``fc2(drop(GELU(fc1(x))))`` followed by dropout.

    ``[..., C] -> [..., C]``.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Args:
        dim: channels ``C``.
        window_size: ``(Wh, Ww)``.
        num_heads: number of heads (``C`` must be divisible by it).
        qkv_bias: learn a bias for the q/k/v projection.
        qk_scale: logit scale; ``None`` means ``head_dim ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        window_size: Tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """Returns ``[num_heads, N, N]`` with ``N = Wh * Ww``."""
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: ``[B * nW, N, C]`` tokens of the windows (window-major per image).
            mask: ``None`` or additive ``[nW, N, N]`` mask shared by all images.

        Returns:
            ``[B * nW, N, C]``.
        """
        bw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B*nW, heads, N, C/heads]
        logits = (q * self.scale) @ k.transpose(-2, -1)
        logits = logits + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(bw // nw, nw, h, n, n) + mask[None, :, None].to(logits.dtype)
            logits = logits.reshape(bw, h, n, n)
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """Pre-norm transformer block with (shifted) window attention and an MLP.

    Args:
        dim: channels ``C``.
        num_heads: attention heads.
        window_size: window side.
        shift_size: cyclic shift (0 for regular windows).
        mlp_ratio: hidden width of the MLP relative to ``C``.
        qkv_bias, qk_scale, drop, attn_drop: see :class:`WindowAttention`.
        drop_path: stochastic depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim,
            (window_size, window_size),
            num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, height: int, width: int, attn_mask: Optional[Tensor]) -> Tensor:
        """
        Args:
            x: ``[B, H*W, C]`` tokens in row-major order.
            height, width: ``H`` and ``W``.
            attn_mask: ``[nW, ws*ws, ws*ws]`` mask of the padded map (used only if shifted).

        Returns:
            ``[B, H*W, C]``.
        """
        b, l, c = x.shape
        if l != height * width:
            raise ValueError(f"got {l} tokens for a {height}x{width} map")
        ws = self.window_size
        y = self.norm1(x).reshape(b, height, width, c)
        pad_b = (-height) % ws
        pad_r = (-width) % ws
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = height + pad_b, width + pad_r
        if self.shift_size:
            y = torch.roll(y, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None
        y = self.attn(window_partition(y, ws), mask=attn_mask)
        y = window_merge(y, ws, hp, wp)
        if self.shift_size:
            y = torch.roll(y, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        y = y[:, :height, :width, :].reshape(b, l, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the resolution by concatenating 2x2 neighbours, then ``LayerNorm`` + linear ``4C -> 2C``.

    Odd maps are zero-padded at the bottom/right first.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """``[B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]``."""
        b, l, c = x.shape
        if l != height * width:
            raise ValueError(f"got {l} tokens for a {height}x{width} map")
        x = x.reshape(b, height, width, c)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        parts = [x[:, r::2, s::2, :] for s in (0, 1) for r in (0, 1)]
        x = torch.cat(parts, dim=-1).reshape(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating regular and shifted windows, then optional merging.

    Args:
        dim: channels of the stage.
        depth: number of blocks.
        num_heads: attention heads.
        window_size: window side; odd blocks are shifted by ``window_size // 2``.
        drop_path: a rate per block (list) or one rate for all.
        downsample: append a :class:`PatchMerging`.
        use_checkpoint: recompute the blocks in the backward pass to save memory.
        (other arguments: see :class:`SwinTransformerBlock`)
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path=0.0,
        downsample: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.use_checkpoint = use_checkpoint
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=self.shift_size if i % 2 else 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=rates[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor, int, int]:
        """
        Args:
            x: ``[B, H*W, C]``.

        Returns:
            ``(out, next_x, next_h, next_w)``: the stage output ``[B, H*W, C]`` and the input of
            the next stage (merged: ``[B, ceil(H/2)*ceil(W/2), 2C]``; else ``out`` itself).
        """
        ws = self.window_size
        mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            hp, wp = -(-height // ws) * ws, -(-width // ws) * ws
            mask = shifted_window_attention_mask(
                hp, wp, ws, self.shift_size, device=x.device, dtype=x.dtype
            )
        for blk in self.blocks:
            if self.use_checkpoint and x.requires_grad:
                x = activation_checkpoint.checkpoint(blk, x, height, width, mask, use_reentrant=False)
            else:
                x = blk(x, height, width, mask)
        if self.downsample is None:
            return x, x, height, width
        return x, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution (after bottom/right zero padding) + optional norm.

    ``[B, Cin, H, W] -> [B, C, ceil(H/p), ceil(W/p)]``.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        pad_b, pad_r = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if pad_b or pad_r:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x


# ------------------------------------------------------------------------------------------------
# backbone
# ------------------------------------------------------------------------------------------------
_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class SwinTransformer(Backbone):
    """Swin Transformer with four stages returning ``res2..res5`` (strides 4, 8, 16, 32).

    Args:
        pretrain_img_size: image size of the pre-training; sets the grid of the absolute
            position embedding (only used with ``ape``).
        patch_size: side of the patch embedding (the stride of ``res2``; 4 in all Swin models).
        in_chans: input channels.
        embed_dim: channels ``C`` of the first stage; stage ``i`` has ``C * 2**i``.
        depths: blocks per stage (4 entries).
        num_heads: heads per stage (4 entries).
        window_size, mlp_ratio, qkv_bias, qk_scale: see :class:`SwinTransformerBlock`.
        drop_rate: dropout after the position embedding, in the MLPs and after attention.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth rate, increased linearly from 0 over all blocks.
        ape: learn an absolute position embedding (bicubically resized to the input grid).
        patch_norm: ``LayerNorm`` after the patch embedding.
        out_features: the stage names to return (subset of ``res2..res5``).
        use_checkpoint: activation checkpointing of the blocks.
    """

    def __init__(
        self,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: Optional[float] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_features: Sequence[str] = _STAGE_NAMES,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(
                f"Swin needs 4 stages (res2..res5); got DEPTHS={depths}, NUM_HEADS={num_heads}"
            )
        unknown = [f for f in out_features if f not in _STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"OUT_FEATURES must be a non-empty subset of {_STAGE_NAMES}; got {list(out_features)}"
            )
        self.num_layers = 4
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.ape = ape
        self.num_features = [embed_dim * 2**i for i in range(self.num_layers)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        if ape:
            grid = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i in range(self.num_layers):
            self.layers.append(
                BasicLayer(
                    self.num_features[i],
                    depths[i],
                    num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[start : start + depths[i]],
                    downsample=i < self.num_layers - 1,
                    use_checkpoint=use_checkpoint,
                )
            )
            start += depths[i]
        # one output LayerNorm per stage (all four exist, as in the official checkpoints)
        for i in range(self.num_layers):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        self._out_features = list(out_features)
        self._out_feature_strides = {n: patch_size * 2**i for i, n in enumerate(_STAGE_NAMES)}
        self._out_feature_channels = dict(zip(_STAGE_NAMES, self.num_features))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: ``[N, C_in, H, W]`` normalised images (any ``H``, ``W``; padded internally).

        Returns:
            dict name -> ``[N, embed_dim * 2**i, ceil(H / s), ceil(W / s)]`` for the requested
            ``res{i+2}`` with stride ``s = patch_size * 2**i``.
        """
        if x.dim() != 4:
            raise ValueError(f"SwinTransformer expects [N, C, H, W] input, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(h, w), mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2))

        outputs = {}
        for i, layer in enumerate(self.layers):
            out, x, nh, nw = layer(x, h, w)
            name = _STAGE_NAMES[i]
            if name in self._out_features:
                out = getattr(self, f"norm{i}")(out)
                outputs[name] = out.reshape(out.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            h, w = nh, nw
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer):
    """:class:`SwinTransformer` built from a config (``MODEL.SWIN.*``).

    Build it with ``MODEL.BACKBONE.NAME: "D2SwinTransformer"``; ``input_shape.channels`` gives
    the number of input channels (3 for RGB).
    """

    def __init__(self, cfg, input_shape: ShapeSpec):
        sw = cfg.MODEL.SWIN
        in_chans = input_shape.channels if input_shape.channels is not None else 3
        super().__init__(
            pretrain_img_size=sw.PRETRAIN_IMG_SIZE,
            patch_size=sw.PATCH_SIZE,
            in_chans=in_chans,
            embed_dim=sw.EMBED_DIM,
            depths=sw.DEPTHS,
            num_heads=sw.NUM_HEADS,
            window_size=sw.WINDOW_SIZE,
            mlp_ratio=sw.MLP_RATIO,
            qkv_bias=sw.QKV_BIAS,
            qk_scale=sw.QK_SCALE,
            drop_rate=sw.DROP_RATE,
            attn_drop_rate=sw.ATTN_DROP_RATE,
            drop_path_rate=sw.DROP_PATH_RATE,
            ape=sw.APE,
            patch_norm=sw.PATCH_NORM,
            out_features=sw.OUT_FEATURES,
            use_checkpoint=sw.USE_CHECKPOINT,
        )
