"""Mask2Former with the ECLIPSE continual-learning additions, as a Detectron2 extension.

Importing this package registers the meta-architecture, head, pixel decoder and transformer
decoder with Detectron2's registries.
"""
from . import data
from . import modeling
from .config import add_maskformer2_config
from .maskformer_model import MaskFormer
