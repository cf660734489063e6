"""Fixtures over helpers.py: one architecture per tiny base, THE perturbed tiny model, a trained tiny checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import helpers  # noqa: E402  (after the environment is set)


@pytest.fixture(params=helpers.ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def perturbed_lm():
    """``perturbed_lm(arch, seed=1, scale=0.05, **coprocessor_config)``: the one perturbed tiny AugmentedLM."""
    return helpers.perturbed_lm


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """step-000004/ of `cacheaug train --config configs/tiny.yaml`, trained once per session."""
    return helpers.trained_checkpoint(tmp_path_factory)
