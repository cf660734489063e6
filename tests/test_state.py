"""The decode state and its base steps: a caller's cache is never mutated, augmenting from a cache equals
augmenting from the ids, and input errors are refused by name."""

from __future__ import annotations

import pytest
import torch

from cacheaug import cache as kv
from helpers import PAPER, perturbed_lm, prompt_ids


def _lm(arch: str, **config):
    return perturbed_lm(arch, seed=2, **{**PAPER, "num_latents": 4, **config})


def _prompt(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return prompt_ids(batch, length, seed)


def test_callers_cache_is_not_mutated(arch):
    lm = _lm(arch)
    prompt = _prompt(length=9)
    state = lm.prefill(prompt)
    snapshot = [(k.clone(), v.clone()) for k, v in kv.cache_tensors(state.cache)]
    before = kv.copy_cache(state.cache)
    with torch.no_grad():
        augmented = lm.augment(cache=state.cache)
        extended = lm.augment(_prompt(length=3, seed=5), cache=state.cache)
    assert kv.caches_equal(state.cache, before)
    for (k, v), (k0, v0) in zip(kv.cache_tensors(state.cache), snapshot):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert kv.cache_length(augmented.cache) == 9 + lm.config.num_latents == augmented.next_position
    assert kv.cache_length(extended.cache) == 12 + lm.config.num_latents


def test_augment_from_cache_equals_augment_from_ids(arch):
    lm = _lm(arch)
    prompt = _prompt()
    with torch.no_grad():
        direct = lm.augment(prompt)
        via_cache = lm.augment(cache=lm.prefill(prompt).cache)
        in_two_parts = lm.augment(prompt[:, 6:], cache=lm.prefill(prompt[:, :6]).cache)
    torch.testing.assert_close(direct.logits, via_cache.logits, rtol=0, atol=0)
    torch.testing.assert_close(direct.logits, in_two_parts.logits, rtol=1e-5, atol=1e-5)


def test_augmentation_changes_the_prediction():
    lm = _lm("llama")
    prompt = _prompt()
    with torch.no_grad():
        assert not torch.allclose(lm.augment(prompt).logits, lm.prefill(prompt).logits)


def test_augment_input_errors():
    lm = _lm("llama")
    with pytest.raises(ValueError, match="needs input_ids"):
        lm.augment()
    with pytest.raises(ValueError, match="input_ids must be"):
        lm.augment(torch.zeros(3, dtype=torch.long))
