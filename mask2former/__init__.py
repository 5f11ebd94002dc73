"""The network: Mask2Former with the ECLIPSE per-step prompt banks, as a Detectron2 extension.

Owns: the config keys the network reads (``add_maskformer2_config``, including the ``CONT.*``
keys that shape the network), the backbone, pixel decoder, ``MaskFormerHead``, the transformer
decoder and the list of each step's modules (``step_modules``), criterion, matcher,
post-processing, dataset registration and mappers.

May import: torch, detectron2, fvcore, numpy / scipy / PIL / cv2 / panopticapi and its own
modules. Never ``continual`` (the protocol
builds on the network, not the reverse). See docs/design.md#code-layout.

Importing this package registers the meta-architecture, head, pixel decoder, transformer
decoder and datasets with Detectron2's registries.
"""
from . import data
from . import modeling
from .config import add_maskformer2_config
from .maskformer_model import MaskFormer
