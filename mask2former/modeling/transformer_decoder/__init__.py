"""The masked-attention transformer decoder with the per-step prompt banks; owns the list of
each step's modules (``MultiScaleMaskedTransformerDecoder.step_modules``), the incremental
classifier and the logit manipulation (docs/design.md#per-step-modules).

May import: torch, detectron2, fvcore, its own modules."""
from .classifier import IncrementalClassifier
from .logit_manipulation import manipulate_logits, parse_logit_deltas
from .mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
    block_diagonal_mask,
    build_transformer_decoder,
)
