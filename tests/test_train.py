"""The training loop: exact resume after SIGINT or a hard kill, data-parallel equivalence (2 gloo processes),
the optimiser groups of interface_lr."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import perturbed_lm

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cacheaug.cli", "train", "--config", TINY, "--train.output_dir", str(out), *extra]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"step-{step:06d}" / "coprocessor.safetensors"))


def _run(command: list[str]) -> None:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


STEPS = ["--train.max_steps", "120", "--train.eval_every", "0", "--train.save_every", "20", "--train.keep_last", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_command(out, *STEPS))
    return _weights(out, 120)


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_run_resumes_bit_identically(tmp_path, uninterrupted, how):
    out = tmp_path / "run"
    process = subprocess.Popen(_command(out, *STEPS), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if how == "sigint":
        _wait_for(lambda: _metric_lines(out) >= 7, process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    else:
        _wait_for(lambda: (out / "step-000040").is_dir(), process)
        process.kill()
        process.wait(timeout=60)
    saved = sorted(p.name for p in out.glob("step-*"))
    assert saved and saved[-1] != "step-000120", "the interruption came too late to test anything"
    _run(_command(out, *STEPS, "--resume"))
    resumed = _weights(out, 120)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    steps_logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps_logged) == 120  # no step logged twice after the resume


def test_two_processes_equal_one_process(tmp_path):
    common = ["--train.max_steps", "4", "--train.eval_every", "0", "--train.save_every", "0"]
    single = tmp_path / "single"
    _run(_command(single, *common, "--train.batch_size", "2"))
    accumulated = tmp_path / "accumulated"
    _run(_command(accumulated, *common, "--train.batch_size", "1", "--train.grad_accum", "2"))
    parallel = tmp_path / "parallel"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    _run(torchrun + _command(parallel, *common, "--train.batch_size", "1")[1:])
    reference = _weights(single, 4)
    before = load_file(str(single / "step-000004" / "coprocessor.safetensors"))
    for other in (_weights(accumulated, 4), _weights(parallel, 4)):
        for name, tensor in reference.items():
            torch.testing.assert_close(other[name], tensor, rtol=0, atol=1e-6)
    assert before.keys() == reference.keys()


def test_fsdp_equals_one_process_and_resumes_exactly(tmp_path):
    common = ["--train.max_steps", "4", "--train.eval_every", "0", "--train.save_every", "2", "--train.keep_last", "2"]
    single = tmp_path / "single"
    _run(_command(single, *common, "--train.batch_size", "2"))
    sharded = tmp_path / "fsdp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    fsdp = _command(sharded, *common, "--train.batch_size", "1", "--train.strategy", "fsdp")[1:]
    _run(torchrun + fsdp)
    reference, straight = _weights(single, 4), _weights(sharded, 4)
    for name, tensor in reference.items():
        torch.testing.assert_close(straight[name], tensor, rtol=0, atol=1e-6)
    # lose the last checkpoint, as a hard kill after step 2 would, and resume from step 2 under FSDP
    shutil.rmtree(sharded / "step-000004")
    _run(torchrun + fsdp + ["--resume"])
    resumed = _weights(sharded, 4)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_interface_lr_gets_its_own_optimiser_group():
    from cacheaug.config import TrainArgs
    from cacheaug.train import parameter_groups

    lm = perturbed_lm("llama", scale=0, num_latents=3, readout="token", latent_gate=True)
    one, two = parameter_groups(lm, TrainArgs()), parameter_groups(lm, TrainArgs(interface_lr=1e-2))
    assert len(one) == 1 and len(one[0]["params"]) == len(lm.trainable_parameters())
    assert len(two) == 2 and two[1]["lr"] == 1e-2
    assert {id(p) for p in two[1]["params"]} == {id(p) for p in lm.interface_parameters()}
    assert sum(len(g["params"]) for g in two) == len(lm.trainable_parameters())
