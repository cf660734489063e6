"""Text sources turned into tokenised, packed, deterministic, exactly resumable and shardable batches."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import EMBEDDED_SOURCE, FORMATS, DataArgs, _is_int, _require
from .corpus import TRAIN_SEED, VALIDATION_SEED, arithmetic_problems, gsm8k_document
from .errors import DataError

_FOLDER_SUFFIXES = (".txt", ".jsonl")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARTS_PER_WINDOW = 8  # big JSONL files are cut into parts this much smaller than a window, so windows mix them
_MEMORY_BLOCK = 1024  # in-memory documents per part
_TOKENIZE_BATCH = 256  # documents per tokenizer call, to bound the Python lists held at once
# DataArgs fields that decide the order of the training stream: a saved position is only valid if they match.
_STREAM_FIELDS = ("source", "format", "text_field", "seq_len", "seed", "validation_fraction", "validation_source",
                  "embedded_train_problems", "window_mb")


@dataclass(frozen=True)
class _Part:
    """A unit of reading whose order is shuffled: a file, a byte range of a big JSONL file, or a block of documents."""

    path: str  # "" for in-memory documents
    fmt: str  # text | jsonl | gsm8k | memory
    start: int  # byte offset (JSONL) or first document index (memory)
    end: int
    first_doc: int  # corpus-wide index of its first document, which the validation split is keyed on
    size: int  # bytes or characters of source text, for grouping parts into windows


class _Corpus:
    """The documents of one source, read lazily part by part and filtered to one side of the validation split."""

    def __init__(self, label: str, parts: list[_Part], num_docs: int, memory: Sequence[str] = (),
                 text_field: str = "text") -> None:
        self.label, self.parts, self.num_docs = label, parts, num_docs
        self.memory, self.text_field = memory, text_field
        self.keep: Callable[[int], bool] = lambda index: True
        self.kept = num_docs  # how many documents are on this side of the split

    def documents(self, part: _Part) -> Iterator[str]:
        """The kept, non-blank documents of ``part``, in file order."""
        if part.fmt == "memory":
            texts: Iterator[str] = (self.memory[i] for i in range(part.start, part.end) if self.keep(i))
        elif part.fmt == "text":
            keep = self.keep(part.first_doc)
            texts = iter([Path(part.path).read_text(encoding="utf-8", errors="replace")] if keep else [])
        else:
            texts = (_row_text(raw, part, offset, self.text_field)
                     for index, offset, raw in _jsonl_rows(part) if self.keep(index))
        return (text for text in texts if text.strip())


def _jsonl_rows(part: _Part) -> Iterator[tuple[int, int, bytes]]:
    """(document index, byte offset, raw line) of the non-blank lines in a JSONL part."""
    with open(part.path, "rb") as handle:
        handle.seek(part.start)
        index, offset = part.first_doc, part.start
        while offset < part.end:
            raw = handle.readline()
            if not raw:
                return
            if raw.strip():
                yield index, offset, raw
                index += 1
            offset += len(raw)


def _row_text(raw: bytes, part: _Part, offset: int, text_field: str) -> str:
    """The document in one JSONL row: its text field, or a rendered GSM8K question and answer."""
    def where() -> str:  # only computed on errors: it re-reads the file up to the line
        with open(part.path, "rb") as handle:
            line = handle.read(offset).count(b"\n") + 1
        return f"{part.path} line {line}"

    try:
        row = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{where()}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where()}: a JSONL row must be an object, got {type(row).__name__}")
    wanted = ("question", "answer") if part.fmt == "gsm8k" else (text_field,)
    for name in wanted:
        if name not in row:
            raise DataError(f"{where()}: the JSONL row has no {name!r} field (its keys: {sorted(row)}); "
                            "set text_field, or format='gsm8k' for question/answer rows")
        if not isinstance(row[name], str):
            raise DataError(f"{where()}: field {name!r} holds {type(row[name]).__name__}, not text")
    return gsm8k_document(row["question"], row["answer"]) if part.fmt == "gsm8k" else row[text_field]


def _resolve_files(source: str) -> list[Path]:
    """The files a path, folder (recursively, *.txt and *.jsonl) or glob names, sorted."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _FOLDER_SUFFIXES and p.is_file()
                       and not any(name.startswith(".") for name in p.relative_to(path).parts))
        if not files:
            raise DataError(f"source {source!r} matches no file: the folder has no .txt or .jsonl files")
        return files
    if any(char in source for char in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"source {source!r} matches no file: the glob pattern found nothing")
        return files
    raise DataError(f"source {source!r} matches no file: no such file or folder (a source is a file, folder, "
                    f"glob, {EMBEDDED_SOURCE!r} or hf:<dataset>[:config])")


