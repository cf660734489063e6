"""One family of errors: everything a user can get wrong raises a CacheaugError, which the CLI prints as one line.

Each is a ValueError, so code written against the ValueErrors of earlier versions keeps working.
"""

from __future__ import annotations

import importlib.util


class CacheaugError(ValueError):
    """A problem the user can fix; the message names it in one line (the CLI exits 2 with it, no traceback)."""


class ConfigError(CacheaugError):
    """A configuration value or a command-line option is invalid; the message names the field and the value."""


class DataError(CacheaugError):
    """The data cannot give batches or evaluation items; the message names the problem and the source."""


class CheckpointError(CacheaugError):
    """A checkpoint folder is missing, damaged, or made for another base model."""


class RunFolderError(CacheaugError):
    """The output folder holds another run and neither resume nor overwrite was asked for."""


class BankEntryError(CacheaugError):
    """A bank entry that must not be used: unreadable, damaged, edited, or made for another model."""


class ModelError(CacheaugError):
    """A base model name or dtype that cacheaug cannot load."""


class InputError(CacheaugError):
    """Input the model cannot take: an empty prompt, a prompt longer than the context, a bad shape."""


class MissingExtraError(CacheaugError):
    """An optional dependency is not installed; the message gives the pip command that installs it."""


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise MissingExtraError naming ``pip install -e '.[extra]'`` unless the top-level ``module`` is importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{what} needs the {extra!r} extra ({module} is not installed): pip install -e '.[{extra}]'")
