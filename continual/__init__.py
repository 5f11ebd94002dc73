"""The continual-learning protocol of ECLIPSE: config, scenarios, step transitions, training."""
from .config import add_continual_config