def _file_format(path: Path, fmt: str, text_field: str) -> str:
    """``fmt``, or for auto: text, jsonl, or gsm8k when JSONL rows hold question and answer."""
    if fmt != "auto":
        return fmt
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        return "text"
    with open(path, "rb") as handle:
        first = next((line for line in handle if line.strip()), b"")
    try:
        row = json.loads(first.decode("utf-8", errors="replace")) if first else {}
    except json.JSONDecodeError:
        return "jsonl"  # reading reports the bad line with its number
    gsm8k = isinstance(row, dict) and "question" in row and "answer" in row and text_field not in row
    return "gsm8k" if gsm8k else "jsonl"


def _file_corpus(source: str, args: DataArgs) -> _Corpus:
    """One part per text file; JSONL files are counted and cut at line boundaries into parts."""
    part_bytes = max(1, args.window_bytes // _PARTS_PER_WINDOW)
    parts: list[_Part] = []
    num_docs = 0
    for path in _resolve_files(source):
        fmt = _file_format(path, args.format, args.text_field)
        if fmt == "text":
            size = path.stat().st_size
            parts.append(_Part(str(path), fmt, 0, size, num_docs, size))
            num_docs += 1
            continue
        start = offset = 0
        first = num_docs
        with open(path, "rb") as handle:
            for raw in handle:
                if offset - start >= part_bytes:
                    parts.append(_Part(str(path), fmt, start, offset, first, offset - start))
                    start, first = offset, num_docs
                num_docs += bool(raw.strip())
                offset += len(raw)
        if offset > start:
            parts.append(_Part(str(path), fmt, start, offset, first, offset - start))
    return _Corpus(source, parts, num_docs, text_field=args.text_field)


def _memory_corpus(label: str, docs: Sequence[str]) -> _Corpus:
    parts = [_Part("", "memory", start, min(start + _MEMORY_BLOCK, len(docs)), start,
                   sum(len(doc) for doc in docs[start:start + _MEMORY_BLOCK]))
             for start in range(0, len(docs), _MEMORY_BLOCK)]
    return _Corpus(label, parts, len(docs), memory=docs)


@lru_cache(maxsize=4)
def _embedded(num_problems: int, seed: int) -> tuple[str, ...]:
    return tuple(arithmetic_problems(num_problems, seed))


@lru_cache(maxsize=2)
def _hf_documents(source: str, fmt: str, text_field: str) -> tuple[str, ...]:
    """The train split of a Hugging Face dataset, as documents; only with `datasets` installed and a network."""
    local = "pass a local file or folder (.txt / .jsonl) as source instead"
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"source {source!r} cannot be loaded offline or without the Hugging Face `datasets` "
                        f"package, which is not installed; {local}")
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
           for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(f"source {source!r} cannot be loaded: Hugging Face is offline (HF_HUB_OFFLINE or "
                        f"HF_DATASETS_OFFLINE is set); {local}")
    import datasets  # optional dependency, only for hf: sources

    name, _, config = source[len("hf:"):].partition(":")
    try:
        table = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # noqa: BLE001 - any failure to fetch becomes one clear message
        reason = (str(exc).splitlines() or [""])[0]
        raise DataError(f"source {source!r} could not be loaded ({type(exc).__name__}: {reason}); "
                        f"if you are offline, {local}") from exc
    columns = set(table.column_names)
    if fmt == "gsm8k" or (fmt == "auto" and {"question", "answer"} <= columns and text_field not in columns):
        return tuple(gsm8k_document(q, a) for q, a in zip(table["question"], table["answer"]))
    if text_field not in columns:
        raise DataError(f"source {source!r} has no {text_field!r} column (columns: {sorted(columns)}); set text_field")
    return tuple(str(text) for text in table[text_field])


