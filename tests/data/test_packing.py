"""Tests for cacheaug.data: packing, splits, shuffling, exact resume, sharding, streaming, formats and errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cacheaug.data import (
    DataArgs,
    DataError,
    PackedDataset,
    build_training_data,
    iter_documents,
    validation_batches,
)

SHARED_DATA = Path("/work/shared/data")
EOS = 256  # the byte tokenizer's eos id: ids 0-255 are the bytes themselves


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + extra, printable + [256 + i for i in range(len(extra))])}


def byte_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte (id = byte value), plus <eos> = 256; built offline, in-process."""
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab["<eos>"] = EOS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>" if with_eos else None)


TOKENIZER = byte_tokenizer()


def _segments(chunk: torch.Tensor) -> list[str]:
    """The text pieces of a chunk between EOS tokens."""
    text = bytes(t if t != EOS else 0 for t in chunk.tolist()).decode("utf-8", errors="replace")
    return text.split("\0")


def _docs(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [f"<doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + ">" for i in range(count)]


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


def _folder(root: Path, docs: list[str]) -> Path:
    for i, doc in enumerate(docs):
        path = root / f"sub{i % 3}" / f"file{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc, encoding="utf-8")
    return root


def _epoch_chunks(dataset: PackedDataset, epochs: int = 1) -> list[list[torch.Tensor]]:
    """The chunks of each of the first ``epochs`` epochs, from a fresh batch_size-1 dataset."""
    by_epoch: list[list[torch.Tensor]] = [[] for _ in range(epochs + 1)]
    while dataset.epoch < epochs:
        chunk = next(dataset)[0]
        by_epoch[dataset.epoch].append(chunk)  # the epoch it came from, since batches of 1 never straddle two
    return by_epoch[:epochs]


def _take(dataset: PackedDataset, count: int) -> list[torch.Tensor]:
    return [next(dataset) for _ in range(count)]


def test_packing_puts_eos_between_documents_and_cuts_seq_len_chunks(tmp_path: Path) -> None:
    docs = _docs(30)
    args = DataArgs(source=str(_write_jsonl(tmp_path / "d.jsonl", docs)), seq_len=16, validation_fraction=0.0)
    dataset = PackedDataset(args, TOKENIZER, batch_size=3)
    batch = next(dataset)
    assert batch.shape == (3, 16) and batch.dtype == torch.long
    [chunks] = _epoch_chunks(PackedDataset(args, TOKENIZER, batch_size=1))
    total = sum(len(doc.encode()) + 1 for doc in docs)
    assert len(chunks) == total // 16
    for chunk in chunks:
        assert chunk.shape == (16,)
        for piece in _segments(chunk)[1:-1]:  # whole documents: between two EOS tokens
            assert piece in docs
        for piece in _segments(chunk):  # a document boundary never lacks its EOS
            assert piece.count("<doc") <= 1 and any(piece in doc for doc in docs)
    eos_count = sum(int((chunk == EOS).sum()) for chunk in chunks)
    assert len(docs) - 1 <= eos_count <= len(docs)  # the last EOS may fall in the dropped tail


def test_same_seed_same_batches_other_seed_other_batches(tmp_path: Path) -> None:
    source = str(_write_jsonl(tmp_path / "d.jsonl", _docs(60)))
    first = _take(PackedDataset(DataArgs(source=source, seq_len=12, seed=3), TOKENIZER, 4), 6)
    again = _take(PackedDataset(DataArgs(source=source, seq_len=12, seed=3), TOKENIZER, 4), 6)
    other = _take(PackedDataset(DataArgs(source=source, seq_len=12, seed=4), TOKENIZER, 4), 6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_validation_split_is_by_whole_documents(tmp_path: Path) -> None:
    docs = _docs(200)
    args = DataArgs(source=str(_write_jsonl(tmp_path / "d.jsonl", docs)), seq_len=8, validation_fraction=0.1, seed=5)
    train, held_out = list(iter_documents(args, "train")), list(iter_documents(args, "validation"))
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(docs) and len(held_out) == 20
    assert held_out != list(iter_documents(DataArgs(**{**vars(args), "seed": 6}), "validation"))
    for batch in validation_batches(args, TOKENIZER, batch_size=4):
        assert batch.shape[1] == 8 and batch.shape[0] <= 4
        for chunk in batch:
            assert all(any(piece in doc for doc in held_out) for piece in _segments(chunk))
    for chunk in next(PackedDataset(args, TOKENIZER, 16)):
        assert all(any(piece in doc for doc in train) for piece in _segments(chunk))
    two = DataArgs(source=str(_write_jsonl(tmp_path / "two.jsonl", docs[:2])), seq_len=4)
    assert len(list(iter_documents(two, "validation"))) == 1 and len(list(iter_documents(two, "train"))) == 1


def test_validation_source_and_max_batches(tmp_path: Path) -> None:
    train_docs, val_docs = _docs(40, seed=1), _docs(40, seed=2)
    args = DataArgs(source=str(_write_jsonl(tmp_path / "t.jsonl", train_docs)), seq_len=8,
                    validation_source=str(_write_jsonl(tmp_path / "v.jsonl", val_docs)))
    assert list(iter_documents(args, "train")) == train_docs
    assert list(iter_documents(args, "validation")) == val_docs
    batches = validation_batches(args, TOKENIZER, batch_size=5, max_batches=3)
    assert len(batches) == 3 and all(b.shape == (5, 8) for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, validation_batches(args, TOKENIZER, 5, 3)))
    no_split = DataArgs(source=args.source, seq_len=8, validation_fraction=0.0)
    assert validation_batches(no_split, TOKENIZER, batch_size=5) == []


@pytest.mark.parametrize("window_mb", [0.0006, 16.0])  # several windows; one window, tokenised once and cached
@pytest.mark.parametrize("where", ["mid-epoch", "before an epoch boundary"])
def test_exact_resume_from_state_dict(tmp_path: Path, where: str, window_mb: float) -> None:
    source = str(_folder(tmp_path / "corpus", _docs(50)))
    args = DataArgs(source=source, seq_len=16, validation_fraction=0.1, window_mb=window_mb)
    [first_epoch] = _epoch_chunks(PackedDataset(args, TOKENIZER, batch_size=1))
    skip = 5 if where == "mid-epoch" else len(first_epoch) // 2 - 4
    uninterrupted = PackedDataset(args, TOKENIZER, batch_size=2)
    _take(uninterrupted, skip)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # plain values, storable anywhere
    epoch_before = uninterrupted.epoch
    expected = _take(uninterrupted, 12)
    resumed = PackedDataset(args, TOKENIZER, batch_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, _take(resumed, 12)))
    if where != "mid-epoch":
        assert uninterrupted.epoch > epoch_before  # the resumed stretch crossed into the next epoch
    changed = PackedDataset(DataArgs(**{**vars(args), "seed": 9}), TOKENIZER, batch_size=2)
    with pytest.raises(DataError, match="seed"):
        changed.load_state_dict(state)


def test_two_ranks_see_the_chunks_of_one_process_with_double_batch(tmp_path: Path) -> None:
    args = DataArgs(source=str(_write_jsonl(tmp_path / "d.jsonl", _docs(40))), seq_len=12, window_mb=0.001)
    single = PackedDataset(args, TOKENIZER, batch_size=6)
    ranks = [PackedDataset(args, TOKENIZER, batch_size=3).shard(rank, 2) for rank in range(2)]
    for _ in range(25):  # crosses epoch boundaries
        assert torch.equal(next(single), torch.cat([next(rank) for rank in ranks]))
    state = ranks[0].state_dict()  # a 2-process checkpoint resumes in one process
    one = PackedDataset(args, TOKENIZER, batch_size=6)
    one.load_state_dict(state)
    assert torch.equal(next(one), torch.cat([next(rank) for rank in ranks]))
    with pytest.raises(DataError, match="rank"):
        single.shard(2, 2)


def test_streaming_folder_yields_every_token_once_per_epoch(tmp_path: Path) -> None:
    docs = _docs(120, seed=7)
    root = _folder(tmp_path / "many", docs[:100])
    _write_jsonl(root / "sub0" / "rows.jsonl", docs[100:])
    args = DataArgs(source=str(root), seq_len=32, validation_fraction=0.0, window_mb=0.001)
    dataset = PackedDataset(args, TOKENIZER, batch_size=1)
    assert len(dataset._packer.windows(0)) > 3  # really streamed window by window
    expected = Counter(b for doc in docs for b in doc.encode()) + Counter({EOS: len(docs)})
    epochs = _epoch_chunks(dataset, 2)
    for chunks in epochs:
        seen = Counter(torch.cat(chunks).tolist())
        assert not seen - expected  # nothing twice, nothing invented
        assert sum((expected - seen).values()) < args.seq_len  # only the epoch's tail is dropped
    assert not all(torch.equal(a, b) for a, b in zip(*epochs))  # each epoch has its own order


def test_big_jsonl_is_cut_into_parts_without_losing_rows(tmp_path: Path) -> None:
    docs = _docs(300, seed=3)
    args = DataArgs(source=str(_write_jsonl(tmp_path / "big.jsonl", docs)), seq_len=8, window_mb=0.002,
                    validation_fraction=0.2)
    packer = PackedDataset(args, TOKENIZER, 1)._packer
    assert len(packer.corpus.parts) > 5
    train, held_out = list(iter_documents(args, "train")), list(iter_documents(args, "validation"))
    assert sorted(train + held_out) == sorted(docs) and len(held_out) == 60


def test_gsm8k_rows_render_like_the_embedded_corpus(tmp_path: Path) -> None:
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"}]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows * 3) + "\n", encoding="utf-8")
    [doc, *_] = iter_documents(DataArgs(source=str(path), validation_fraction=0.0))
    assert "<<" not in doc and ">>" not in doc
    assert doc.startswith("Question: Natalia sold") and "\nAnswer: In May she sold 48/2 = 24 clips." in doc
    assert doc.endswith("\n#### 72")
    as_text = next(iter_documents(DataArgs(source=str(path), format="jsonl", text_field="question",
                                           validation_fraction=0.0)))
    assert as_text == rows[0]["question"]


def test_embedded_corpus_trains_and_validates_on_different_problems() -> None:
    args = DataArgs(embedded_train_problems=300, embedded_val_problems=20, seq_len=64)
    dataset, val = build_training_data(args, TOKENIZER, batch_size=4, min_doc_tokens=17)
    assert next(dataset).shape == (4, 64) and val and all(b.shape[1] == 64 for b in val)
    train, held_out = set(iter_documents(args, "train")), list(iter_documents(args, "validation"))
    assert len(held_out) == 20 and not train & set(held_out)
    assert all(doc.startswith("Question: ") and "\n#### " in doc for doc in held_out)


def test_text_files_are_read_as_utf8_with_replacement(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait " * 10)
    [doc] = iter_documents(DataArgs(source=str(tmp_path / "latin.txt"), validation_fraction=0.0))
    assert doc.startswith("caf\ufffd au lait")


def _error(args: DataArgs, tokenizer: PreTrainedTokenizerFast = TOKENIZER, min_doc_tokens: int = 1) -> str:
    with pytest.raises(DataError) as info:
        build_training_data(args, tokenizer, batch_size=2, min_doc_tokens=min_doc_tokens)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_for_missing_sources(tmp_path: Path) -> None:
    assert "matches no file" in _error(DataArgs(source=str(tmp_path / "nothing_here")))
    assert "matches no file" in _error(DataArgs(source=str(tmp_path / "*.jsonl")))
    (tmp_path / "empty_dir").mkdir()
    assert "no .txt or .jsonl" in _error(DataArgs(source=str(tmp_path / "empty_dir")))


def test_errors_for_too_little_text(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.mkdir()
    for name in ("a.txt", "b.txt"):
        (blank / name).write_text("  \n\n", encoding="utf-8")
    message = _error(DataArgs(source=str(blank), validation_fraction=0.0))
    assert "empty corpus" in message and str(blank) in message
    short = _write_jsonl(tmp_path / "short.jsonl", ["abc", "abcde", "ab"])
    message = _error(DataArgs(source=str(short), seq_len=4, validation_fraction=0.0), min_doc_tokens=10)
    assert "all 3 documents are shorter than min_doc_tokens=10" in message and "longest has 5" in message
    message = _error(DataArgs(source=str(short), seq_len=64, validation_fraction=0.0))
    assert "too short" in message and "seq_len=64" in message and "smaller seq_len" in message


def test_errors_for_bad_jsonl_rows(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "fine row"}\n{"body": "no text", "id": 2}\n', encoding="utf-8")
    message = _error(DataArgs(source=str(missing), validation_fraction=0.0, seq_len=1000))
    assert str(missing) in message and "line 2" in message and "'text'" in message and "['body', 'id']" in message
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n\n{"text": oops}\n', encoding="utf-8")
    message = _error(DataArgs(source=str(broken), validation_fraction=0.0, seq_len=1000))
    assert str(broken) in message and "line 3" in message and "not valid JSON" in message


def test_errors_for_hf_offline_and_tokenizer_without_eos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline" in _error(DataArgs(source="hf:openai/gsm8k:main"))
    source = str(_write_jsonl(tmp_path / "d.jsonl", _docs(10)))
    assert "eos" in _error(DataArgs(source=source, seq_len=8), tokenizer=byte_tokenizer(with_eos=False))


@pytest.mark.parametrize("field, value", [("seq_len", 1), ("format", "xml"), ("validation_fraction", 1.0),
                                          ("seed", -1), ("window_mb", 0), ("source", "")])
def test_data_args_validation_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(DataError, match=field) as info:
        DataArgs(**{field: value})
    assert repr(value) in str(info.value)


@pytest.mark.skipif(not (SHARED_DATA / "english_pd_prose").is_dir(), reason="shared data not present")
def test_real_prose_with_a_small_trained_bpe() -> None:
    folder = SHARED_DATA / "english_pd_prose" / "inaugural"
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    sample = [p.read_text(encoding="latin-1") for p in sorted(folder.glob("18*.txt"))[:5]]
    bpe.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    args = DataArgs(source=str(folder), seq_len=128, validation_fraction=0.1)
    dataset, val = build_training_data(args, tokenizer, batch_size=4, min_doc_tokens=17, max_val_batches=4)
    batch = next(dataset)
    assert batch.shape == (4, 128) and int(batch.max()) < len(tokenizer)
    assert len(val) == 4 and all(b.shape == (4, 128) for b in val)
    held_out = set(iter_documents(args, "validation"))
    assert len(held_out) == round(len(list(folder.glob("*.txt"))) * 0.1)


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file(), reason="shared data not present")
def test_real_gsm8k_is_detected_and_rendered() -> None:
    args = DataArgs(source=str(SHARED_DATA / "gsm8k" / "test.jsonl"), window_mb=1.0)
    docs = list(iter_documents(args, "validation"))
    assert len(docs) == round(1319 * 0.05)
    assert all(doc.startswith("Question: ") and "<<" not in doc and "\n#### " in doc for doc in docs)
