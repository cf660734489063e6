"""Every file a run writes goes through here: JSON results that record their provenance, and JSONL logs.

The command that produced a result is passed in by the caller (the CLI passes its own command line); nothing
is kept in a global.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*arguments: str) -> str | None:
    try:
        done = subprocess.run(["git", *arguments], capture_output=True, text=True, timeout=10, cwd=PACKAGE_DIR)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(command: str | None = None) -> dict:
    """What produced a result file: ``command`` (default: this process's command line), the git commit of this
    source tree and whether the package's source had uncommitted changes, the machine and library versions."""
    import torch
    import transformers

    # dirty: uncommitted changes to the package's own source (results written meanwhile do not count)
    commit, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {
        "command": command or shlex.join(sys.argv),
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "machine": {
            "node": platform.node(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # two VMs of one kind can round differently (another CPU, another SIMD kernel): 500 training steps then
            # end in measurably different models (results/recipe-smollm2/README.md), so both are recorded
            "cpu_model": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }


def write_json(path: str | os.PathLike, data: dict, command: str | None = None) -> Path:
    """``data`` plus its ``provenance`` as indented JSON at ``path`` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "provenance": provenance(command)}, indent=2) + "\n")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """A text file (a Markdown table), ending with one newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")
    return path


class JsonlWriter:
    """One JSON object per line, each written (and flushed) as it comes.

    A new writer empties the file, except ``keep_through_step=N`` (a resumed run): lines of steps up to N stay,
    later ones are dropped, so no step is logged twice. ``enabled=False`` (other ranks) writes nothing.
    """

    def __init__(self, path: str | os.PathLike, keep_through_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_through_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= keep_through_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def __call__(self, record: dict) -> None:  # usable as an on_record callback
        self.write(record)