def _split(corpus: _Corpus, args: DataArgs, side: str) -> None:
    """Keep one side of a split of whole documents: document i is held out iff (a*i + b) mod n < k.

    A seeded affine permutation holds out exactly k documents, spread evenly through the corpus, with no
    per-document state, so streaming readers can decide from the index alone.
    """
    n = corpus.num_docs
    k = 0 if n < 2 or args.validation_fraction == 0 else min(n - 1, max(1, round(n * args.validation_fraction)))
    rng = random.Random(args.seed)
    a = rng.randrange(1, n) if n > 1 else 1
    while math.gcd(a, n) != 1:
        a = rng.randrange(1, n)
    b = rng.randrange(n) if n > 1 else 0
    held_out = side == "validation"
    corpus.keep = lambda index: ((a * index + b) % n < k) == held_out
    corpus.kept = k if held_out else n - k


def _corpus(args: DataArgs, side: str) -> _Corpus:
    """The documents of the "train" or "validation" side."""
    source = args.validation_source if side == "validation" and args.validation_source else args.source
    if source == EMBEDDED_SOURCE:  # its own validation problems, from another seed
        count, seed = ((args.embedded_val_problems, VALIDATION_SEED) if side == "validation"
                       else (args.embedded_train_problems, TRAIN_SEED))
        return _memory_corpus(source, _embedded(count, seed))
    if source.startswith("hf:"):
        corpus = _memory_corpus(source, _hf_documents(source, args.format, args.text_field))
    else:
        corpus = _file_corpus(source, args)
    if args.validation_source is None:
        _split(corpus, args, side)
    return corpus


class _Packer:
    """Per-epoch windows of a corpus, each turned into shuffled (n, seq_len) chunks of EOS-joined documents."""

    def __init__(self, corpus: _Corpus, tokenizer: Any, args: DataArgs) -> None:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DataError(f"source {corpus.label!r}: the tokenizer has no eos token, which packing puts between "
                            "documents; set tokenizer.eos_token")
        self.corpus, self.tokenizer, self.args = corpus, tokenizer, args
        self.seq_len, self.seed = args.seq_len, args.seed
        self._eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
        self._windows: tuple[int, list[list[_Part]]] = (-1, [])
        # A corpus that fits in one window is tokenised once: every epoch re-packs the same documents.
        fits = sum(part.size for part in corpus.parts) <= args.window_bytes
        self._cache: dict[_Part, list[np.ndarray]] | None = {} if fits else None

    def tokenize(self, docs: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]

    def windows(self, epoch: int) -> list[list[_Part]]:
        """Epoch ``epoch``'s parts, shuffled with seed + epoch, grouped into windows of about window_mb."""
        if self._windows[0] != epoch:
            order = list(self.corpus.parts)
            random.Random(self.seed + epoch).shuffle(order)
            windows: list[list[_Part]] = []
            size, limit = 0, self.args.window_bytes
            for part in order:
                if not windows or (windows[-1] and size + part.size > limit):
                    windows.append([])
                    size = 0
                windows[-1].append(part)
                size += part.size
            self._windows = (epoch, windows)
        return self._windows[1]

    def _part_tokens(self, part: _Part) -> list[np.ndarray]:
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
        self._packer = _Packer(_corpus(args, "train"), tokenizer, args)
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
    corpus = _corpus(args, "validation")
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


def iter_documents(args: DataArgs, split: str = "train") -> Iterator[str]:
    """The text documents of the "train" or "validation" side, in file order (for inspection and tests)."""
    _require(split in ("train", "validation"), "split", split, "'train' or 'validation'")
    corpus = _corpus(args, split)
    for part in corpus.parts:
        yield from corpus.documents(part)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) for every non-blank line of a small JSONL file (evaluation sets)."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}: not valid JSON ({error.msg})") from None
