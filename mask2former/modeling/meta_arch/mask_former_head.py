"""``MaskFormerHead``: pixel decoder followed by the transformer decoder."""
import logging
from typing import Dict, Optional

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
    """Runs the pixel decoder on backbone features, then the transformer decoder.

    State-dict names: ``pixel_decoder.*`` and ``predictor.*`` (as in the official code).
    """

    _version = 2

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
    ):
        """
        Args:
            input_shape: shapes of the backbone outputs.
            num_classes, loss_weight, ignore_value: kept for compatibility with the config.
            pixel_decoder: module with ``forward_features(features)`` returning
                (mask_features, encoder_features, multi_scale_features).
            transformer_predictor: the transformer decoder.
            transformer_in_feature: ``"multi_scale_pixel_decoder"`` (the decoder reads the
                pixel decoder's multi-scale outputs), ``"transformer_encoder"``,
                ``"pixel_embedding"`` or a backbone feature name.
        """
        super().__init__()
        self.in_features = [k for k, _ in sorted(input_shape.items(), key=lambda x: x[1].stride)]
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if in_feature == "transformer_encoder":
            channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        elif in_feature == "pixel_embedding":
            channels = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
        elif in_feature == "multi_scale_pixel_decoder":
            channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        else:
            channels = input_shape[in_feature].channels
        input_shape = {
            k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
        }
        return {
            "input_shape": input_shape,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "transformer_in_feature": in_feature,
            "transformer_predictor": build_transformer_decoder(cfg, channels, mask_classification=True),
        }

    def forward(self, features: Dict[str, Tensor], mask: Optional[Tensor] = None) -> Dict:
        """``features``: backbone outputs {name: [B, C, H, W]} -> decoder output dict."""
        mask_features, encoder_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        if self.transformer_in_feature == "multi_scale_pixel_decoder":
            return self.predictor(multi_scale_features, mask_features, mask)
        if self.transformer_in_feature == "transformer_encoder":
            if encoder_features is None:
                raise ValueError("this pixel decoder provides no transformer-encoder features")
            return self.predictor(encoder_features, mask_features, mask)
        if self.transformer_in_feature == "pixel_embedding":
            return self.predictor(mask_features, mask_features, mask)
        return self.predictor(features[self.transformer_in_feature], mask_features, mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Unlike the official head, no renaming of "old-format" keys happens here: our
        # checkpoints always use pixel_decoder.* / predictor.* (see fixtures README 3.1).
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if local_metadata.get("version", 2) < 2:
            logging.getLogger(__name__).debug("loaded a MaskFormerHead state dict of version < 2")
