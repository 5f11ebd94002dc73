"""The multi-scale deformable-attention pixel decoder and its attention kernels (pure PyTorch,
Triton, the compiled extension when installed).

May import: torch, detectron2, fvcore, its own modules; triton and the compiled extension only
lazily (optional)."""
from .ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    register_ms_deform_attn_core,
    set_ms_deform_attn_impl,
)
from .msdeformattn import MSDeformAttnPixelDecoder
