"""The coprocessor and AugmentedLM (arXiv 2412.17747 sections 2.2-2.3): the one-pass block-masked loss and its
gradients equal the point-by-point definition for every architecture; the base stays frozen; the coprocessor's
variants (scratch, LoRA, pause tokens, scaled latents) are what they say."""

from __future__ import annotations

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig
from helpers import PAPER, POINT_SETS, VOCAB, assert_equivalent, make_base, perturbed_lm, prompt_ids


def _perturbed(arch: str, **config) -> AugmentedLM:
    """A coprocessor that no longer equals the base copy, so its gradients are generic."""
    return perturbed_lm(arch, seed=1, **config)


def _lm(arch: str, **config) -> AugmentedLM:
    return perturbed_lm(arch, seed=2, **{**PAPER, "num_latents": 4, **config})


def _prompt(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return prompt_ids(batch, length, seed)


@pytest.mark.parametrize("point_set", range(len(POINT_SETS)))
def test_one_pass_equals_reference(arch, point_set):
    lm = _perturbed(arch, num_latents=3, num_ahead=4, num_points=5)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(point_set))
    assert_equivalent(lm, input_ids, torch.tensor(POINT_SETS[point_set]))


def test_sampled_points_have_full_ahead_windows():
    lm = _perturbed("llama", num_latents=2, num_ahead=3, num_points=6)
    points = lm.sample_points(64, 10, torch.Generator().manual_seed(0))
    assert points.shape == (64, 6)
    assert points.min() == 0 and points.max() == 6  # 0..T-1-N_A: every point scores N_A tokens
    assert all(len(set(row.tolist())) == 6 for row in points)  # distinct points per sequence
    assert lm.training_loss(torch.randint(0, VOCAB, (64, 10)), points).num_tokens == 64 * 6 * 3


def test_unaugmented_loss_scores_the_same_targets():
    lm = _perturbed("gemma2", num_latents=2, num_ahead=3)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    points = torch.tensor([[0, 5, 10], [3, 8, 9]])
    got = lm.unaugmented_loss(input_ids, points)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in range(2):
            for point in points[row].tolist():
                targets = input_ids[row, point + 1 : point + 4]
                logits = lm.base(input_ids=input_ids[row : row + 1, : point + len(targets)]).logits[0, point:]
                nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                count += len(targets)
    assert got.num_tokens == count
    assert abs(got.loss.item() - nll / count) < 1e-5


@pytest.mark.parametrize(
    "config",
    [
        dict(num_layers=1),
        dict(latents_after_norm=False),
        dict(init="scratch"),
        dict(lora_rank=4),
        dict(num_latents=1, num_ahead=1),
        dict(method="pause"),
        dict(scale_latents=True),
    ],
    ids=["first-layer", "pre-norm", "scratch", "lora", "one-latent-one-ahead", "pause-tokens", "scaled-latents"],
)
def test_variants_equal_reference(config):
    for arch in ("llama", "gemma3"):
        lm = _perturbed(arch, **{"num_latents": 3, "num_ahead": 4, "num_points": 4, **config})
        input_ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
        assert_equivalent(lm, input_ids, torch.tensor([[0, 5, 11, 14]]))


def test_bad_points_are_rejected():
    lm = _perturbed("llama", num_latents=2, num_ahead=2)
    input_ids = torch.randint(0, VOCAB, (1, 10))
    with pytest.raises(ValueError, match="0..8"):
        lm.training_loss(input_ids, torch.tensor([[9]]))
    with pytest.raises(ValueError, match="points must be"):
        lm.training_loss(input_ids, torch.tensor([1, 2]))


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


def test_coprocessor_has_no_embedding_table_or_head():
    lm = _lm("gemma3")
    names = [name for name, _ in lm.coprocessor.named_parameters()]
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    gpt2 = _lm("gpt2")
    names = [name for name, _ in gpt2.coprocessor.named_parameters()]
    assert not any(".wte." in n for n in names) and any(".wpe." in n for n in names)


def test_scratch_and_lora_initialisation():
    base_weights = _lm("llama").base.model.layers[0].mlp.up_proj.weight
    scratch = AugmentedLM(make_base("llama"), CoprocessorConfig(init="scratch"))
    assert not torch.equal(scratch.coprocessor.stack.layers[0].mlp.up_proj.weight, base_weights)
    lora = AugmentedLM(make_base("llama"), CoprocessorConfig(lora_rank=4))
    trainable = [name for name, p in lora.coprocessor.named_parameters() if p.requires_grad]
    assert "soft_tokens" in trainable and all("lora_" in n for n in trainable if n not in ("soft_tokens", "latent_scale", "gate"))
    assert "trainable" in lora.trainable_summary()


def test_pause_tokens_are_the_latents():
    lm = _lm("gemma3", method="pause")
    assert lm.coprocessor.stack is None and [n for n, _ in lm.coprocessor.named_parameters()] == ["soft_tokens"]
    state = lm.augment(_prompt())
    assert torch.equal(state.latents[0], lm.coprocessor.soft_tokens) and torch.equal(state.latents[1], state.latents[0])


def test_soft_tokens_start_at_the_embedding_scale():
    from cacheaug.models import embedding_output_std

    lm = _lm("gemma3")
    expected = embedding_output_std(lm.base)  # Gemma scales embeddings by sqrt(hidden)
    assert 0.5 * expected < lm.coprocessor.soft_tokens.std().item() < 2.0 * expected


def test_scaled_latents_enter_at_the_embedding_scale():
    from cacheaug.models import embedding_output_std

    lm = _lm("llama", scale_latents=True)
    assert lm.coprocessor.latent_scale.shape == (1,) and lm.coprocessor.latent_scale.requires_grad
    with torch.no_grad():
        raw = AugmentedLM(make_base("llama"), CoprocessorConfig(num_latents=4)).augment(_prompt()).latents
        scaled = lm.augment(_prompt()).latents
    expected = embedding_output_std(lm.base)
    assert 0.3 * expected < scaled.std().item() < 3 * expected
    assert _lm("llama").coprocessor.latent_scale is None and raw.shape == scaled.shape
