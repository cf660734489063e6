"""argparse flags derived from a config dataclass: one flag per field, its comment as the help, its default shown,
nested dataclasses as ``--section.key``; and the parser whose errors are one line (cli.py turns them into exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path

from .config import INTERNAL_FIELDS
from .errors import ConfigError

SHORTCUTS = {"train.resume": "--resume", "train.overwrite": "--overwrite"}  # train's flags of old
class UsageError(ConfigError):
    """A command line argparse refuses (unknown option, bad value, missing argument)."""


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line raised to main (not usage text and exit); no abbreviated options."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message)


@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> tuple[str, ...]:
    return tuple(Path(path).read_text().splitlines())


def _class_body(klass: type) -> list[str]:
    """The lines of a class statement (inspect.getsource, minus its parse of the whole module: fast)."""
    try:
        lines = _source_lines(inspect.getsourcefile(klass))
    except (OSError, TypeError):
        return []
    start = next((i for i, line in enumerate(lines) if re.match(rf"class {klass.__name__}\b", line)), None)
    if start is None:
        return []
    body = []
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            break
        body.append(line)
    return body


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source (the lines above it and its end-of-line comment)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        pending: list[str] = []
        for line in _class_body(klass):
            stripped = line.strip()
            if stripped.startswith("#"):
                pending.append(stripped[1:].strip())
                continue
            match = re.match(r"    (\w+)\s*:", line)
            if match:
                inline = line.partition("  # ")[2].strip()
                text = " ".join(pending + ([inline] if inline else []))
                if text:
                    comments[match.group(1)] = text
            pending = []
    return comments


def _plain_type(hint) -> tuple[type, bool]:
    """(the type, whether None is allowed) of a field annotation such as ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return members[0], len(members) < len(typing.get_args(hint))
    return hint, False


def _converter(kind: type, optional: bool) -> Callable[[str], object]:
    def convert(raw: str):
        if optional and raw.strip().lower() in ("null", "~"):  # as YAML spells None
            return None
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
        if kind in (int, float):
            try:
                return kind(raw)
            except ValueError:
                word = "an integer" if kind is int else "a number"
                raise argparse.ArgumentTypeError(f"expected {word}, got {raw!r}") from None
        return raw

    return convert


def _help(comment: str, default, required: bool) -> str:
    text = comment or ""
    if required:
        text += " (required)"
    elif isinstance(default, bool):
        text += f" (default: {'on' if default else 'off'})"
    elif default not in (None, dataclasses.MISSING, [], ""):
        text += f" (default: {default!r})" if isinstance(default, str) and default.strip() != default else f" (default: {default})"
    return text.strip().replace("%", "%%")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One flag per field of ``cls``: ``--name`` (kebab case) at the top, ``--section.name`` in sections."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    group = parser if not prefix else parser.add_argument_group(f"{prefix[:-1]} section (--{prefix}KEY VALUE)")
    for f in dataclasses.fields(cls):
        if f.name in INTERNAL_FIELDS:
            continue
        kind, optional = _plain_type(hints[f.name])
        dest = prefix + f.name
        if dataclasses.is_dataclass(kind):
            add_dataclass_arguments(parser, kind, prefix=f"{dest}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = _help(comments.get(f.name, ""), default, f.metadata.get("required", False))
        if f.metadata.get("positional"):
            many = typing.get_origin(kind) is list
            group.add_argument(dest, nargs="*" if many else "?", default=argparse.SUPPRESS, help=help_text,
                               metavar=f.name.upper())
            continue
        kebab = f.name.replace("_", "-")
        names = [f"--{dest}"] if prefix else [f"--{kebab}"]
        hidden = [f"--{dest}"] if not prefix and "_" in f.name else []  # the YAML spelling works too
        names += [SHORTCUTS[dest]] if dest in SHORTCUTS else []
        common = dict(dest=dest, default=argparse.SUPPRESS)
        if kind is bool:  # --flag, --flag VALUE (true/false), --no-flag
            positive = dict(nargs="?", const=True, type=_converter(bool, False), metavar="BOOL", **common)
            group.add_argument(*names, help=help_text if default is not True else argparse.SUPPRESS, **positive)
            negative = f"--{prefix}no_{f.name}" if prefix else f"--no-{kebab}"
            group.add_argument(negative, action="store_const", const=False,
                               help=help_text if default is True else argparse.SUPPRESS, **common)
            if hidden:
                group.add_argument(*hidden, help=argparse.SUPPRESS, **positive)
            continue
        value = dict(type=_converter(kind, optional), metavar=f.name.upper(), **common)
        group.add_argument(*names, help=help_text, **value)
        if hidden:
            group.add_argument(*hidden, help=argparse.SUPPRESS, **value)


