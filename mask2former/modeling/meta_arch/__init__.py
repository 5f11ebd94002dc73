"""``MaskFormerHead``: pixel decoder then transformer decoder, the one route of training and
inference through the head.

May import: torch, detectron2, the other ``mask2former.modeling`` packages."""
