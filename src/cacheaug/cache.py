"""Every read, copy, slice and extension of a transformers kv-cache lives here (transformers 5.x API).

A cache is a ``transformers.DynamicCache`` whose ``layers[i]`` hold ``keys``/``values`` tensors of shape
(B, H_kv, T, D). Any forward pass given a cache appends to it in place, so everything that hands a cache
to a model first makes its own copy with :func:`copy_cache`. The caches built here for decoding
(:func:`new_cache`) append into preallocated room (:class:`GrowingLayer`) instead of re-concatenating every
slot at every step.
"""

from __future__ import annotations

import copy
import threading

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

__all__ = [
    "GrowingLayer",
    "new_cache",
    "full_length_cache",
    "copy_cache",
    "first_layers",
    "cache_length",
    "cache_tensors",
    "cache_from_tensors",
    "caches_equal",
    "cache_batch_size",
    "repeat_batch",
    "select_rows",
    "stack_rows",
    "keep_slots",
    "cache_state",
    "cache_from_state",
]


class GrowingLayer(DynamicLayer):
    """A full-attention layer that appends new slots into preallocated room.

    DynamicLayer re-concatenates the whole layer at every step, a copy that grows with rows x context: for 16
    rows of 1,024 slots (SmolLM2-135M, fp32, 2 threads) a step took 379 ms with it and 150 ms with this layer
    (benchmarks/decode_step.py, results/serve/decode_step.txt). Here ``keys`` / ``values`` are views
    ``[:, :, :length]`` of buffers (B, H_kv, capacity, D) with room for more, and an
    update writes into that room. Layer copies (:func:`copy_cache`) share the buffers; ``_end`` (shared as
    well) records how far a buffer is written, and only the copy whose length equals it may append in place:
    it claims the slots under ``_lock`` (an async coprocessor extends its copy in another thread). Any other
    copy, or a layer whose tensors were replaced (select_rows, stack_rows), moves to a new buffer, so no copy
    ever sees another's slots. With autograd on it appends as DynamicLayer does: any write into a buffer bumps
    the version of every view of it, and a view saved for the backward pass would then be refused.
    """

    def __init__(self, headroom: int = 64):
        super().__init__()
        self.headroom = headroom
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, H_kv, capacity, D) each
        self._end: list[int] = [0]  # slots written into the buffers, shared by the layers that share them
        self._lock = threading.Lock()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.is_grad_enabled():  # a view saved for backward shares the buffer's version counter
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, width = self.get_seq_length(), key_states.shape[-2]
        with self._lock:
            in_place = self._owns_room(length, width, key_states)
            if in_place:
                self._end[0] = length + width
        if not in_place:
            self._move(length, length + width, key_states, value_states)
        keys, values = self._buffers
        keys[:, :, length : length + width] = key_states
        values[:, :, length : length + width] = value_states
        self.keys, self.values = keys[:, :, : length + width], values[:, :, : length + width]
        return self.keys, self.values

    def _owns_room(self, length: int, width: int, key_states: torch.Tensor) -> bool:
        """Whether this layer's keys are the written prefix of its buffers, with room for ``width`` more."""
        if self._buffers is None or length == 0 or self._end[0] != length:
            return False
        keys = self._buffers[0]
        return (
            self.keys.data_ptr() == keys.data_ptr() and self.keys.stride() == keys.stride()
            and self.keys.shape[:2] == keys.shape[:2] == key_states.shape[:2]
            and self.keys.dtype == key_states.dtype and length + width <= keys.shape[2]
        )

    def _move(self, length: int, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers of ``needed`` slots and room for more, holding this layer's ``length`` slots."""
        capacity = needed + max(self.headroom, needed // 4)  # geometric: a long decode moves O(log) times
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_empty(batch, heads, capacity, dim)
        values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self._buffers, self._end, self._lock = (keys, values), [needed], threading.Lock()


def _rebind(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give ``layer`` new tensors; a GrowingLayer lets go of its buffers (it moves on its next update)."""
    layer.keys, layer.values = keys, values
    if isinstance(layer, GrowingLayer):
        layer._buffers, layer._end, layer._lock = None, [0], threading.Lock()


def new_cache(config) -> DynamicCache:
    """An empty cache laid out as the model's own (sliding-window layers keep only their window); its
    full-attention layers are GrowingLayers."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def full_length_cache() -> DynamicCache:
    """An empty cache whose layers keep every position, including those of sliding-window layers.

    Multi-point training needs the whole prefix at every layer: the window is then enforced by the
    block masks (masks.py), not by dropping old keys.
    """
    return DynamicCache()


def _check_supported(cache: Cache) -> None:
    if not isinstance(cache, DynamicCache):
        raise TypeError(
            f"cacheaug works on transformers.DynamicCache, got {type(cache).__name__}; "
            "prefill with use_cache=True and no explicit cache to get one"
        )


def copy_cache(cache: Cache) -> DynamicCache:
    """A cache that can be extended without touching ``cache``.

    DynamicLayer.update rebinds ``keys``/``values`` to ``torch.cat(...)`` results and never writes into the
    stored tensors, and GrowingLayer writes only past the longest copy's slots, so a shallow copy of each
    layer object is enough and costs no tensor memory.
    """
    _check_supported(cache)
    duplicate = copy.copy(cache)
    duplicate.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in duplicate.layers:
        if not isinstance(layer, DynamicLayer):
            raise TypeError(f"unsupported cache layer {type(layer).__name__}: only dynamic layers can be copied")
    return duplicate


def first_layers(cache: Cache, num_layers: int) -> DynamicCache:
    """A copy holding only layers ``0..num_layers-1`` (a coprocessor of the first k layers reads those)."""
    duplicate = copy_cache(cache)
    if num_layers > len(duplicate.layers):
        raise ValueError(f"cache has {len(duplicate.layers)} layers, asked for {num_layers}")
    duplicate.layers = duplicate.layers[:num_layers]
    return duplicate


def cache_length(cache: Cache) -> int:
    """Number of positions the cache has seen (for sliding layers: including evicted ones)."""
    return cache.get_seq_length()


def cache_tensors(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (B, H_kv, T_layer, D)."""
    _check_supported(cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(tensors: list[tuple[torch.Tensor, torch.Tensor]], like: Cache | None = None) -> DynamicCache:
    """Rebuild a cache from per-layer (keys, values); layer kinds and window state copied from ``like``."""
    if like is None:
        cache = DynamicCache()
        for layer_idx, (keys, values) in enumerate(tensors):
            cache.update(keys, values, layer_idx)
        return cache
    cache = copy_cache(like)
    if len(cache.layers) != len(tensors):
        raise ValueError(f"{len(tensors)} layers of tensors for a cache of {len(cache.layers)} layers")
    for layer, (keys, values) in zip(cache.layers, tensors):
        _rebind(layer, keys, values)
    return cache


def caches_equal(a: Cache, b: Cache) -> bool:
    """Same layers, same lengths, bit-identical tensors."""
    if len(a.layers) != len(b.layers) or cache_length(a) != cache_length(b):
        return False
    for layer_a, layer_b in zip(a.layers, b.layers):
        if _layer_kind(layer_a) != _layer_kind(layer_b):
            return False
        if isinstance(layer_a, DynamicSlidingWindowLayer) and layer_a.cumulative_length != layer_b.cumulative_length:
            return False
        if not (torch.equal(layer_a.keys, layer_b.keys) and torch.equal(layer_a.values, layer_b.values)):
            return False
    return True


def cache_batch_size(cache: Cache) -> int:
    """B of the (B, H_kv, T, D) tensors of the first initialised layer."""
    _check_supported(cache)
    for layer in cache.layers:
        if layer.is_initialized and layer.keys is not None:
            return layer.keys.shape[0]
    raise ValueError("the cache is empty: no layer holds keys yet")


def _map_rows(cache: Cache, rows) -> DynamicCache:
    """A copy whose layers hold ``rows(keys)`` / ``rows(values)``; sliding layers are refused (their windows
    would need the same treatment as a padded batch's masks, which cacheaug does not do)."""
    duplicate = copy_cache(cache)
    for layer in duplicate.layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            raise TypeError("cannot regroup the rows of a cache with sliding-window layers")
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            _rebind(layer, rows(layer.keys), rows(layer.values))
    return duplicate


def repeat_batch(cache: Cache, batch: int) -> DynamicCache:
    """A copy of a one-row cache with ``batch`` identical rows: (1, H, T, D) -> (batch, H, T, D) per layer.

    The rows are expanded views (no memory); the next update's ``torch.cat`` materialises them.
    """
    if cache_batch_size(cache) != 1:
        raise ValueError(f"repeat_batch needs a one-row cache, got {cache_batch_size(cache)} rows")
    return _map_rows(cache, lambda tensor: tensor.expand(batch, -1, -1, -1))


def select_rows(cache: Cache, rows: torch.Tensor) -> DynamicCache:
    """A copy holding only the batch rows ``rows`` (1D index tensor), in that order."""
    return _map_rows(cache, lambda tensor: tensor.index_select(0, rows.to(tensor.device)))


def stack_rows(caches: list[Cache]) -> DynamicCache:
    """One cache holding the rows of every cache in ``caches``, in order, aligned on their last slot: a
    shorter cache gets zero slots on the left, which the caller's slot mask must hide. (B_i, H, T_i, D) per
    layer -> (sum B_i, H, max T_i, D). Sliding layers are refused (padding would count toward their window)."""
    lengths = [cache_length(cache) for cache in caches]
    width = max(lengths)
    stacked = copy_cache(caches[0])
    for index, layer in enumerate(stacked.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            raise TypeError("cannot stack the rows of caches with sliding-window layers")
        keys, values = [], []
        for cache, length in zip(caches, lengths):
            source = cache.layers[index]
            if source.keys.shape[-2] != length:
                raise ValueError(f"layer {index} holds {source.keys.shape[-2]} slots, the cache {length}")
            pad = (0, 0, width - length, 0)  # (D: none, T: on the left)
            keys.append(torch.nn.functional.pad(source.keys, pad))
            values.append(torch.nn.functional.pad(source.values, pad))
        _rebind(layer, torch.cat(keys, dim=0), torch.cat(values, dim=0))
    return stacked


def keep_slots(cache: Cache, slots: torch.Tensor) -> DynamicCache:
    """A copy holding only the slots ``slots`` (1D ascending index) of every row: (B, H, T, D) -> (B, H, len, D)."""
    return _map_rows(cache, lambda tensor: tensor.index_select(2, slots.to(tensor.device)))


def _layer_kind(layer) -> str:
    if isinstance(layer, DynamicSlidingWindowLayer):
        return "sliding"
    if type(layer) in (DynamicLayer, GrowingLayer):
        return "full"
    raise TypeError(f"unsupported cache layer {type(layer).__name__}: only dynamic layers can be saved")


def cache_state(cache: Cache) -> tuple[dict[str, torch.Tensor], dict]:
    """Plain tensors and a JSON-able layout of ``cache``, from which :func:`cache_from_state` rebuilds it.

    tensors: ``layers.{i}.keys`` / ``layers.{i}.values``, each (B, H_kv, T_i, D), contiguous copies that share
    no memory (safetensors refuses shared storage; a sliding layer's keys are a view of a longer tensor).
    meta: ``{"length": n, "layers": [{"kind": "full"|"sliding", "initialized": bool, "sliding_window": w,
    "cumulative_length": n, "record_past": bool}, ...]}``; the window fields only for sliding layers, whose
    ``cumulative_length`` counts evicted positions too (it drives their masks and position bookkeeping).
    """
    _check_supported(cache)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for index, layer in enumerate(cache.layers):
        entry = {"kind": _layer_kind(layer), "initialized": bool(layer.is_initialized)}
        if entry["kind"] == "sliding":
            entry.update(
                sliding_window=int(layer.sliding_window),
                cumulative_length=int(layer.cumulative_length),
                record_past=bool(layer.record_past),
            )
        if layer.is_initialized:
            tensors[f"layers.{index}.keys"] = layer.keys.detach().contiguous().clone()
            tensors[f"layers.{index}.values"] = layer.values.detach().contiguous().clone()
        layers.append(entry)
    return tensors, {"length": cache_length(cache), "layers": layers}


def cache_from_state(tensors: dict[str, torch.Tensor], meta: dict, config=None) -> DynamicCache:
    """The cache that :func:`cache_state` described; with ``config``, its layer layout must match the model's.

    Raises ValueError when tensors are missing or the layout disagrees with ``config`` (a cache saved for
    another model must never be decoded from).
    """
    layers = []
    for index, entry in enumerate(meta["layers"]):
        if entry["kind"] == "sliding":
            layer = DynamicSlidingWindowLayer(sliding_window=int(entry["sliding_window"]))
        elif entry["kind"] == "full":
            layer = GrowingLayer()
        else:
            raise ValueError(f"layer {index}: unknown cache layer kind {entry['kind']!r}")
        if entry["initialized"]:
            names = (f"layers.{index}.keys", f"layers.{index}.values")
            if any(name not in tensors for name in names):
                raise ValueError(f"layer {index}: keys or values missing from the saved tensors")
            keys, values = (tensors[name] for name in names)  # (B, H_kv, T_i, D)
            if keys.shape != values.shape:
                raise ValueError(f"layer {index}: keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
            layer.lazy_initialization(keys, values)  # sets device, dtype and the initialised flag
            layer.keys, layer.values = keys, values
            if entry["kind"] == "sliding":
                layer.cumulative_length = int(entry["cumulative_length"])
                layer.record_past = bool(entry.get("record_past", False))
        layers.append(layer)
    if config is None:
        cache = DynamicCache()
    else:
        cache = new_cache(config)
        expected = [(_layer_kind(layer), getattr(layer, "sliding_window", None)) for layer in cache.layers]
        found = [(entry["kind"], entry.get("sliding_window")) for entry in meta["layers"]]
        if expected != found:
            raise ValueError(f"saved cache layout {found} does not match the model's {expected}")
    cache.layers = layers
    if cache_length(cache) != meta.get("length", cache_length(cache)):
        raise ValueError(f"rebuilt cache has length {cache_length(cache)}, the saved state says {meta['length']}")
    return cache
