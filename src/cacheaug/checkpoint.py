"""Saving and loading coprocessor checkpoints: PEFT-style folders of the trainable part, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CoprocessorConfig, base_identity_from_config, identity_mismatches
from .errors import CheckpointError

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


def read_config(directory: str | os.PathLike) -> CoprocessorConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a cacheaug checkpoint: {CONFIG_NAME} is missing")
    try:
        description = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    return CoprocessorConfig.from_dict(description["coprocessor"])


def load_adapter(directory: str | os.PathLike, base=None):
    """Rebuild an AugmentedLM from a checkpoint folder, on ``base`` or on the base model it names."""
    from .coprocessor import AugmentedLM

    config = read_config(directory)
    if base is None:
        from .models import load_base

        base, _ = load_base(config.base_model)
    check_base_identity(config, base, directory)
    lm = AugmentedLM(base, config)
    load_trainable_weights(lm, Path(directory) / WEIGHTS_NAME)
    return lm


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


def save_training_checkpoint(
    weights: dict, config: CoprocessorConfig, output_dir, step: int, trainer_state: dict, run_config: dict, keep_last: int
) -> Path:
    """``output_dir/step-NNNNNN/`` = adapter files + trainer_state.pt, written atomically; keep the last K.

    ``weights`` are the trainable tensors by name (whole tensors, gathered if they were sharded)."""

    def write(tmp: Path) -> None:
        _write_adapter(tmp, weights, config, {"step": step, "run_config": run_config})
        # optimizer moments, scheduler, data position and RNG states: tensors and plain values only
        torch.save(trainer_state, tmp / TRAINER_STATE_NAME)

    target = atomic_directory(step_directory(output_dir, step), write)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete step folders, oldest first (temporary folders of an interrupted write are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted((p for p in folders if (p / TRAINER_STATE_NAME).is_file()), key=lambda p: int(p.name[5:]))


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    path = Path(checkpoint_dir) / TRAINER_STATE_NAME
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: cannot resume from {checkpoint_dir}") from None
    except Exception as error:  # torch raises many types for a damaged pickle archive
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error})") from None
