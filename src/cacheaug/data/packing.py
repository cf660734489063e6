"""Documents -> EOS-joined seq_len chunks: the resumable, shardable training stream and fixed validation batches."""

from __future__ import annotations

import random
from typing import Any
from collections.abc import Sequence

import numpy as np
import torch

from ..config import DataArgs, _is_int, _require
from ..errors import DataError
from .sources import Corpus, Part, read_corpus

_TOKENIZE_BATCH = 256  # documents per tokenizer call, to bound the Python lists held at once
# DataArgs fields that decide the order of the training stream: a saved position is only valid if they match.
_STREAM_FIELDS = ("source", "format", "text_field", "seq_len", "seed", "validation_fraction", "validation_source",
                  "embedded_train_problems", "window_mb")



class _Packer:
    """Per-epoch windows of a corpus, each turned into shuffled (n, seq_len) chunks of EOS-joined documents."""

    def __init__(self, corpus: Corpus, tokenizer: Any, args: DataArgs) -> None:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DataError(f"source {corpus.label!r}: the tokenizer has no eos token, which packing puts between "
                            "documents; set tokenizer.eos_token")
        self.corpus, self.tokenizer, self.args = corpus, tokenizer, args
        self.seq_len, self.seed = args.seq_len, args.seed
        self._eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
        self._windows: tuple[int, list[list[Part]]] = (-1, [])
        # A corpus that fits in one window is tokenised once: every epoch re-packs the same documents.
        fits = sum(part.size for part in corpus.parts) <= args.window_bytes
        self._cache: dict[Part, list[np.ndarray]] | None = {} if fits else None

    def tokenize(self, docs: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]

    def windows(self, epoch: int) -> list[list[Part]]:
        """Epoch ``epoch``'s parts, shuffled with seed + epoch, grouped into windows of about window_mb."""
        if self._windows[0] != epoch:
            order = list(self.corpus.parts)
            random.Random(self.seed + epoch).shuffle(order)
            windows: list[list[Part]] = []
            size, limit = 0, self.args.window_bytes
            for part in order:
                if not windows or (windows[-1] and size + part.size > limit):
                    windows.append([])
                    size = 0
                windows[-1].append(part)
                size += part.size
            self._windows = (epoch, windows)
        return self._windows[1]

    def _part_tokens(self, part: Part) -> list[np.ndarray]:
        """The token ids of each kept document of ``part``."""
        if self._cache is not None and part in self._cache:
            return self._cache[part]
        docs = list(self.corpus.documents(part))
        tokens = [np.asarray(ids, dtype=np.int64) for start in range(0, len(docs), _TOKENIZE_BATCH)
                  for ids in self.tokenize(docs[start:start + _TOKENIZE_BATCH])]
        if self._cache is not None:
            self._cache[part] = tokens
        return tokens

    def pack(self, epoch: int, index: int, carry: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Window ``index``'s chunks (n, seq_len), after ``carry`` (tokens left by the window before), and the rest."""
        docs = [tokens for part in self.windows(epoch)[index] for tokens in self._part_tokens(part)]
        rng = random.Random(f"{self.seed + epoch}/{index}")  # a str seed is hashed stably, unlike hash()
        rng.shuffle(docs)
        joined = (piece for tokens in docs for piece in (tokens, self._eos))
        stream = np.concatenate([np.asarray(carry, dtype=np.int64), *joined])
        count = len(stream) // self.seq_len
        order = list(range(count))
        rng.shuffle(order)
        chunks = torch.from_numpy(stream[: count * self.seq_len].reshape(count, self.seq_len))[order]
        return chunks, stream[count * self.seq_len:].tolist()

    def check(self, min_doc_tokens: int) -> None:
        """Fail early, with the reason, if no training sequence or no long-enough document can be made."""
        label, docs, total, longest = self.corpus.label, 0, 0, 0
        for part in self.corpus.parts:
            for doc in self.corpus.documents(part):
                length = len(self.tokenize([doc])[0])
                docs, total, longest = docs + 1, total + length + 1, max(longest, length)
                if longest >= min_doc_tokens and total >= self.seq_len:
                    return
        if docs == 0:
            raise DataError(f"source {label!r} is an empty corpus: no text in any of its {self.corpus.kept} "
                            "training documents")
        if longest < min_doc_tokens:
            raise DataError(f"source {label!r}: all {docs} documents are shorter than min_doc_tokens={min_doc_tokens} "
                            f"tokens (the longest has {longest})")
        raise DataError(f"source {label!r} is too short: {total} tokens in {docs} documents (EOS included) cannot "
                        f"fill one sequence of seq_len={self.seq_len}; use a smaller seq_len")


class PackedDataset:
    """Infinite, exactly resumable, shardable iterator over (batch_size, seq_len) LongTensor training batches.

    Epoch e shuffles the corpus's parts (files, byte ranges of big JSONL files, blocks of in-memory documents)
    with seed + e and groups them into windows of about ``window_mb`` of text, which bounds memory. Each
    window's documents are shuffled, tokenised, joined with EOS and cut into seq_len chunks (the remainder
    carries into the next window; the epoch's last remainder is dropped), and the chunks are shuffled. The
    position is (epoch, window, offset into the window's chunks, carried tokens), so resuming re-packs one
    window. A global batch is world_size * batch_size consecutive chunks; rank r takes rows [r*b, (r+1)*b).
    """

    def __init__(self, args: DataArgs, tokenizer: Any, batch_size: int, min_doc_tokens: int = 1) -> None:
        _require(_is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
        _require(_is_int(min_doc_tokens) and min_doc_tokens >= 1, "min_doc_tokens", min_doc_tokens,
                 "a positive integer")
        self.args, self.batch_size = args, batch_size
        self.rank, self.world_size = 0, 1
        self._packer = _Packer(read_corpus(args, "train"), tokenizer, args)
        self._packer.check(min_doc_tokens)
        self._epoch, self._window, self._offset = 0, 0, 0
        self._carry: list[int] = []  # tokens carried into the current window
        self._chunks: torch.Tensor | None = None  # the current window's chunks, (n, seq_len), and what follows them
        self._next_carry: list[int] = []
        self._epoch_chunks = 0  # chunks made since this process started the epoch at its first window
        self._whole_epoch = True

    @property
    def epoch(self) -> int:
        return self._epoch

    def shard(self, rank: int, world_size: int) -> PackedDataset:
        """Give this process rows [rank*batch_size, (rank+1)*batch_size) of every global batch."""
        _require(_is_int(world_size) and world_size >= 1, "world_size", world_size, "a positive integer")
        _require(_is_int(rank) and 0 <= rank < world_size, "rank", rank, f"an integer in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        return self

    def __iter__(self) -> PackedDataset:
        return self

    def __next__(self) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        need = self.batch_size * self.world_size
        while need:
            chunks = self._current_chunks()
            taken = chunks[self._offset:self._offset + need]
            rows.append(taken)
            self._offset += len(taken)
            need -= len(taken)
        batch = torch.cat(rows) if len(rows) > 1 else rows[0]
        return batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].clone()

    def _current_chunks(self) -> torch.Tensor:
        """The current window's chunks with at least one left, moving on through windows and epochs."""
        while True:
            if self._chunks is None:
                windows = self._packer.windows(self._epoch)
                if self._window >= len(windows):
                    if self._whole_epoch and self._epoch_chunks == 0:
                        raise DataError(f"source {self.args.source!r} gave no sequence of seq_len={self.args.seq_len} "
                                        "in a whole epoch; use a smaller seq_len")
                    self._epoch, self._window, self._offset, self._carry = self._epoch + 1, 0, 0, []
                    self._epoch_chunks, self._whole_epoch = 0, True
                    continue
                self._chunks, self._next_carry = self._packer.pack(self._epoch, self._window, self._carry)
                self._epoch_chunks += len(self._chunks)
            if self._offset < len(self._chunks):
                return self._chunks
            self._window, self._offset, self._carry, self._chunks = self._window + 1, 0, self._next_carry, None

    def state_dict(self) -> dict[str, Any]:
        """The stream position, in global chunks (so it resumes under any world_size), as plain Python values."""
        return {"epoch": self._epoch, "window": self._window, "offset": self._offset, "carry": list(self._carry),
                "stream": {name: getattr(self.args, name) for name in _STREAM_FIELDS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was saved: the next batch is the one that run would have produced."""
        saved = state.get("stream", {})
        changed = [f"{name}: saved {saved.get(name)!r}, now {getattr(self.args, name)!r}"
                   for name in _STREAM_FIELDS if saved.get(name) != getattr(self.args, name)]
        if changed:
            raise DataError(f"source {self.args.source!r}: cannot resume the data stream, its settings changed "
                            f"({'; '.join(changed)})")
        self._epoch, self._window, self._offset = int(state["epoch"]), int(state["window"]), int(state["offset"])
        self._carry = [int(token) for token in state["carry"]]
        self._chunks, self._epoch_chunks, self._whole_epoch = None, 0, False


def validation_batches(args: DataArgs, tokenizer: Any, batch_size: int,
                       max_batches: int | None = None) -> list[torch.Tensor]:
    """Fixed validation batches of (batch_size, seq_len) tokens (the last may be smaller); [] when none is held out."""
    _require(_is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
    _require(max_batches is None or (_is_int(max_batches) and max_batches >= 1), "max_batches", max_batches,
             "None or a positive integer")
    corpus = read_corpus(args, "validation")
    if corpus.kept == 0:
        return []
    packer = _Packer(corpus, tokenizer, args)
    limit = None if max_batches is None else max_batches * batch_size
    pieces, carry, count = [], [], 0
    for index in range(len(packer.windows(0))):
        chunks, carry = packer.pack(0, index, carry)
        pieces, count = pieces + [chunks], count + len(chunks)
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise DataError(f"validation source {corpus.label!r} is too short: its {corpus.kept} documents cannot fill "
                        f"one sequence of seq_len={args.seq_len}; use a smaller seq_len, a larger "
                        "validation_fraction or a validation_source")
    return list(torch.cat(pieces)[:limit].split(batch_size))


def build_training_data(args: DataArgs, tokenizer: Any, batch_size: int, min_doc_tokens: int,
                        max_val_batches: int | None = None) -> tuple[PackedDataset, list[torch.Tensor]]:
    """The training stream and the fixed validation batches; min_doc_tokens is typically num_ahead + 1."""
    dataset = PackedDataset(args, tokenizer, batch_size, min_doc_tokens=min_doc_tokens)
    return dataset, validation_batches(args, tokenizer, batch_size, max_val_batches)
