"""A cache bank: long contexts augmented once, offline, stored on disk and reused by any number of queries
(``stream.Generation(context=bank.get_or_build(ids))``; `cacheaug serve` decodes each prompt from its longest
banked prefix, ``CacheBank.longest_prefix``, and feeds only the rest).

An entry is one safetensors file ``<root>/<key[:2]>/<key>.safetensors``. ``key`` = sha256 of the model's
fingerprint (base identity, dtype, attention kernel, coprocessor config and weights hash, transformers
version, bank format) and the context's token ids, so a different model or checkpoint never finds another's
entry. Tensors: the augmented cache's per-layer keys/values (cache.cache_state), ``logits`` (B, V),
``latents`` (B, N_L, H) and ``input_ids`` (B, T). The metadata field ``cacheaug_bank`` holds a JSON header:
the fingerprint, the cache layout (layer kinds, sliding-window ``cumulative_length``), ``next_position``,
sha256 of the token ids, of the tensor bytes, and of the header itself. Every load checks all of them; a
damaged, truncated, edited or foreign entry is rejected and rebuilt, never decoded from.

``longest_prefix`` reads a prefix index: entry length -> sha256 of the token ids (``token_ids_sha256``), for
this model's entries only, scanned from ``root`` once (headers and ``input_ids`` only) and kept up to date by
``build``; ``refresh_index`` rescans for entries other processes wrote. A prompt is hashed once, one running
digest giving every candidate length's hash, so matching costs O(T + number of lengths), not a load per entry.
A bank is safe to share between threads (a server's requests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import cache as kv
from .. import state as steps
from ..errors import BankEntryError, InputError
from ..identity import base_identity_from_config
from ..state import DecodeState, copy_state

__all__ = ["BANK_FORMAT_VERSION", "BankEntry", "BankEntryError", "CacheBank", "model_fingerprint", "tensors_sha256"]

BANK_FORMAT_VERSION = 1
HEADER_FIELD = "cacheaug_bank"
SUFFIX = ".safetensors"

log = logging.getLogger(__name__)


@dataclass
class BankEntry:
    key: str
    path: Path
    num_tokens: int
    status: str  # "hit (memory)" | "hit (disk)" | "built" | "rebuilt (<why the old entry was rejected>)"


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _prefix_sha256s(ids: list[int], lengths) -> dict[int, str]:
    """``_sha256_json(ids[:n])`` for each n in ``lengths`` (0 < n <= len(ids)) in one pass over ``ids``: the JSON
    of a list of ints is "[" + ",".join(ids) + "]", so one running digest, copied and closed at each n, gives all."""
    digest, done, hashes = hashlib.sha256(b"["), 0, {}
    for length in sorted({n for n in lengths if 0 < n <= len(ids)}):
        digest.update(("," if done else "").encode() + ",".join(map(str, ids[done:length])).encode())
        done = length
        closed = digest.copy()
        closed.update(b"]")
        hashes[length] = closed.hexdigest()
    return hashes


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy
    return digest.hexdigest()


def model_fingerprint(lm) -> dict:
    """Everything an augmented cache depends on besides the context: base, coprocessor weights, library."""
    import transformers

    base = lm.base
    identity = base_identity_from_config(base.config, getattr(base, "name_or_path", None) or None)
    dtype = next(base.parameters()).dtype
    return {
        "bank_format": BANK_FORMAT_VERSION,
        "base": identity,
        "base_dtype": str(dtype),
        "attention": str(getattr(base.config, "_attn_implementation", None)),
        "coprocessor": lm.config.to_dict(),
        # all coprocessor tensors, frozen ones included: anything that changes the latents changes the key
        "coprocessor_sha256": tensors_sha256(dict(lm.coprocessor.state_dict())),
        "transformers": transformers.__version__,
    }


def _as_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be (length>0,) or (batch, length>0), got shape {tuple(ids.shape)}")
    return ids


class CacheBank:
    """Augmented caches of long contexts under ``root``, built with ``lm.augment`` on first use.

    ``get_or_build(ids)`` returns a copy each time; the last ``memory_entries`` entries also stay in memory.
    ``last_status`` says what the latest get/get_or_build/build did (see BankEntry.status); with several threads
    it may be another thread's: ``longest_prefix`` returns its status instead.

    Thread-safe: one re-entrant lock guards the in-memory LRU, the fingerprint, the prefix index and file writes;
    entries are read from disk outside it (atomic replaces: a reader sees a whole old or new file), and builds
    run one at a time under a second lock (``lm.augment`` switches the base's attention implementation while it
    runs, so two must not overlap; a thread waiting on it finds the entry another thread just built).
    """

    def __init__(self, root: str | os.PathLike, lm, tokenizer=None, memory_entries: int = 4):
        self.root = Path(root)
        self.lm, self.tokenizer = lm, tokenizer
        self.memory_entries = memory_entries
        self._memory: OrderedDict[str, DecodeState] = OrderedDict()
        self._fingerprint: dict | None = None
        self._index: dict[int, set[str]] | None = None  # num_tokens -> token_ids_sha256 of this model's entries
        self._lock = threading.RLock()
        self._build_lock = threading.RLock()
        self.last_status = ""

    @property
    def fingerprint(self) -> dict:
        with self._lock:
            if self._fingerprint is None:  # hashing the coprocessor's weights takes a moment: once per bank
                self._fingerprint = model_fingerprint(self.lm)
            return self._fingerprint

    def key_for(self, input_ids) -> str:
        ids = _as_ids(input_ids)
        return _sha256_json({"model": self.fingerprint, "shape": list(ids.shape), "ids": ids.flatten().tolist()})

    def path_for(self, input_ids=None, key: str | None = None) -> Path:
        key = key or self.key_for(input_ids)
        return self.root / key[:2] / f"{key}{SUFFIX}"

    # ------------------------------------------------------------------ lookups
    def get(self, input_ids) -> DecodeState | None:
        """The stored augmentation of ``input_ids`` (a copy), or None when absent or rejected."""
        state, self.last_status = self._lookup(_as_ids(input_ids))
        return state

    def get_or_build(self, input_ids) -> DecodeState:
        """The augmented cache of ``input_ids`` (B, T): from memory or disk when a verified entry exists,
        else computed with ``lm.augment`` and stored. Always a copy: decoding never alters the entry."""
        state, self.last_status = self._get_or_build(_as_ids(input_ids))
        return state

    def build(self, input_ids) -> DecodeState:
        """Augment ``input_ids`` now and store the result (replacing any entry atomically)."""
        state = self._build(_as_ids(input_ids))
        self.last_status = "built"
        return state

    def longest_prefix(self, input_ids) -> tuple[DecodeState, int, str] | None:
        """The stored entry whose token ids are the longest prefix of the prompt ``input_ids`` (T,) or (1, T),
        the whole prompt included: (a copy of its state, its number of tokens, "hit (memory)" | "hit (disk)"),
        or None when no entry of this model matches. Verified as ``get`` verifies; a rejected or vanished
        entry is logged, left out of the index until rebuilt or ``refresh_index()``, and the next-longest tried."""
        ids = _as_ids(input_ids)
        if ids.shape[0] != 1:
            raise InputError(f"longest_prefix takes one prompt, of shape (T,) or (1, T); got shape {tuple(ids.shape)}")
        with self._lock:
            index = self._prefix_index()
            hashes = _prefix_sha256s(ids[0].tolist(), index)
            matches = sorted((n for n, digest in hashes.items() if digest in index[n]), reverse=True)
        for length in matches:
            state, status = self._lookup(ids[:, :length])
            if state is not None:
                return state, length, status
            if status == "miss":
                log.warning("cache bank: an indexed entry of %d tokens is gone from %s", length, self.root)
            with self._lock:
                if self._index is not None:
                    self._index.get(length, set()).discard(hashes[length])
        return None

    def refresh_index(self) -> int:
        """Rescan ``root`` for this model's entries (new ones from another process, e.g. `cacheaug bank add`);
        returns how many the index holds."""
        with self._lock:
            self._index = self._scan()
            return sum(len(hashes) for hashes in self._index.values())

    def _lookup(self, ids: torch.Tensor) -> tuple[DecodeState | None, str]:
        key = self.key_for(ids)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return copy_state(self._memory[key]), "hit (memory)"
        path = self.path_for(key=key)
        if not path.is_file():
            return None, "miss"
        try:
            state = self._load(path, key, ids)  # outside the lock: threads load different entries at once
        except BankEntryError as error:
            log.warning("cache bank: rejecting %s: %s", path, error)
            return None, f"rejected ({error})"
        with self._lock:
            self._remember(key, state)
            self._index_add(ids)  # verified: an entry another process wrote is matched from now on
        return copy_state(state), "hit (disk)"

    def _get_or_build(self, ids: torch.Tensor) -> tuple[DecodeState, str]:
        state, status = self._lookup(ids)
        if state is not None:
            return state, status
        with self._build_lock:
            if status == "miss":  # another thread may have built it while this one waited
                state, again = self._lookup(ids)
                if state is not None:
                    return state, again
            state = self._build(ids)
        return state, ("rebuilt" + status[len("rejected") :] if status.startswith("rejected") else "built")

    def _build(self, ids: torch.Tensor) -> DecodeState:
        context = self.lm.base.config.get_text_config().max_position_embeddings
        if ids.shape[1] + self.lm.config.num_latents > context:
            raise InputError(
                f"{ids.shape[1]} tokens + {self.lm.config.num_latents} latents do not fit the model's "
                f"context of {context} positions"
            )
        key = self.key_for(ids)
        with self._build_lock, torch.no_grad():
            state = self.lm.augment(ids.to(self.lm.device))
        with self._lock:
            self._save(self.path_for(key=key), key, ids, state)
            self._remember(key, state)
            self._index_add(ids)
        return copy_state(state)

    def add_text(self, text: str) -> BankEntry:
        """Tokenize ``text`` with the bank's tokenizer and make sure its augmented cache is stored."""
        if self.tokenizer is None:
            raise InputError("add_text needs a bank made with a tokenizer")
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise InputError("the text is empty after tokenization")
        _, status = self._get_or_build(ids)
        self.last_status = status
        key = self.key_for(ids)
        return BankEntry(key, self.path_for(key=key), ids.shape[1], status)

    def _remember(self, key: str, state: DecodeState) -> None:
        """Keep ``state`` in the LRU (the caller holds ``_lock``)."""
        if self.memory_entries <= 0:
            return
        self._memory[key] = state
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    # ------------------------------------------------------------------ the prefix index (callers hold _lock)
    def _prefix_index(self) -> dict[int, set[str]]:
        if self._index is None:
            self._index = self._scan()
        return self._index

    def _index_add(self, ids: torch.Tensor) -> None:
        if self._index is not None and ids.shape[0] == 1:  # a batch of contexts is no prompt's prefix
            self._index.setdefault(ids.shape[1], set()).add(_sha256_json(ids[0].tolist()))

    def _scan(self) -> dict[int, set[str]]:
        """num_tokens -> token_ids_sha256 of each entry under ``root`` made for this model, from the header
        and ``input_ids`` alone: the full checks run when an entry is loaded."""
        index: dict[int, set[str]] = {}
        for path in self.root.glob(f"*/*{SUFFIX}"):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    header = json.loads((handle.metadata() or {})[HEADER_FIELD])
                    if header.get("fingerprint") != self.fingerprint:
                        continue  # another model's entry: banks of several models may share a root
                    ids = handle.get_tensor("input_ids")  # (B, T)
            except Exception as error:  # unreadable, truncated, or no cacheaug header: never matched
                log.warning("cache bank: not indexing %s (%s: %s)", path, type(error).__name__, error)
                continue
            if ids.ndim == 2 and ids.shape[0] == 1 and ids.shape[1] > 0:
                index.setdefault(ids.shape[1], set()).add(_sha256_json(ids[0].tolist()))
        return index

    # ------------------------------------------------------------------ the file format
    def _save(self, path: Path, key: str, ids: torch.Tensor, state: DecodeState) -> None:
        tensors, layout = kv.cache_state(state.cache)
        tensors = {f"cache.{name}": t.cpu() for name, t in tensors.items()}
        tensors["logits"] = state.logits.detach().cpu().contiguous().clone()  # (B, V)
        tensors["input_ids"] = ids.clone()  # (B, T)
        if state.latents is not None:
            tensors["latents"] = state.latents.detach().cpu().contiguous().clone()  # (B, N_L, H)
        for name in ("slot_mask", "latent_slots", "last_token"):  # (B, S), (B, S), (B,)
            if getattr(state, name) is not None:
                tensors[name] = getattr(state, name).detach().cpu().clone(memory_format=torch.contiguous_format)
        header = {
            "format_version": BANK_FORMAT_VERSION,
            "key": key,
            "fingerprint": self.fingerprint,
            "num_tokens": int(ids.shape[1]),
            "token_ids_sha256": _sha256_json(ids.flatten().tolist()),
            "next_position": int(state.next_position),
            "cache_layout": layout,
            "tensors_sha256": tensors_sha256(tensors),
        }
        header["header_sha256"] = _sha256_json(header)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(handle)
        try:
            save_file(tensors, tmp, metadata={HEADER_FIELD: json.dumps(header, sort_keys=True)})
            os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _load(self, path: Path, key: str, ids: torch.Tensor) -> DecodeState:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises several types for a truncated or garbled file
            raise BankEntryError(f"unreadable ({type(error).__name__}: {error})") from None
        try:
            header = json.loads(metadata[HEADER_FIELD])
            claimed = header.pop("header_sha256")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BankEntryError("no valid cacheaug header") from None
        if _sha256_json(header) != claimed:
            raise BankEntryError("the header was edited (its sha256 does not match)")
        if header.get("format_version") != BANK_FORMAT_VERSION:
            raise BankEntryError(f"format version {header.get('format_version')}, expected {BANK_FORMAT_VERSION}")
        if header.get("key") != key:
            raise BankEntryError("the file belongs to another key")
        if header.get("fingerprint") != self.fingerprint:
            saved = header["fingerprint"] if isinstance(header.get("fingerprint"), dict) else {}
            fields = sorted(k for k in self.fingerprint if saved.get(k) != self.fingerprint[k])
            raise BankEntryError(f"made for another model ({', '.join(fields)} differ)")
        if header.get("token_ids_sha256") != _sha256_json(ids.flatten().tolist()):
            raise BankEntryError("made for other token ids")
        if tensors_sha256(tensors) != header.get("tensors_sha256"):
            raise BankEntryError("tensor data corrupted (sha256 does not match)")
        if not torch.equal(tensors.get("input_ids", torch.empty(0)), ids):
            raise BankEntryError("stored token ids differ")
        device = self.lm.device
        prefix = "cache."
        cache_tensors = {name[len(prefix) :]: t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
        try:
            cache = kv.cache_from_state(cache_tensors, header["cache_layout"], self.lm.base.config)
        except (KeyError, ValueError, TypeError) as error:
            raise BankEntryError(f"cache does not fit the model ({error})") from None
        masks = {name: tensors[name].to(device) for name in ("slot_mask", "latent_slots", "last_token") if name in tensors}
        slots = kv.cache_length(cache)
        if any(masks[name].shape[-1] != slots for name in ("slot_mask", "latent_slots") if name in masks):
            raise BankEntryError("the slot masks and the cache length disagree")
        # readout="token" reads a token again after the latents: its positions stop short of the slots.
        positions_fit = slots == header.get("next_position") or (
            "slot_mask" in masks and isinstance(header.get("next_position"), int) and 0 < header["next_position"] < slots
        )
        if not positions_fit or "logits" not in tensors:
            raise BankEntryError("cache length, next position and logits disagree")
        latents = tensors["latents"].to(device) if "latents" in tensors else None
        gates = steps.recipe(self.lm)[1] if latents is not None else None
        return DecodeState(
            cache, int(header["next_position"]), tensors["logits"].to(device), latents,
            masks.get("slot_mask"), masks.get("latent_slots"), masks.get("last_token"), gates,
        )
