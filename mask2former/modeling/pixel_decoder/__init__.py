"""The multi-scale deformable-attention pixel decoder and its attention kernel.

May import: torch, detectron2, fvcore, its own modules."""
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_core_pytorch, register_ms_deform_attn_core
from .msdeformattn import MSDeformAttnPixelDecoder
