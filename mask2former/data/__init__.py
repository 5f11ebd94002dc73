"""Data: dataset registrations (:mod:`.datasets`) and training mappers (:mod:`.dataset_mappers`).

May import: torch, detectron2, panopticapi / pycocotools, its own modules; never ``continual``."""
from . import datasets
from . import dataset_mappers
