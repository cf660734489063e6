"""The decode loop and its two front-ends: decoding equals a full recompute (one row and padded rows, with the
latents inserted at once or after a delay, both readouts), augmentation off is bit-identical to the plain
model, rows that finish leave the batch without changing the others, stop strings and EOS end a text."""

from __future__ import annotations

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig, load_base
from cacheaug.eval.likelihood import encode
from cacheaug.generate import DecodeLoop, decode, generate_until
from cacheaug.state import context_state, padded_context_states, prefill_rows
from helpers import PAPER, biased_head, byte_vocab_base, full_recompute, make_base, perturbed_lm, prompt_ids

PAPER_RECIPE = PAPER  # the layout test_incremental_decoding_equals_full_recompute recomputes


def _lm(arch: str, **config) -> AugmentedLM:
    return perturbed_lm(arch, seed=2, **{**PAPER, "num_latents": 4, **config})


def _prompt(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return prompt_ids(batch, length, seed)


def test_incremental_decoding_equals_full_recompute(arch):
    lm = _lm(arch)
    prompt = _prompt()
    with torch.no_grad():
        state = lm.augment(prompt)
        latents = state.latents
        out = decode(lm.base, state, max_new_tokens=8)
        # One pass, no cache, over [prefix ; latents ; generated tokens but the last].
        embed = lm.base.get_input_embeddings()
        sequence = torch.cat([embed(prompt), latents, embed(out.tokens[:, :-1])], dim=1)
        full = lm.base(inputs_embeds=sequence).logits
    first_scored = prompt.shape[1] + lm.config.num_latents - 1  # the last latent predicts token 1
    torch.testing.assert_close(out.logits, full[:, first_scored:], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.tokens, full[:, first_scored:].argmax(-1))


def test_augment_off_is_bit_identical_to_plain_model(arch):
    lm = _lm(arch)
    # The same weights, never wrapped, frozen as load_base returns every model. (Whether parameters
    # require grad changes which CPU matmul kernel runs, even under no_grad, and so the last bit.)
    plain = make_base(arch).requires_grad_(False)
    prompt = _prompt()
    with torch.no_grad():
        ours = lm.generate(prompt, max_new_tokens=6, augment=False)
        # plain HF forward calls with its own cache handling; logits_to_keep=1 as in HF generate (an LM
        # head over all T rows rounds differently in the last bit)
        ids = prompt
        reference_logits = []
        cache = None
        step_input = ids
        for _ in range(6):
            out = plain(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            reference_logits.append(out.logits[:, -1])
            step_input = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step_input], dim=1)
        state = lm.prefill(prompt)
        ours_logits = decode(lm.base, state, max_new_tokens=6).logits
        hf_generate = plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        full_lm, full_plain = lm.base(prompt).logits, plain(prompt).logits
    assert torch.equal(ours, ids) and torch.equal(ours, hf_generate)
    assert torch.equal(full_lm, full_plain)
    assert torch.equal(ours_logits, torch.stack(reference_logits, dim=1))
    # the wrapped base's weights are the plain model's, bit for bit
    for (name, a), (_, b) in zip(lm.base.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_sampling_is_seeded():
    lm = _lm("qwen3")
    prompt = _prompt()
    a = lm.generate(prompt, 6, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    b = lm.generate(prompt, 6, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    assert torch.equal(a, b) and a.shape == (2, prompt.shape[1] + 6)


def test_generation_stops_at_stop_sequences_and_eos():
    base, tokenizer = load_base("tiny-random")
    base.lm_head = biased_head(base.lm_head, ord("z"))  # greedy decoding writes "zzzz..."
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=3)).eval()
    prompt = encode(tokenizer, "Question: hi")
    state = context_state(lm, prompt, True)
    start = state.next_position
    assert generate_until(lm, tokenizer, state, 7, ["Q"]) == "z" * 7
    assert state.next_position == start + 6  # the last token is returned, not fed
    state = context_state(lm, prompt, True)
    assert generate_until(lm, tokenizer, state, 20, ["\n\n", "zzz"]) == ""  # cut before the stop sequence
    assert state.next_position == start + 2
    base.lm_head = biased_head(base.lm_head, tokenizer.eos_token_id, 100.0)
    assert generate_until(lm, tokenizer, context_state(lm, prompt, False), 20) == ""


@pytest.mark.parametrize("recipe", ["paper", "token_gate"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3", "gemma3", "mistral"])
@torch.no_grad()
def test_batched_generation_equals_one_by_one(arch, recipe):
    # Padded rows of different lengths on the shared exemplar cache give the texts and logits of each prompt
    # decoded alone: plain, augmented, and with the latents delayed by 2 tokens (as the async Generation).
    from cacheaug.generate import cut_at_stop, generate_until_batch
    from cacheaug.state import padded_batches_are_exact, padded_context_states
    from cacheaug.stream import generate_text
    from cacheaug.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    options = PAPER if recipe == "paper" else {"readout": "token", "latent_gate": True}
    lm = AugmentedLM(byte_vocab_base(arch), CoprocessorConfig(num_latents=3, num_ahead=3, **options)).eval()
    for parameter in lm.coprocessor.parameters():  # a coprocessor that is not the base's copy
        parameter.add_(0.05 * torch.randn_like(parameter))
    exact = padded_batches_are_exact(lm.base.config)
    assert exact == (arch in ("llama", "gpt2", "qwen3"))
    prefix = encode(tokenizer, "Question: shared exemplars.\n\n")
    shared = lm.prefill(torch.tensor([prefix])).cache
    contexts = [encode(tokenizer, text) for text in ("Q: a?", "Question: a longer one here?", "Q?", "Question: mid")]
    batches = [contexts] if exact else [[context] for context in contexts]
    alone = [generate_until(lm, tokenizer, context_state(lm, ids, False, shared), 14) for ids in contexts]
    # a stop string the rows reach at different steps (or never), so finished rows leave the batch mid-way
    candidates = sorted({char for text in alone for char in text if char != "\ufffd"})
    stop = next([char] for char in candidates if len({len(cut_at_stop(text, [char])) for text in alone}) > 1)
    for augment, delay in ((False, None), (True, None), (True, 2)):
        got = []
        for batch in batches:
            state = padded_context_states(lm, batch, augment, shared, delay=delay)
            if delay is None:
                for row, ids in enumerate(batch):
                    single = context_state(lm, ids, augment, shared)
                    assert int(state.next_position[row]) == single.next_position
                    torch.testing.assert_close(state.logits[row], single.logits[0], rtol=1e-4, atol=1e-5)
            got += generate_until_batch(lm, tokenizer, state, 14, stop)
        if delay is None:
            expected = [generate_until(lm, tokenizer, context_state(lm, ids, augment, shared), 14, stop) for ids in contexts]
        else:
            from cacheaug.state import AugmentedCache

            expected = []
            for ids in contexts:
                context = AugmentedCache(shared, len(prefix), torch.zeros(1, 257))
                expected.append(generate_text(
                    lm, torch.tensor([ids]), 14, augment="async", async_delay_tokens=delay, stop=stop,
                    tokenizer=tokenizer, context=context, eos_token_id=tokenizer.eos_token_id,
                ).text)
        assert got == expected, (augment, delay)
        if not augment:
            assert got == [cut_at_stop(text, stop) for text in alone]


@pytest.mark.parametrize("recipe", ["paper", "token_gate"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])  # no sliding window: padded rows are exact
@pytest.mark.parametrize("delay", [None, 2])
@torch.no_grad()
def test_padded_rows_decode_as_a_full_recompute_of_each_row(arch, recipe, delay):
    # Rows of different lengths, padded, latents inserted at once or after 2 tokens; a row that finishes at
    # EOS leaves the batch. Every step's logits of every row = one cacheless forward over that row alone.
    options = PAPER if recipe == "paper" else {"readout": "token", "latent_gate": True}
    lm = perturbed_lm(arch, seed=4, num_latents=3, **options).eval()
    rows = [prompt_ids(1, length, seed)[0].tolist() for length, seed in ((5, 1), (9, 2), (3, 3))]
    state = padded_context_states(lm, rows, augment=True, delay=delay)
    latents = state.latents if delay is None else state.pending  # (B, N_L, H)
    first = DecodeLoop(lm, padded_context_states(lm, rows, augment=True, delay=delay), 6)
    eos = int(next(iter(first)).tokens[1])  # row 1's first token: that row stops at once
    steps = list(DecodeLoop(lm, state, 6, eos_token_id=eos))
    assert len(steps[1].rows) < len(rows)  # a finished row left the batch
    for row, ids in enumerate(rows):
        picked = [(int(s.tokens[list(s.rows).index(row)]), s.logits[list(s.rows).index(row)]) for s in steps
                  if row in s.rows.tolist()]
        tokens = [token for token, _ in picked]
        insertions = [0 if delay is None else delay]
        expected = full_recompute(lm, torch.tensor([ids]), tokens, insertions, [latents[row : row + 1]])
        torch.testing.assert_close(torch.stack([logits for _, logits in picked]), expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_prefill_rows_equals_each_row_alone(arch):
    lm = perturbed_lm(arch, seed=4, num_latents=3, **PAPER)
    rows = [prompt_ids(1, length, seed)[0].tolist() for length, seed in ((5, 1), (9, 2))]
    state = prefill_rows(lm.base, rows)
    for row, ids in enumerate(rows):
        alone = lm.base(input_ids=torch.tensor([ids])).logits[0, -1]
        assert int(state.next_position[row]) == len(ids)
        torch.testing.assert_close(state.logits[row], alone, rtol=1e-4, atol=1e-4)
