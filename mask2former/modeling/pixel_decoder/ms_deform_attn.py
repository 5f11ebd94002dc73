"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch or an optional kernel.

The sampling core is :func:`ms_deform_attn_core_pytorch`, built on ``F.grid_sample``; it runs
everywhere and is the reference. :func:`ms_deform_attn` (what :class:`MSDeformAttn` calls)
dispatches to one of the registered implementations:

* ``"pytorch"``: that core (any device);
* ``"triton"``: the Triton kernel of :mod:`.ms_deform_attn_triton` (CUDA tensors; needs
  ``triton``, which PyTorch's Linux CUDA wheels install);
* ``"cuda_ext"``: the compiled ``MultiScaleDeformableAttention`` extension of Deformable DETR /
  Mask2Former, if the user has built and installed it (CUDA tensors);
* ``"auto"`` (default): for CUDA inputs ``cuda_ext`` if it imports, else ``triton`` if it
  imports, else ``pytorch``; ``pytorch`` for inputs on any other device.

The choice comes from :func:`set_ms_deform_attn_impl`, else the environment variable
``ECLIPSE_DEFORM_ATTN_IMPL``, else ``"auto"``. An explicitly requested implementation that is
not installed, or does not run on the inputs' device, raises an error; only ``"auto"`` picks.
All three differentiate the output with respect to the value, the sampling locations and the
attention weights. :func:`register_ms_deform_attn_core` adds further implementations.

Notation used in the shape comments:

* ``B``: batch size
* ``Lq``: number of queries
* ``S``: total number of flattened value positions over all levels, ``sum_l H_l * W_l``
* ``M``: number of heads, ``Dh``: channels per head
* ``L``: number of feature levels, ``P``: sampling points per head and level
"""
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ENV_VAR",
    "MSDeformAttn",
    "available_ms_deform_attn_impls",
    "get_ms_deform_attn_impl",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "register_ms_deform_attn_core",
    "resolve_ms_deform_attn_impl",
    "set_ms_deform_attn_impl",
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


# --------------------------------------------------------------------------------------------
# Implementations and their selection
# --------------------------------------------------------------------------------------------
ENV_VAR = "ECLIPSE_DEFORM_ATTN_IMPL"
#: tried in this order by "auto" for CUDA inputs; "pytorch" when none of them is available
AUTO_ORDER = ("cuda_ext", "triton")


class _Implementation:
    def __init__(self, loader: Callable[[], Callable[..., Tensor]], devices):
        self.loader = loader
        self._devices = devices
        self.fn: Optional[Callable[..., Tensor]] = None
        self.error: Optional[str] = None  # why it cannot be loaded, once tried

    def load(self) -> Optional[Callable[..., Tensor]]:
        if self.fn is None and self.error is None:
            try:
                self.fn = self.loader()
            except Exception as exc:  # ImportError, or a loader's own check
                self.error = f"{type(exc).__name__}: {exc}"
        return self.fn

    @property
    def devices(self) -> Tuple[str, ...]:
        return tuple(self._devices() if callable(self._devices) else self._devices)


_implementations: Dict[str, _Implementation] = {}
_selected: Optional[str] = None


def register_ms_deform_attn_core(
    name: str,
    loader: Callable[[], Callable[..., Tensor]],
    devices: Union[Sequence[str], Callable[[], Sequence[str]]] = ("cuda",),
) -> None:
    """Make an implementation selectable by ``name`` (replacing one of the same name).

    ``loader()`` is called on first use and returns
    ``fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`` with
    the shape contract of :func:`ms_deform_attn_core_pytorch` (``spatial_shapes`` ``[L, 2]`` and
    ``level_start_index`` ``[L]`` as long tensors), differentiable in ``value``,
    ``sampling_locations`` and ``attention_weights``. If the loader raises (a missing optional
    package), the implementation is unavailable and the exception text is the reason reported.
    ``devices``: the device types (``"cuda"``, ``"cpu"``) the implementation accepts, or a
    function returning them (asked at every call).
    """
    if name == "auto":
        raise ValueError("'auto' is reserved for the automatic choice")
    _implementations[name] = _Implementation(loader, devices if callable(devices) else tuple(devices))


def available_ms_deform_attn_impls() -> Dict[str, Optional[str]]:
    """Every registered implementation with ``None`` if it loads, else the reason it does not."""
    return {name: (None if impl.load() is not None else impl.error) for name, impl in _implementations.items()}


def set_ms_deform_attn_impl(name: Optional[str]) -> None:
    """Select the implementation for the whole process: ``"auto"``, ``"pytorch"``, ``"triton"``,
    ``"cuda_ext"`` or a registered name; ``None`` returns to the environment variable
    ``ECLIPSE_DEFORM_ATTN_IMPL`` (default ``"auto"``)."""
    if name is not None:
        _check_name(name)
    global _selected
    _selected = name


def get_ms_deform_attn_impl() -> str:
    """The requested implementation name (before ``"auto"`` is resolved)."""
    name = _selected if _selected is not None else (os.environ.get(ENV_VAR) or "auto")
    _check_name(name)
    return name


def _check_name(name: str) -> None:
    if name != "auto" and name not in _implementations:
        choices = ", ".join(["auto"] + sorted(_implementations))
        raise ValueError(f"unknown deformable-attention implementation {name!r} (set via "
                         f"set_ms_deform_attn_impl or ${ENV_VAR}); choose one of: {choices}")


def resolve_ms_deform_attn_impl(device: Union[torch.device, str], name: Optional[str] = None) -> str:
    """The implementation that runs for inputs on ``device``: ``name`` (default: the selected
    one) if it is available there, the best available one for ``"auto"``.

    Raises ``RuntimeError`` when an explicitly requested implementation cannot be loaded and
    ``ValueError`` when it does not run on ``device``; an explicit request never falls back.
    """
    name = get_ms_deform_attn_impl() if name is None else name
    _check_name(name)
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda":
            for candidate in AUTO_ORDER:
                impl = _implementations.get(candidate)
                if impl is not None and device_type in impl.devices and impl.load() is not None:
                    return candidate
        return "pytorch"
    impl = _implementations[name]
    if name != "pytorch" and device_type not in impl.devices:
        raise ValueError(
            f"deformable-attention implementation {name!r} runs on {'/'.join(impl.devices)} tensors, "
            f"the inputs are on {device_type}; select 'pytorch' or 'auto' (${ENV_VAR})"
        )
    if impl.load() is None:
        raise RuntimeError(f"deformable-attention implementation {name!r} is not available: {impl.error}")
    return name


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: Optional[str] = None,
) -> Tensor:
    """Run the selected implementation (``impl``, else :func:`get_ms_deform_attn_impl`).

    Shapes as in :func:`ms_deform_attn_core_pytorch`; ``level_start_index`` is ``[L]`` (the
    offset of each level in the flattened value); the pure-PyTorch core does not need it.
    """
    name = resolve_ms_deform_attn_impl(value.device, impl)
    if name == "pytorch":
        return ms_deform_attn_core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    fn = _implementations[name].fn
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _load_pytorch() -> Callable[..., Tensor]:
    return lambda value, shapes, _starts, locations, weights: ms_deform_attn_core_pytorch(
        value, shapes, locations, weights
    )


def _load_triton() -> Callable[..., Tensor]:
    # optional: triton ships with PyTorch's Linux CUDA wheels, not with every build
    from .ms_deform_attn_triton import ms_deform_attn_triton

    return ms_deform_attn_triton


def _triton_devices() -> Tuple[str, ...]:
    # Triton's interpreter runs the kernel on CPU tensors (used by the tests)
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


class _CompiledExtensionFunction(torch.autograd.Function):
    """The compiled ``MultiScaleDeformableAttention`` extension (Deformable DETR / Mask2Former
    ``ops``), which takes float32 or float64 inputs and a batch chunk size ``im2col_step``."""

    @staticmethod
    def forward(ctx, ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out_dtype = value.dtype
        dtype = value.dtype if value.dtype in (torch.float32, torch.float64) else torch.float32
        value, sampling_locations, attention_weights = (
            t.to(dtype).contiguous() for t in (value, sampling_locations, attention_weights)
        )
        spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.int64)
        level_start_index = level_start_index.to(device=value.device, dtype=torch.int64)
        batch = value.shape[0]
        # the extension processes the batch in chunks that must divide it
        step = max(d for d in range(1, min(batch, 64) + 1) if batch % d == 0)
        out = ext.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step
        )
        ctx.ext, ctx.step, ctx.out_dtype = ext, step, out_dtype
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.ext.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, grad_out.to(value.dtype).contiguous(), ctx.step
        )
        return None, grad_value, None, None, grad_locations, grad_weights


def _load_cuda_ext() -> Callable[..., Tensor]:
    # optional: built by the user from Deformable DETR / Mask2Former sources (not shipped here)
    import MultiScaleDeformableAttention as ext

    def run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return _CompiledExtensionFunction.apply(
            ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    return run


register_ms_deform_attn_core("pytorch", _load_pytorch, devices=("any",))  # runs on every device
register_ms_deform_attn_core("triton", _load_triton, devices=_triton_devices)
register_ms_deform_attn_core("cuda_ext", _load_cuda_ext, devices=("cuda",))


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
