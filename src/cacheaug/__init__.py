"""cacheaug: differentiable cache augmentation for frozen language models (arXiv 2412.17747).

The public names are imported on first use (PEP 562): ``import cacheaug`` and the CLI's argument parsing stay
free of torch and transformers, which take seconds to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import CoprocessorConfig, DataArgs, RunConfig, TrainArgs, load_run_config
from .errors import CacheaugError, CheckpointError, ConfigError, DataError

# name -> module that defines it
_LAZY = {
    "AugmentedLM": "coprocessor", "Coprocessor": "coprocessor", "LossOutput": "coprocessor",
    "AugmentedCache": "state", "DecodeState": "state",
    "load_base": "models",
    "load_checkpoint": "coprocessor", "describe": "checkpoint",
    "decode": "generate", "generate_until": "generate",
    "generate_text": "stream",
}
# Not here, as their names are those of their modules: cacheaug.stream.stream and cacheaug.train.train.

if TYPE_CHECKING:  # for readers and type checkers: the real signatures
    from .checkpoint import describe
    from .coprocessor import AugmentedLM, Coprocessor, LossOutput, load_checkpoint
    from .generate import decode, generate_until
    from .models import load_base
    from .state import AugmentedCache, DecodeState
    from .stream import generate_text


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted([*_LAZY, "CacheaugError", "CheckpointError", "ConfigError", "CoprocessorConfig", "DataArgs",
                  "DataError", "RunConfig", "TrainArgs", "load_run_config"])
__version__ = "0.1.0"
