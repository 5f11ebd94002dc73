from .ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    register_ms_deform_attn_core,
    set_ms_deform_attn_impl,
)
from .msdeformattn import MSDeformAttnPixelDecoder
