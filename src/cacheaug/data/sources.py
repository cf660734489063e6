"""Where training documents come from: files, folders, globs, JSONL, hf: datasets and the embedded corpus, and
the seeded whole-document split into training and validation (no torch: the CLI checks sources with it)."""

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

from ..config import EMBEDDED_SOURCE, DataArgs, _require
from ..errors import DataError
from .arithmetic import TRAIN_SEED, VALIDATION_SEED, arithmetic_problems
from .documents import gsm8k_document

_FOLDER_SUFFIXES = (".txt", ".jsonl")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARTS_PER_WINDOW = 8  # big JSONL files are cut into parts this much smaller than a window, so windows mix them
_MEMORY_BLOCK = 1024  # in-memory documents per part
@dataclass(frozen=True)
class Part:
    """A unit of reading whose order is shuffled: a file, a byte range of a big JSONL file, or a block of documents."""

    path: str  # "" for in-memory documents
    fmt: str  # text | jsonl | gsm8k | memory
    start: int  # byte offset (JSONL) or first document index (memory)
    end: int
    first_doc: int  # corpus-wide index of its first document, which the validation split is keyed on
    size: int  # bytes or characters of source text, for grouping parts into windows


class Corpus:
    """The documents of one source, read lazily part by part and filtered to one side of the validation split."""

    def __init__(self, label: str, parts: list[Part], num_docs: int, memory: Sequence[str] = (),
                 text_field: str = "text") -> None:
        self.label, self.parts, self.num_docs = label, parts, num_docs
        self.memory, self.text_field = memory, text_field
        self.keep: Callable[[int], bool] = lambda index: True
        self.kept = num_docs  # how many documents are on this side of the split

    def documents(self, part: Part) -> Iterator[str]:
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


def _jsonl_rows(part: Part) -> Iterator[tuple[int, int, bytes]]:
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


def _row_text(raw: bytes, part: Part, offset: int, text_field: str) -> str:
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


def resolve_files(source: str) -> list[Path]:
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


def check_source(source: str) -> None:
    """Fail now, with the reason, if a file source names nothing (embedded and hf: sources are checked on use)."""
    if source != EMBEDDED_SOURCE and not source.startswith("hf:"):
        resolve_files(source)


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


def _file_corpus(source: str, args: DataArgs) -> Corpus:
    """One part per text file; JSONL files are counted and cut at line boundaries into parts."""
    part_bytes = max(1, args.window_bytes // _PARTS_PER_WINDOW)
    parts: list[Part] = []
    num_docs = 0
    for path in resolve_files(source):
        fmt = _file_format(path, args.format, args.text_field)
        if fmt == "text":
            size = path.stat().st_size
            parts.append(Part(str(path), fmt, 0, size, num_docs, size))
            num_docs += 1
            continue
        start = offset = 0
        first = num_docs
        with open(path, "rb") as handle:
            for raw in handle:
                if offset - start >= part_bytes:
                    parts.append(Part(str(path), fmt, start, offset, first, offset - start))
                    start, first = offset, num_docs
                num_docs += bool(raw.strip())
                offset += len(raw)
        if offset > start:
            parts.append(Part(str(path), fmt, start, offset, first, offset - start))
    return Corpus(source, parts, num_docs, text_field=args.text_field)


def _memory_corpus(label: str, docs: Sequence[str]) -> Corpus:
    parts = [Part("", "memory", start, min(start + _MEMORY_BLOCK, len(docs)), start,
                   sum(len(doc) for doc in docs[start:start + _MEMORY_BLOCK]))
             for start in range(0, len(docs), _MEMORY_BLOCK)]
    return Corpus(label, parts, len(docs), memory=docs)


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


def _split(corpus: Corpus, args: DataArgs, side: str) -> None:
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


def read_corpus(args: DataArgs, side: str) -> Corpus:
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


def iter_documents(args: DataArgs, split: str = "train") -> Iterator[str]:
    """The text documents of the "train" or "validation" side, in file order (for inspection and tests)."""
    _require(split in ("train", "validation"), "split", split, "'train' or 'validation'")
    corpus = read_corpus(args, split)
    for part in corpus.parts:
        yield from corpus.documents(part)
