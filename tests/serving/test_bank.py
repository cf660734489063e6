"""Cache bank: saved caches round-trip bit for bit, hits equal recomputation, and a damaged, edited or
foreign entry is rejected and rebuilt, never decoded from."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig
from cacheaug import cache as kv
from cacheaug.errors import InputError
from cacheaug.serving.bank import CacheBank
from cacheaug.generate import decode
from helpers import PAPER, VOCAB, perturbed_lm

NUM_LATENTS = 3


def _lm(arch: str = "gemma3", seed: int = 2, recipe: str = "paper") -> AugmentedLM:
    return perturbed_lm(arch, seed=seed, num_latents=NUM_LATENTS, **(PAPER if recipe == "paper" else {}))


RECIPES = ["paper", "default"]  # default: x_t read again after gated latents (hidden and latent slots saved)


def _ids(length: int = 14, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _decoded(lm, state, steps: int = 5):
    with torch.no_grad():
        return decode(lm.base, state, steps)


@pytest.mark.parametrize("recipe", RECIPES)
def test_bank_hit_equals_recomputation_and_is_a_copy(tmp_path, recipe):
    lm, ids = _lm(recipe=recipe), _ids()
    with torch.no_grad():
        fresh = lm.augment(ids)
    expected = _decoded(lm, lm.augment(ids))
    bank = CacheBank(tmp_path, lm)
    built = bank.get_or_build(ids)
    assert bank.last_status == "built" and bank.path_for(ids).is_file()
    for reader in (bank, CacheBank(tmp_path, lm)):  # from memory, then from disk
        state = reader.get_or_build(ids)
        assert reader.last_status in ("hit (memory)", "hit (disk)")
        assert torch.equal(state.logits, fresh.logits) and state.next_position == fresh.next_position
        assert kv.caches_equal(state.cache, fresh.cache) and torch.equal(state.latents, fresh.latents)
        out = _decoded(lm, state)  # mutates only the copy
        assert torch.equal(out.tokens, expected.tokens) and torch.equal(out.logits, expected.logits)
    assert kv.caches_equal(bank.get_or_build(ids).cache, fresh.cache)  # the stored entry is intact
    assert kv.caches_equal(CacheBank(tmp_path, lm).get_or_build(ids).cache, fresh.cache)
    if recipe == "paper":
        assert built.next_position == ids.shape[1] + NUM_LATENTS
    else:  # the last token is read again after the latents at its own position: positions do not advance
        assert built.next_position == ids.shape[1] and kv.cache_length(built.cache) == ids.shape[1] + NUM_LATENTS + 1
        assert torch.equal(built.slot_mask, fresh.slot_mask) and torch.equal(built.latent_slots, fresh.latent_slots)


@pytest.mark.parametrize("recipe", RECIPES)
def test_queries_after_a_banked_context_equal_recomputation(tmp_path, recipe):
    from cacheaug.stream import generate_text

    lm, context = _lm("llama", recipe=recipe), _ids(length=12)
    bank = CacheBank(tmp_path, lm)
    bank.get_or_build(context)
    for seed in (1, 2, 3):  # any number of later queries, each from a fresh copy
        query = _ids(length=5, seed=seed)
        with torch.no_grad():
            expected = decode(lm.base, lm.prefill(query, lm.augment(context)), 6)  # the state, not its bare cache
        got = generate_text(lm, query, 6, augment="off", context=CacheBank(tmp_path, lm).get_or_build(context))
        assert got.token_ids == expected.tokens[0].tolist()
        torch.testing.assert_close(got.logits, expected.logits[0], rtol=0, atol=0)


def _metadata_span(path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    return 8 + header_size, raw


def _flip_tensor_byte(path) -> None:
    data_start, raw = _metadata_span(path)
    raw = bytearray(raw)
    raw[data_start + (len(raw) - data_start) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit_header(path) -> None:
    data_start, raw = _metadata_span(path)
    header = raw[8:data_start].decode()
    edited = header.replace('\\"next_position\\": ', '\\"next_position\\": 1', 1)  # same JSON, another value
    edited = edited[: len(header)].ljust(len(header))  # keep the size: a still-parseable file
    assert edited != header
    path.write_bytes(raw[:8] + edited.encode() + raw[data_start:])


def _truncate(path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_flip_tensor_byte, "tensor data corrupted"),
        (_edit_header, "header was edited"),
        (_truncate, "unreadable"),
        (lambda path: path.write_bytes(b"not a safetensors file"), "unreadable"),
    ],
)
def test_damaged_entry_is_rejected_and_rebuilt(tmp_path, damage, reason):
    lm, ids = _lm(), _ids()
    with torch.no_grad():
        fresh = lm.augment(ids)
    CacheBank(tmp_path, lm).get_or_build(ids)
    path = CacheBank(tmp_path, lm).path_for(ids)
    damage(path)
    bank = CacheBank(tmp_path, lm)
    assert bank.get(ids) is None and bank.last_status.startswith("rejected") and reason in bank.last_status
    state = bank.get_or_build(ids)
    assert bank.last_status.startswith("rebuilt") and reason in bank.last_status
    assert torch.equal(state.logits, fresh.logits) and kv.caches_equal(state.cache, fresh.cache)
    again = CacheBank(tmp_path, lm)
    again.get_or_build(ids)
    assert again.last_status == "hit (disk)"  # the rebuilt file is whole again


def test_another_models_entry_is_never_used(tmp_path):
    ids = _ids()
    lm_a, lm_b = _lm(seed=2), _lm(seed=3)  # same base, other coprocessor weights
    bank_a, bank_b = CacheBank(tmp_path, lm_a), CacheBank(tmp_path, lm_b)
    bank_a.get_or_build(ids)
    assert bank_b.path_for(ids) != bank_a.path_for(ids)
    assert bank_b.get(ids) is None and bank_b.last_status == "miss"
    # a's file where b would look: refused, and b's own augmentation built in its place
    bank_b.path_for(ids).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(bank_a.path_for(ids), bank_b.path_for(ids))
    state = bank_b.get_or_build(ids)
    assert bank_b.last_status.startswith("rebuilt") and "another key" in bank_b.last_status
    with torch.no_grad():
        assert torch.equal(state.logits, lm_b.augment(ids).logits)
    # another architecture never shares a key with the same token ids
    assert CacheBank(tmp_path, _lm("llama")).key_for(ids) != bank_a.key_for(ids)


def test_entry_with_foreign_fingerprint_is_refused(tmp_path):
    ids = _ids()
    lm_a, lm_b = _lm(seed=2), _lm(seed=3)
    bank_a, bank_b = CacheBank(tmp_path / "a", lm_a), CacheBank(tmp_path / "b", lm_b)
    bank_a.get_or_build(ids)
    # even under b's own key (a header forged to claim it), a's fingerprint gives the entry away
    bank_a.key_for = bank_b.key_for
    bank_a.build(ids)
    shutil.copytree(tmp_path / "a", tmp_path / "b", dirs_exist_ok=True)
    assert bank_b.get(ids) is None and "another model" in bank_b.last_status
    assert "coprocessor_sha256" in bank_b.last_status


def test_add_text_and_cli(tmp_path, capsys):
    from cacheaug import load_base
    from cacheaug.cli import main

    base, tokenizer = load_base("tiny-random")
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=NUM_LATENTS))
    lm.save_pretrained(tmp_path / "ckpt")
    document = tmp_path / "doc.txt"
    document.write_text("A long context, augmented once and reused by later queries. " * 3)
    root = tmp_path / "bank"
    assert main(["bank", "add", "--ckpt", str(tmp_path / "ckpt"), "--root", str(root), str(document)]) == 0
    assert "built" in capsys.readouterr().out
    assert main(["bank", "add", "--ckpt", str(tmp_path / "ckpt"), "--root", str(root), str(document)]) == 0
    assert "hit (disk)" in capsys.readouterr().out
    entry = CacheBank(root, AugmentedLM.from_pretrained(tmp_path / "ckpt", base=base), tokenizer).add_text(
        document.read_text()
    )
    assert entry.status == "hit (disk)" and entry.path.is_file() and entry.num_tokens == len(document.read_text())
    too_long = tmp_path / "long.txt"
    too_long.write_text("x" * 2048)  # 2048 byte tokens + latents > the tiny model's 2048 positions
    assert main(["bank", "add", "--ckpt", str(tmp_path / "ckpt"), "--root", str(root), str(too_long)]) == 2
    assert "do not fit the model's context" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the longest banked prefix
def _assert_fresh(lm, state, prefix) -> None:
    """``state`` is what ``lm.augment(prefix)`` gives now, and decodes alike."""
    with torch.no_grad():
        fresh = lm.augment(prefix)
    torch.testing.assert_close(state.logits, fresh.logits, rtol=0, atol=1e-6)
    assert state.next_position == fresh.next_position and kv.caches_equal(state.cache, fresh.cache)
    torch.testing.assert_close(_decoded(lm, state).logits, _decoded(lm, fresh).logits, rtol=0, atol=1e-6)


def test_prefix_hashes_equal_the_headers_token_hash():
    from cacheaug.serving.bank import _prefix_sha256s, _sha256_json

    ids = _ids(length=30)[0].tolist()
    lengths = [1, 2, 7, 30, 31, 0]  # past the end and empty: left out
    assert _prefix_sha256s(ids, lengths) == {n: _sha256_json(ids[:n]) for n in (1, 2, 7, 30)}


def test_longest_prefix_picks_the_longer_nested_context(tmp_path):
    lm, prompt = _lm(), _ids(length=20)
    bank = CacheBank(tmp_path, lm)
    assert bank.longest_prefix(prompt) is None  # the index is built empty, then kept up to date by build
    bank.build(prompt[:, :6])
    bank.build(prompt[:, :12])
    state, length, status = bank.longest_prefix(prompt)
    assert (length, status) == (12, "hit (memory)")
    _assert_fresh(lm, state, prompt[:, :12])
    state, length, status = CacheBank(tmp_path, lm).longest_prefix(prompt[0].tolist())  # a 1D list; from disk
    assert (length, status) == (12, "hit (disk)")
    _assert_fresh(lm, state, prompt[:, :12])
    assert bank.longest_prefix(prompt[0, :9])[1] == 6  # the longer entry does not fit a shorter prompt
    with pytest.raises(InputError, match="one prompt"):
        bank.longest_prefix(torch.cat([prompt, prompt]))


def test_longest_prefix_matches_a_whole_prompt(tmp_path):
    lm, prompt = _lm(), _ids(length=10)
    CacheBank(tmp_path, lm).build(prompt)
    state, length, status = CacheBank(tmp_path, lm).longest_prefix(prompt)
    assert (length, status) == (10, "hit (disk)")
    _assert_fresh(lm, state, prompt)


def test_longest_prefix_without_a_match_is_none(tmp_path):
    lm, context = _lm(), _ids(length=8)
    assert CacheBank(tmp_path / "absent", lm).longest_prefix(context) is None
    CacheBank(tmp_path, lm).build(context)
    bank = CacheBank(tmp_path, lm)
    assert bank.longest_prefix(_ids(length=12, seed=5)) is None  # other tokens
    assert bank.longest_prefix(context[:, :7]) is None  # the prompt is a prefix of the entry, not the reverse


def test_a_prompt_diverging_inside_a_banked_context_does_not_match_it(tmp_path):
    lm, prompt = _lm(), _ids(length=16)
    bank = CacheBank(tmp_path, lm)
    bank.build(prompt[:, :12])
    diverging = prompt.clone()
    diverging[0, 8] = (diverging[0, 8] + 1) % VOCAB  # one token inside the banked 12 differs
    assert bank.longest_prefix(diverging) is None
    bank.build(prompt[:, :4])
    state, length, _ = bank.longest_prefix(diverging)
    assert length == 4
    _assert_fresh(lm, state, prompt[:, :4])


def test_a_damaged_longest_entry_falls_back_to_the_shorter(tmp_path, caplog):
    lm, prompt = _lm(), _ids(length=16)
    writer = CacheBank(tmp_path, lm)
    writer.build(prompt[:, :5])
    writer.build(prompt[:, :11])
    _flip_tensor_byte(writer.path_for(prompt[:, :11]))
    bank = CacheBank(tmp_path, lm)
    with caplog.at_level("WARNING", logger="cacheaug.serving.bank"):
        state, length, status = bank.longest_prefix(prompt)
    assert (length, status) == (5, "hit (disk)") and "tensor data corrupted" in caplog.text
    _assert_fresh(lm, state, prompt[:, :5])
    caplog.clear()
    assert bank.longest_prefix(prompt)[1] == 5 and "rejecting" not in caplog.text  # not read again
    bank.get_or_build(prompt[:, :11])  # rebuilt: matched again
    assert bank.last_status.startswith("rebuilt") and bank.longest_prefix(prompt)[1] == 11


def test_an_entry_another_bank_wrote_is_found_after_refresh_index(tmp_path):
    lm, prompt = _lm(), _ids(length=14)
    server = CacheBank(tmp_path, lm)
    assert server.longest_prefix(prompt) is None
    CacheBank(tmp_path, lm).build(prompt[:, :9])  # another process, e.g. `cacheaug bank add`
    assert server.longest_prefix(prompt) is None  # the index is not rescanned on every lookup
    assert server.refresh_index() == 1
    state, length, status = server.longest_prefix(prompt)
    assert (length, status) == (9, "hit (disk)")
    _assert_fresh(lm, state, prompt[:, :9])


def test_longest_prefix_never_matches_another_models_entries(tmp_path):
    prompt = _ids(length=14)
    lm_a, lm_b = _lm(seed=2), _lm(seed=3)  # same base, other coprocessor weights
    CacheBank(tmp_path, lm_a).build(prompt[:, :10])
    bank_b = CacheBank(tmp_path, lm_b)
    assert bank_b.longest_prefix(prompt) is None and bank_b.refresh_index() == 0
    bank_b.build(prompt[:, :3])
    state, length, _ = bank_b.longest_prefix(prompt)  # its own shorter entry, not a's longer one
    assert length == 3
    _assert_fresh(lm_b, state, prompt[:, :3])


def test_threads_share_a_bank(tmp_path):
    import threading

    lm, prompt = _lm(), _ids(length=18)
    lengths = (4, 9, 13)  # nested contexts, all prefixes of the prompt
    with torch.no_grad():
        fresh = {n: lm.augment(prompt[:, :n]) for n in lengths}
    bank = CacheBank(tmp_path, lm, memory_entries=2)  # evictions: disk loads too
    built, augment = [], lm.augment
    lm.augment = lambda ids: built.append(ids.shape[1]) or augment(ids)
    start, errors, results = threading.Barrier(8), [], []

    def worker(thread: int) -> None:
        try:
            start.wait()
            for call in range(10):
                length = lengths[(thread + call) % len(lengths)]
                if (thread + call) % 2:
                    results.append((length, bank.get_or_build(prompt[:, :length])))
                elif (found := bank.longest_prefix(prompt)) is not None:
                    results.append(found[:2][::-1])
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) >= 40
    for length, state in results:  # whatever was banked when asked, each answer is that prefix's state
        torch.testing.assert_close(state.logits, fresh[length].logits, rtol=0, atol=1e-6)
        assert kv.caches_equal(state.cache, fresh[length].cache)
    state, length, _ = bank.longest_prefix(prompt)
    assert length == 13 and kv.caches_equal(state.cache, fresh[13].cache)
    assert sorted(built) == list(lengths)  # each context built once: the others waited and found it
