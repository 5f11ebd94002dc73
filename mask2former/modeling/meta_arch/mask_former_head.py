"""``MaskFormerHead``: pixel decoder followed by the transformer decoder."""
from contextlib import nullcontext
from typing import Dict, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import Tensor, nn

from ..transformer_decoder.mask2former_transformer_decoder import build_transformer_decoder

__all__ = ["MaskFormerHead", "build_pixel_decoder"]


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} has no forward_features(); "
            "use a MaskFormer pixel decoder such as MSDeformAttnPixelDecoder"
        )
    return model


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Runs the pixel decoder on backbone features, then the transformer decoder on the pixel
    decoder's multi-scale outputs (``TRANSFORMER_IN_FEATURE "multi_scale_pixel_decoder"``, the
    only value the masked-attention decoder works with). Training and inference both come here.

    A pixel decoder with no trainable parameter (prompt tuning at steps > 0) runs without
    autograd in training, so it keeps no graph.

    State-dict names: ``pixel_decoder.*`` and ``predictor.*`` (as in the official code).
    """

    _version = 2

    @configurable
    def __init__(self, *, pixel_decoder: nn.Module, transformer_predictor: nn.Module):
        """
        Args:
            pixel_decoder: module with ``forward_features(features)`` returning
                (mask_features, encoder_features, multi_scale_features).
            transformer_predictor: the transformer decoder.
        """
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if in_feature != "multi_scale_pixel_decoder":
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r} is not supported: the masked-attention "
                "decoder reads the pixel decoder's multi-scale features. Set it to 'multi_scale_pixel_decoder' "
                "(as every ECLIPSE config does)."
            )
        input_shape = {k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES}
        return {
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_predictor": build_transformer_decoder(
                cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, mask_classification=True
            ),
        }

    def forward(self, features: Dict[str, Tensor], mask: Optional[Tensor] = None) -> Dict:
        """``features``: backbone outputs {name: [B, C, H, W]} -> decoder output dict."""
        frozen = self.training and not any(p.requires_grad for p in self.pixel_decoder.parameters())
        with torch.no_grad() if frozen else nullcontext():
            mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        outputs = self.predictor(multi_scale_features, mask_features, mask)
        if self.training:
            outputs["features"] = mask_features  # for the distillation baselines (POD)
        return outputs
