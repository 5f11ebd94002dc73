"""Network modules; importing registers them with Detectron2's registries.

May import: torch, detectron2, fvcore, its own modules; never ``continual``."""
from . import backbone
from .meta_arch.mask_former_head import MaskFormerHead
from .pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder
from .transformer_decoder.mask2former_transformer_decoder import MultiScaleMaskedTransformerDecoder
