"""Streamed decoding: equal to batch decoding, async/delayed/repeated augmentation equal to their recomputation,
and a coprocessor that fails, hangs or is absent never fails the generation."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig
from cacheaug.config import PAPER_RECIPE
from cacheaug import cache as kv
from cacheaug.generate import FinishEvent, TextStream, TokenEvent, decode, generate_text, latents_for, prefill, stream
from cacheaug.models import byte_tokenizer
from conftest import VOCAB, make_base

NUM_LATENTS = 4


def _lm(arch: str = "llama") -> AugmentedLM:
    lm = AugmentedLM(make_base(arch), CoprocessorConfig(num_latents=NUM_LATENTS, **PAPER_RECIPE))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a visible effect of the latents, as after training
        for parameter in lm.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return lm


def _prompt(length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _events(generation) -> tuple[list[TokenEvent], FinishEvent]:
    events = list(generation)
    assert isinstance(events[-1], FinishEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
    return events[:-1], events[-1]


def _logits(tokens: list[TokenEvent]) -> torch.Tensor:
    return torch.stack([event.logits for event in tokens])  # (n, V)


def _full_recompute(lm, prompt: torch.Tensor, tokens: list[int], insertions: list[int], latents: list[torch.Tensor]):
    """One cacheless pass over [prompt ; ... latents inserted before token i ... ; tokens but the last]:
    (n, V) logits that predicted each generated token."""
    embed = lm.base.get_input_embeddings()
    pieces, predicting = [embed(prompt)], []
    length = prompt.shape[1]
    for index, token in enumerate(tokens):
        if index in insertions:
            block = latents[insertions.index(index)]  # (1, N_L, H)
            pieces.append(block)
            length += block.shape[1]
        predicting.append(length - 1)
        if index < len(tokens) - 1:
            pieces.append(embed(torch.tensor([[token]])))
            length += 1
    with torch.no_grad():
        full = lm.base(inputs_embeds=torch.cat(pieces, dim=1)).logits[0]  # (L, V)
    return full[predicting]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("sample", [False, True])
def test_stream_equals_batch_generation(arch, sample):
    lm, prompt = _lm(arch), _prompt()
    options = dict(do_sample=sample, temperature=0.8, top_p=0.9, seed=7)
    for augment in ("off", "sync"):
        with torch.no_grad():
            expected = lm.generate(prompt, 12, augment=augment == "sync", **options)[0, prompt.shape[1] :]
            state = lm.augment(prompt) if augment == "sync" else lm.prefill(prompt)
            expected_logits = decode(lm.base, state, 12, **options).logits[0]
        tokens, finish = _events(stream(lm, prompt, 12, augment=augment, **options))
        assert [e.token_id for e in tokens] == expected.tolist() == finish.token_ids
        assert torch.equal(_logits(tokens), expected_logits)
        assert finish.finish_reason == "length"
        assert finish.augmentation == ("applied" if augment == "sync" else "off")
        assert all(e.augmented == (augment == "sync") for e in tokens)


def test_eos_ends_the_stream_like_decode():
    lm, prompt = _lm(), _prompt()
    greedy = generate_text(lm, prompt, 10).token_ids
    eos = greedy[4]
    with torch.no_grad():
        expected = decode(lm.base, lm.augment(prompt), 10, eos_token_id=eos).tokens[0].tolist()
    completion = generate_text(lm, prompt, 10, eos_token_id=eos)
    assert completion.token_ids == expected == greedy[: greedy.index(eos) + 1]
    assert completion.finish_reason == "eos"


def test_stop_strings_cut_the_text_and_are_never_streamed():
    base, tokenizer = make_base("llama"), byte_tokenizer()
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=NUM_LATENTS))
    prompt = torch.tensor([list(b"The answer is")])
    full = generate_text(lm, prompt, 24, tokenizer=tokenizer)
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[5:8]
    assert len(stop) == 3
    pieces = [event.text for event in stream(lm, prompt, 24, tokenizer=tokenizer, stop=["zzzz", stop])]
    text = "".join(pieces)
    assert text == full.text[: full.text.find(stop)]
    completion = generate_text(lm, prompt, 24, tokenizer=tokenizer, stop=[stop])
    assert completion.text == text and completion.finish_reason == "stop"
    assert all(stop not in piece for piece in pieces)


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    tokenizer = byte_tokenizer()
    text = "héllo wörld 😀 stop here"
    ids = list(text.encode())
    stream_ = TextStream(tokenizer)
    pieces = [stream_.push(i) for i in ids] + [stream_.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    stopping = TextStream(tokenizer, stop=["😀 st"])
    released = []
    for i in ids:
        released.append(stopping.push(i))
        if stopping.stopped:
            break
    released.append(stopping.flush())
    assert "".join(released) == "héllo wörld " and stopping.stopped
    cut = TextStream(tokenizer)
    assert [cut.push(i) for i in "😀".encode()[:3]] == ["", "", ""] and cut.flush() == "\ufffd"


def test_async_finished_before_the_first_token_equals_sync():
    lm, prompt = _lm("gemma3"), _prompt(length=11)
    sync_tokens, sync_finish = _events(stream(lm, prompt, 10, augment="sync"))
    generation = stream(lm, prompt, 10, augment="async")
    assert generation.wait_for_latents(timeout=30)
    tokens, finish = _events(generation)
    assert finish.augmentation == "applied" and finish.insertions == [0]
    assert [e.token_id for e in tokens] == [e.token_id for e in sync_tokens]
    assert torch.equal(_logits(tokens), _logits(sync_tokens))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_async_delay_inserts_latents_at_the_current_position(arch):
    lm, prompt = _lm(arch), _prompt(length=8)
    delay = 3
    generation = stream(lm, prompt, 9, augment="async", async_delay_tokens=delay)
    tokens, finish = _events(generation)
    assert finish.augmentation == "applied" and finish.insertions == [delay]
    assert [e.augmented for e in tokens] == [False] * delay + [True] * (9 - delay)
    with torch.no_grad():  # computed on the PROMPT's cache, inserted after the delay's tokens
        expected_latents = latents_for(lm, prefill(lm.base, prompt).cache)
    assert torch.equal(generation.latents[0], expected_latents)
    ids = [e.token_id for e in tokens]
    full = _full_recompute(lm, prompt, ids, [delay], generation.latents)
    torch.testing.assert_close(_logits(tokens), full, rtol=1e-4, atol=1e-4)
    assert kv.cache_length(generation.state.cache) == prompt.shape[1] + NUM_LATENTS + len(ids) - 1


@pytest.mark.parametrize("augment", ["sync", "async"])
def test_raising_coprocessor_gives_the_unaugmented_completion(augment):
    lm, prompt = _lm(), _prompt()

    def broken(cache):
        raise RuntimeError("coprocessor exploded")

    off_tokens, _ = _events(stream(lm, prompt, 8, augment="off"))
    generation = stream(lm, prompt, 8, augment=augment, latents_fn=broken)
    generation.wait_for_latents(timeout=30)
    tokens, finish = _events(generation)
    assert finish.augmentation == "failed: RuntimeError: coprocessor exploded"
    assert finish.insertions == [] and not any(e.augmented for e in tokens)
    assert [e.token_id for e in tokens] == [e.token_id for e in off_tokens]
    assert torch.equal(_logits(tokens), _logits(off_tokens))


@pytest.mark.parametrize("augment", ["sync", "async"])
def test_hanging_coprocessor_times_out_unaugmented(augment):
    lm, prompt = _lm(), _prompt()
    release = threading.Event()

    def hanging(cache):
        release.wait(timeout=60)
        return latents_for(lm, cache)

    off = generate_text(lm, prompt, 8, augment="off")
    try:
        start = time.monotonic()
        tokens = []
        for event in stream(lm, prompt, 8, augment=augment, latents_fn=hanging, augment_timeout_s=0.2):
            tokens.append(event)
            time.sleep(0.04)  # a slow reader: decoding outlasts the timeout
        elapsed = time.monotonic() - start
    finally:
        release.set()
    finish = tokens.pop()
    assert finish.augmentation == "timed out" and finish.insertions == []
    assert [e.token_id for e in tokens] == off.token_ids
    assert torch.equal(_logits(tokens), off.logits)
    assert elapsed < 5


def test_absent_coprocessor_decodes_unaugmented():
    lm, prompt = _lm(), _prompt()
    off = generate_text(lm, prompt, 6, augment="off")
    plain = generate_text(lm.base, prompt, 6, augment="async")  # a bare base model: no coprocessor at all
    assert plain.augmentation == "failed: no coprocessor"
    assert plain.token_ids == off.token_ids and torch.equal(plain.logits, off.logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_reaugment_every_k_tokens_equals_full_recompute(arch):
    lm, prompt = _lm(arch), _prompt(length=7)
    generation = stream(lm, prompt, 10, augment="sync", reaugment_every=3)
    tokens, finish = _events(generation)
    assert finish.augmentation == "applied" and finish.insertions == [0, 3, 6, 9]
    ids = [e.token_id for e in tokens]
    # the cache grew by N_L at each insertion, plus every fed token (all but the last)
    assert kv.cache_length(generation.state.cache) == prompt.shape[1] + 4 * NUM_LATENTS + len(ids) - 1
    assert generation.state.next_position == kv.cache_length(generation.state.cache)
    assert len({tuple(block.flatten()[:4].tolist()) for block in generation.latents}) == 4  # each one new
    full = _full_recompute(lm, prompt, ids, finish.insertions, generation.latents)
    torch.testing.assert_close(_logits(tokens), full, rtol=1e-4, atol=1e-4)
    assert ids == full.argmax(-1).tolist()


def test_stream_after_a_stored_context_equals_augment_then_prefill():
    lm = _lm()
    context, query = _prompt(length=10, seed=1), _prompt(length=4, seed=2)
    with torch.no_grad():
        state = lm.augment(context)
        expected = decode(lm.base, lm.prefill(query, state.cache), 6).tokens[0].tolist()
    before = kv.copy_cache(state.cache)
    completion = generate_text(lm, query, 6, augment="off", context=state)
    assert completion.token_ids == expected
    with torch.no_grad():
        straight = decode(lm.base, lm.augment(context), 6).tokens[0].tolist()
    empty = torch.zeros(1, 0, dtype=torch.long)
    assert generate_text(lm, empty, 6, augment="off", context=state).token_ids == straight
    assert kv.caches_equal(state.cache, before)  # the context is reusable
