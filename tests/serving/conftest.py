"""The model the serving tests (server, load test, fuzz) serve, one per test module."""

from __future__ import annotations

import pytest

import helpers


@pytest.fixture(scope="module")
def model():
    """(the perturbed tiny AugmentedLM, its byte tokenizer): helpers.served_model()."""
    return helpers.served_model()
