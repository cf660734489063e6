"""cache.py against the installed transformers: a saved cache round-trips bit for bit, layouts are checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cacheaug import cache as kv
from helpers import make_base, prompt_ids


def _ids(length: int = 14, seed: int = 0) -> torch.Tensor:
    return prompt_ids(1, length, seed)


def test_cache_state_round_trips_bit_identically(arch, tmp_path):
    base = make_base(arch)
    state_before = None
    with torch.no_grad():
        cache = kv.new_cache(base.config)
        base(input_ids=_ids(length=11), cache=cache, use_cache=True)  # longer than the sliding windows (6)
        state_before = [(k.clone(), v.clone()) for k, v in kv.cache_tensors(cache)]
    tensors, meta = kv.cache_state(cache)
    save_file(tensors, str(tmp_path / "cache.safetensors"))
    meta = json.loads(json.dumps(meta))  # what a JSON header gives back
    rebuilt = kv.cache_from_state(load_file(str(tmp_path / "cache.safetensors")), meta, base.config)
    assert kv.caches_equal(cache, rebuilt)
    assert [type(layer) for layer in rebuilt.layers] == [type(layer) for layer in cache.layers]
    if arch in ("gemma3", "qwen2", "mistral"):
        assert any(entry["kind"] == "sliding" and entry["cumulative_length"] == 11 for entry in meta["layers"])
    # decoding continues identically, and leaves the original cache as it was
    step = torch.tensor([[5]])
    with torch.no_grad():
        a = base(input_ids=step, cache=cache, position_ids=torch.tensor([[11]]), use_cache=True).logits
        b = base(input_ids=step, cache=rebuilt, position_ids=torch.tensor([[11]]), use_cache=True).logits
    assert torch.equal(a, b)
    for (k, v), (k0, v0) in zip(kv.cache_tensors(kv.cache_from_state(tensors, meta)), state_before):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_cache_from_state_refuses_another_layout():
    gemma = make_base("gemma3")
    with torch.no_grad():
        cache = kv.new_cache(gemma.config)
        gemma(input_ids=_ids(length=8), cache=cache, use_cache=True)
    tensors, meta = kv.cache_state(cache)
    with pytest.raises(ValueError, match="layout"):
        kv.cache_from_state(tensors, meta, make_base("llama").config)
