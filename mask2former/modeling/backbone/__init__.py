"""Backbones beyond Detectron2's ResNets: the Swin Transformer (``D2SwinTransformer``).

May import: torch, detectron2 (and nothing else of this project)."""
from .swin import D2SwinTransformer
