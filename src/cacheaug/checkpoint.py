"""Coprocessor checkpoints: PEFT-style folders of the trainable part, written atomically; one reader of what a
folder holds (:func:`describe`), the weight and identity checks the loader uses, and save/resume for the loop.
The loader itself, ``coprocessor.load_checkpoint``, sits with the model it builds (this module stays below it).

Describing a checkpoint needs no torch: the CLI checks a folder before loading any model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import INTERNAL_FIELDS, CoprocessorConfig, RunConfig
from .identity import base_identity_from_config, identity_mismatches
from .errors import CheckpointError, ConfigError, require_extra

WEIGHTS_NAME = "coprocessor.safetensors"
CONFIG_NAME = "cacheaug_config.json"
FORMAT_VERSION = 1


def atomic_directory(target: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``target``: a crash never leaves half a folder.

    An existing ``target`` is replaced only after the new folder is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_adapter(tmp: Path, weights: dict, config: CoprocessorConfig, extra: dict | None = None) -> None:
    """``coprocessor.safetensors`` (the trainable tensors by name) and ``cacheaug_config.json`` into ``tmp``."""
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous().cpu() for name, t in weights.items()}
    description = {
        "format_version": FORMAT_VERSION,
        "coprocessor": config.to_dict(),
        "trainable_parameters": int(sum(t.numel() for t in state.values())),
        **(extra or {}),
    }
    save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "library": "cacheaug"})
    (tmp / CONFIG_NAME).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def save_adapter(lm, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``coprocessor.safetensors`` (trainable tensors only) and ``cacheaug_config.json``, atomically."""
    return atomic_directory(directory, lambda tmp: _write_adapter(tmp, lm.trainable_state_dict(), lm.config, extra))


@dataclass
class CheckpointInfo:
    """What a checkpoint folder says about itself (its ``cacheaug_config.json``)."""

    path: Path
    config: CoprocessorConfig  # resolved, with the base model's identity
    trainable_parameters: int
    step: int | None  # None: saved by save_pretrained, not by a training run
    run_config: RunConfig | None  # the training run that wrote it, when it still parses
    description: dict  # the whole JSON

    @property
    def base_model(self) -> str | None:
        return self.config.base_model


def describe(directory: str | os.PathLike) -> CheckpointInfo:
    """Read a checkpoint folder's description; a missing or damaged one is a CheckpointError naming the file."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"is not a cacheaug checkpoint: {CONFIG_NAME} is missing"
        raise CheckpointError(f"{directory} {what}")
    try:
        description = json.loads(path.read_text())
        config = CoprocessorConfig.from_dict(description["coprocessor"])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{path} does not describe a coprocessor ({type(error).__name__}: {error})") from None
    return CheckpointInfo(directory, config, int(description.get("trainable_parameters", 0)), description.get("step"),
                          _run_config(description.get("run_config")), description)


def _run_config(stored: dict | None) -> RunConfig | None:
    if not isinstance(stored, dict):
        return None
    stored = dict(stored)
    stored["coprocessor"] = {k: v for k, v in stored.get("coprocessor", {}).items() if k not in INTERNAL_FIELDS}
    try:
        return RunConfig.from_dict(stored)
    except ConfigError:
        return None


def read_config(directory: str | os.PathLike) -> CoprocessorConfig:
    return describe(directory).config


def run_config_from_checkpoint(directory: str | os.PathLike) -> RunConfig | None:
    """The run config stored with a training checkpoint, when there is one."""
    return describe(directory).run_config if (Path(directory) / CONFIG_NAME).is_file() else None


def check_base_identity(config: CoprocessorConfig, base, directory) -> None:
    """Refuse a checkpoint whose recorded base dimensions differ from ``base``, saying what differs."""
    current = base_identity_from_config(base.config, getattr(base, "name_or_path", None) or None)
    mismatches = identity_mismatches(config.base_identity, current)
    if mismatches:
        raise CheckpointError(
            f"checkpoint {directory} was made for base {config.base_identity.get('name')!r}, "
            f"not {current['name']!r}: " + "; ".join(mismatches)
        )


def load_trainable_weights(lm, path: Path) -> None:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged or truncated ({error})") from None
    expected = lm.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this coprocessor: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, parameter in expected.items():
            if state[name].shape != parameter.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(parameter.shape)}"
                )
            parameter.copy_(state[name])


TRAINER_STATE_NAME = "trainer_state.pt"
STEP_PREFIX = "step-"


def step_directory(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{STEP_PREFIX}{step:06d}"


def save_step(
    weights: dict, config: CoprocessorConfig, output_dir, step: int, trainer_state: dict, run_config: dict, keep_last: int
) -> Path:
    """``output_dir/step-NNNNNN/`` = adapter files + trainer_state.pt, written atomically; keep the last K.

    ``weights`` are the trainable tensors by name (whole tensors, gathered if they were sharded)."""
    import torch

    def write(tmp: Path) -> None:
        _write_adapter(tmp, weights, config, {"step": step, "run_config": run_config})
        # optimizer moments, scheduler, data position and RNG states: tensors and plain values only
        torch.save(trainer_state, tmp / TRAINER_STATE_NAME)

    target = atomic_directory(step_directory(output_dir, step), write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


save_training_checkpoint = save_step  # its name in earlier versions


def _step_number(folder: Path) -> int | None:
    digits = folder.name[len(STEP_PREFIX):]
    return int(digits) if folder.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete step folders, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and _step_number(p) is not None]
    return sorted((p for p in folders if (p / TRAINER_STATE_NAME).is_file()), key=_step_number)


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    import torch

    path = Path(checkpoint_dir) / TRAINER_STATE_NAME
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: cannot resume from {checkpoint_dir}") from None
    except Exception as error:  # torch raises many types for a damaged pickle archive
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error})") from None


def resume(lm, checkpoint_dir: str | os.PathLike) -> dict:
    """Put a step folder's weights into ``lm`` (whole tensors: before any sharding) and return its trainer state
    (optimizer, scheduler, data position, RNG), after checking it was made for ``lm``'s base."""
    check_base_identity(read_config(checkpoint_dir), lm.base, checkpoint_dir)
    state = load_trainer_state(checkpoint_dir)
    load_trainable_weights(lm, Path(checkpoint_dir) / WEIGHTS_NAME)
    return state
