"""Data: dataset registrations (:mod:`.datasets`) and training mappers (:mod:`.dataset_mappers`)."""
from . import datasets
from . import dataset_mappers
