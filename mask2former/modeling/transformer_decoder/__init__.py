from .classifier import IncrementalClassifier
from .logit_manipulation import manipulate_logits, parse_logit_deltas
from .mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    block_diagonal_mask,
    build_transformer_decoder,
)
