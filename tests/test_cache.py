"""cache.py against the installed transformers: a saved cache round-trips bit for bit, layouts are checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

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


# ---------------------------------------------------------------------------- GrowingLayer
def _appended(layer, steps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    for chunk in steps:
        keys, values = layer.update(chunk, -chunk)
    return keys, values


def _chunks(widths, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, width, 4, generator=generator) for width in widths]


@torch.no_grad()  # decoding: with autograd on, a GrowingLayer concatenates (tested below)
def test_growing_layer_appends_what_dynamic_layer_concatenates():
    from transformers.cache_utils import DynamicLayer

    # prefill-sized and one-token updates, past the first buffer's room (headroom 4) several times
    steps = _chunks([7, 1, 1, 3, 1, 1, 1, 1, 1, 1, 9, 1])
    growing, plain = kv.GrowingLayer(headroom=4), DynamicLayer()
    for chunk in steps:
        got, want = growing.update(chunk, -chunk), plain.update(chunk, -chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert growing.get_seq_length() == plain.get_seq_length() == 28
    assert growing._buffers[0].shape[2] > 28  # room left: the next one-token update writes in place
    buffer = growing._buffers[0]
    growing.update(*_chunks([1])[0:1] * 2)
    assert growing._buffers[0] is buffer


@torch.no_grad()
def test_growing_layer_copies_never_see_each_others_slots():
    prefix, a_step, b_step = _chunks([5, 1, 1])
    original = kv.GrowingLayer(headroom=8)
    original.update(prefix, -prefix)
    cache = DynamicCache()
    cache.layers = [original]
    a, b = kv.copy_cache(cache).layers[0], kv.copy_cache(cache).layers[0]
    a_keys, _ = a.update(a_step, -a_step)  # a claims slot 5 of the shared buffer, in place
    assert a._buffers[0] is original._buffers[0]
    b_keys, _ = b.update(b_step, -b_step)  # slot 5 is taken: b moves to its own buffer
    assert b._buffers[0] is not original._buffers[0]
    torch.testing.assert_close(a_keys, torch.cat([prefix, a_step], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(b_keys, torch.cat([prefix, b_step], dim=2), rtol=0, atol=0)
    assert torch.equal(original.keys, prefix) and original.get_seq_length() == 5
    # the original itself must move too now: its length (5) is not where the buffer is written (6)
    o_keys, _ = original.update(b_step, -b_step)
    assert torch.equal(o_keys, torch.cat([prefix, b_step], dim=2)) and torch.equal(a.keys[:, :, 5:], a_step)


def test_growing_layer_moves_after_rows_change_and_under_autograd():
    prefix, step = _chunks([4, 1])
    layer = kv.GrowingLayer(headroom=8)
    with torch.no_grad():
        layer.update(prefix, -prefix)
        cache = DynamicCache()
        cache.layers = [layer]
        one_row = kv.select_rows(cache, torch.tensor([1])).layers[0]
        assert one_row._buffers is None  # it let go of the two-row buffers
        keys, _ = one_row.update(step[1:], -step[1:])
    assert torch.equal(keys, torch.cat([prefix[1:], step[1:]], dim=2))
    assert torch.equal(layer.keys, prefix)
    # with autograd recording, appends are concatenations: the backward pass still works
    grad_layer = kv.GrowingLayer()
    leaf = prefix.clone().requires_grad_(True)
    keys, values = grad_layer.update(prefix, prefix)  # a frozen prefix, then steps that depend on the leaf
    saved = (keys * leaf).sum()
    keys, values = grad_layer.update(step * leaf[:, :, :1], step)
    (saved + keys.sum() + values.sum()).backward()
    torch.testing.assert_close(leaf.grad[:, :, 1:], prefix[:, :, 1:])


def test_new_cache_grows_in_place_and_decodes_as_a_plain_cache(arch):
    base = make_base(arch)
    ids = _ids(length=9)
    growing, plain = kv.new_cache(base.config), DynamicCache(config=base.config)
    from transformers.cache_utils import DynamicLayer

    # every full-attention layer grows; sliding-window layers stay as the model builds them
    assert [isinstance(layer, kv.GrowingLayer) for layer in growing.layers] == [
        type(layer) is DynamicLayer for layer in plain.layers
    ]
    with torch.no_grad():
        for cache in (growing, plain):
            base(input_ids=ids, cache=cache, use_cache=True)
        for position in range(9, 14):
            step = torch.tensor([[position % 7 + 2]])
            a = base(input_ids=step, cache=growing, position_ids=torch.tensor([[position]]), use_cache=True).logits
            b = base(input_ids=step, cache=plain, position_ids=torch.tensor([[position]]), use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert kv.caches_equal(growing, plain)
