"""cacheaug: differentiable cache augmentation for frozen language models (arXiv 2412.17747)."""

from .config import ConfigError, CoprocessorConfig
from .coprocessor import AugmentedCache, AugmentedLM, Coprocessor, LossOutput


def load_base(*args, **kwargs):
    """Load a frozen base model and its tokenizer; see cacheaug.models.load_base."""
    from .models import load_base as _load_base

    return _load_base(*args, **kwargs)


__all__ = [
    "AugmentedCache",
    "AugmentedLM",
    "ConfigError",
    "Coprocessor",
    "CoprocessorConfig",
    "LossOutput",
    "load_base",
]
__version__ = "0.1.0"
