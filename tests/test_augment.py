"""Inference-side guarantees: caches untouched, base unchanged, decoding equals recomputation."""

from __future__ import annotations

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig
from cacheaug.config import PAPER_RECIPE
from cacheaug import cache as kv
from cacheaug.generate import decode
from conftest import VOCAB, make_base


def _lm(arch: str, **config) -> AugmentedLM:
    lm = AugmentedLM(make_base(arch), CoprocessorConfig(**{"num_latents": 4, **PAPER_RECIPE, **config}))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in lm.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return lm


def _prompt(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


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


def test_callers_cache_is_not_mutated(arch):
    lm = _lm(arch)
    prompt = _prompt(length=9)
    state = lm.prefill(prompt)
    snapshot = [(k.clone(), v.clone()) for k, v in kv.cache_tensors(state.cache)]
    before = kv.copy_cache(state.cache)
    with torch.no_grad():
        augmented = lm.augment(cache=state.cache)
        extended = lm.augment(_prompt(length=3, seed=5), cache=state.cache)
    assert kv.caches_equal(state.cache, before)
    for (k, v), (k0, v0) in zip(kv.cache_tensors(state.cache), snapshot):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    assert kv.cache_length(augmented.cache) == 9 + lm.config.num_latents == augmented.next_position
    assert kv.cache_length(extended.cache) == 12 + lm.config.num_latents


def test_augment_from_cache_equals_augment_from_ids(arch):
    lm = _lm(arch)
    prompt = _prompt()
    with torch.no_grad():
        direct = lm.augment(prompt)
        via_cache = lm.augment(cache=lm.prefill(prompt).cache)
        in_two_parts = lm.augment(prompt[:, 6:], cache=lm.prefill(prompt[:, :6]).cache)
    torch.testing.assert_close(direct.logits, via_cache.logits, rtol=0, atol=0)
    torch.testing.assert_close(direct.logits, in_two_parts.logits, rtol=1e-5, atol=1e-5)


def test_optimizer_step_changes_only_coprocessor():
    for arch in ("llama", "gemma2", "gpt2"):
        lm = _lm(arch, num_ahead=3, num_points=3)
        base_before = {name: p.clone() for name, p in lm.base.named_parameters()}
        copro_before = {name: p.clone() for name, p in lm.coprocessor.named_parameters()}
        optimizer = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
        lm.train()
        assert not lm.base.training and lm.coprocessor.training
        loss = lm.training_loss(_prompt(length=16)).loss
        loss.backward()
        optimizer.step()
        assert all(p.grad is None for p in lm.base.parameters())
        for name, p in lm.base.named_parameters():
            assert torch.equal(p, base_before[name]), name
        changed = [name for name, p in lm.coprocessor.named_parameters() if not torch.equal(p, copro_before[name])]
        assert "soft_tokens" in changed and len(changed) == len(copro_before)


def test_augmentation_changes_the_prediction():
    lm = _lm("llama")
    prompt = _prompt()
    with torch.no_grad():
        assert not torch.allclose(lm.augment(prompt).logits, lm.prefill(prompt).logits)


def test_coprocessor_has_no_embedding_table_or_head():
    lm = _lm("gemma3")
    names = [name for name, _ in lm.coprocessor.named_parameters()]
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    gpt2 = _lm("gpt2")
    names = [name for name, _ in gpt2.coprocessor.named_parameters()]
    assert not any(".wte." in n for n in names) and any(".wpe." in n for n in names)


def test_scratch_and_lora_initialisation():
    base_weights = _lm("llama").base.model.layers[0].mlp.up_proj.weight
    scratch = AugmentedLM(make_base("llama"), CoprocessorConfig(init="scratch", **PAPER_RECIPE))
    assert not torch.equal(scratch.coprocessor.stack.layers[0].mlp.up_proj.weight, base_weights)
    lora = AugmentedLM(make_base("llama"), CoprocessorConfig(lora_rank=4, **PAPER_RECIPE))
    trainable = [name for name, p in lora.coprocessor.named_parameters() if p.requires_grad]
    assert "soft_tokens" in trainable and all("lora_" in n for n in trainable if n not in ("soft_tokens", "latent_scale"))
    assert "trainable" in lora.trainable_summary()


def test_pause_tokens_are_the_latents():
    lm = _lm("gemma3", method="pause")
    assert lm.coprocessor.stack is None and [n for n, _ in lm.coprocessor.named_parameters()] == ["soft_tokens"]
    state = lm.augment(_prompt())
    assert torch.equal(state.latents[0], lm.coprocessor.soft_tokens) and torch.equal(state.latents[1], state.latents[0])


def test_soft_tokens_start_at_the_embedding_scale():
    from cacheaug.coprocessor import embedding_output_std

    lm = _lm("gemma3")
    expected = embedding_output_std(lm.base)  # Gemma scales embeddings by sqrt(hidden)
    assert 0.5 * expected < lm.coprocessor.soft_tokens.std().item() < 2.0 * expected


def test_scaled_latents_enter_at_the_embedding_scale():
    from cacheaug.coprocessor import embedding_output_std

    lm = _lm("llama", scale_latents=True)
    assert lm.coprocessor.latent_scale.shape == (1,) and lm.coprocessor.latent_scale.requires_grad
    with torch.no_grad():
        raw = AugmentedLM(make_base("llama"), CoprocessorConfig(num_latents=4, **PAPER_RECIPE)).augment(_prompt()).latents
        scaled = lm.augment(_prompt()).latents
    expected = embedding_output_std(lm.base)
    assert 0.3 * expected < scaled.std().item() < 3 * expected
    assert _lm("llama").coprocessor.latent_scale is None and raw.shape == scaled.shape


def test_sampling_is_seeded():
    lm = _lm("qwen3")
    prompt = _prompt()
    a = lm.generate(prompt, 6, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    b = lm.generate(prompt, 6, do_sample=True, temperature=0.9, top_p=0.8, seed=7)
    assert torch.equal(a, b) and a.shape == (2, prompt.shape[1] + 6)


def test_augment_input_errors():
    lm = _lm("llama")
    with pytest.raises(ValueError, match="needs input_ids"):
        lm.augment()
    with pytest.raises(ValueError, match="input_ids must be"):
        lm.augment(torch.zeros(3, dtype=torch.long))
