"""The do-no-harm recipe: x_t read again after the latents (readout="token") and a zero-initialised gate on
the latent keys (latent_gate). One-pass loss = point-by-point definition, decoding = a full recompute, and
at the gates' initial value the augmented base equals the plain one."""

from __future__ import annotations

import pytest
import torch

from cacheaug import AugmentedLM
from cacheaug.stream import generate_text, stream
from helpers import POINT_SETS, VOCAB, assert_equivalent, full_recompute, perturbed_lm

RECIPES = {
    "token": {"readout": "token"},
    "token_gate": {"readout": "token", "latent_gate": True},
    "latent_gate": {"latent_gate": True},
    "residual": {"readout": "token", "latent_gate": True, "latent_residual": True},
    "residual_open": {"readout": "token", "latent_gate": True, "latent_residual": True, "latent_residual_init": 1.0},
    "residual_matrix": {
        "readout": "token", "latent_gate": True, "latent_residual": True, "latent_residual_init": 0.7,
        "latent_residual_matrix": True,
    },
}


def _lm(arch: str, perturb: bool = True, **config) -> AugmentedLM:
    """Gates open, coprocessor no longer the base's copy (perturb): gradients and latents are generic."""
    return perturbed_lm(arch, seed=1, scale=0.3 if perturb else 0, num_latents=3, num_ahead=4, num_points=5, **config)


FULL_ATTENTION = ["llama", "qwen3", "gpt2"]  # no sliding window, whose slots the latents would share


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("point_set", [0, 1])
def test_one_pass_equals_reference(arch, recipe, point_set):
    lm = _lm(arch, **RECIPES[recipe])
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(point_set))
    assert_equivalent(lm, input_ids, torch.tensor(POINT_SETS[point_set]))


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_closed_gates_leave_the_base_exactly_as_it_is(arch):
    lm = _lm(arch, perturb=False, readout="token", latent_gate=True, soft_token_init="vocab")
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    points = torch.tensor(POINT_SETS[0])
    # training: every scored token's NLL equals the plain base's, offset by offset
    augmented, plain = lm.training_loss(input_ids, points), lm.unaugmented_loss(input_ids, points)
    torch.testing.assert_close(augmented.nll_by_offset, plain.nll_by_offset, rtol=0, atol=1e-6)
    # decoding: the logits of every generated token equal those of plain decoding
    prompt = input_ids[:1, :9]
    on = generate_text(lm, prompt, 8, augment="sync", reaugment_every=3)
    off = generate_text(lm, prompt, 8, augment="off")
    assert on.augmentation == "applied" and on.insertions == [0, 3, 6]
    # equal up to float32 rounding: the gated kernel sums in another order than the base's sdpa
    assert (on.logits - off.logits).abs().max() <= 1e-6 * off.logits.abs().max()
    # one optimiser step opens the gates: the augmented model now differs
    optimizer = torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2)
    lm.training_loss(input_ids, points).loss.backward()
    assert lm.coprocessor.gate.grad.abs().sum() > 0
    optimizer.step()
    after = lm.training_loss(input_ids, points)
    assert (after.nll_by_offset - plain.nll_by_offset).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["sync", "async_delay"])
def test_decoding_equals_a_full_recompute(arch, mode):
    lm = _lm(arch, readout="token", latent_gate=True)
    prompt = torch.randint(2, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    options = {"augment": "sync", "reaugment_every": 3} if mode == "sync" else {"augment": "async", "async_delay_tokens": 2}
    generation = stream(lm, prompt, 9, **options)
    events = list(generation)
    finish, tokens = events[-1], events[:-1]
    assert finish.augmentation == "applied"
    assert finish.insertions == ([0, 3, 6] if mode == "sync" else [2])
    full = full_recompute(lm, prompt, finish.token_ids, finish.insertions, generation.latents)
    torch.testing.assert_close(torch.stack([e.logits for e in tokens]), full, rtol=1e-4, atol=1e-4)


def test_interface_parameters_are_the_few_where_coprocessor_meets_base():
    lm = _lm("llama", perturb=False, readout="token", latent_gate=True)
    names = {id(p) for p in lm.interface_parameters()}
    assert names == {id(lm.coprocessor.soft_tokens), id(lm.coprocessor.gate)}
    assert lm.coprocessor.gate.shape == (2, 4) and not lm.coprocessor.gate.any()


@pytest.mark.parametrize("arch", FULL_ATTENTION)
def test_residual_starts_as_the_pause_baseline_and_opens(arch):
    lm = _lm(arch, perturb=False, readout="token", latent_gate=True, latent_residual=True)
    coprocessor = lm.coprocessor
    assert not coprocessor.residual.any() and any(p is coprocessor.residual for p in lm.interface_parameters())
    # at r = 0 the latents are the soft tokens, whatever the cache holds (here: an empty one)
    positions = torch.arange(3)[None]
    from transformers import DynamicCache

    latents = coprocessor(DynamicCache(), positions)
    torch.testing.assert_close(latents, coprocessor.soft_tokens[None], rtol=0, atol=0)
    # gates and residual are both closed: exactly the base
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    points = torch.tensor(POINT_SETS[0])
    plain = lm.unaugmented_loss(input_ids, points)
    torch.testing.assert_close(lm.training_loss(input_ids, points).nll_by_offset, plain.nll_by_offset, rtol=0, atol=1e-6)
    # training opens r, then the coprocessor's output reaches the latents
    with torch.no_grad():
        coprocessor.gate.fill_(0.5)
    lm.training_loss(input_ids, points).loss.backward()
    assert coprocessor.residual.grad.abs().item() > 0
    torch.optim.AdamW(lm.trainable_parameters(), lr=1e-2).step()
    assert coprocessor.residual.abs().item() > 0
    assert (coprocessor(DynamicCache(), positions) - coprocessor.soft_tokens[None]).abs().max() > 1e-4


def test_residual_init_sets_r_and_the_latents_follow_it():
    lm = _lm("llama", perturb=False, readout="token", latent_gate=True, latent_residual=True, latent_residual_init=0.5)
    coprocessor = lm.coprocessor
    assert coprocessor.residual.tolist() == [0.5]
    from transformers import DynamicCache

    positions = torch.arange(3)[None]
    latents = coprocessor(DynamicCache(), positions)
    # independent recompute: the copied stack's output at the embedding scale, half of it added to the soft tokens
    raw = coprocessor.stack(inputs_embeds=coprocessor.soft_tokens[None], position_ids=positions).last_hidden_state
    expected = coprocessor.soft_tokens[None] + 0.5 * coprocessor.embedding_std * raw / raw.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    # closed gates still hide whatever the latents are: exactly the base at step 0
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    points = torch.tensor(POINT_SETS[0])
    torch.testing.assert_close(
        lm.training_loss(input_ids, points).nll_by_offset, lm.unaugmented_loss(input_ids, points).nll_by_offset, rtol=0, atol=1e-6
    )


def test_residual_matrix_starts_as_r_times_identity_trains_with_the_body_and_opens():
    from transformers import DynamicCache

    scalar = _lm("llama", perturb=False, readout="token", latent_gate=True, latent_residual=True, latent_residual_init=0.5)
    matrix = _lm(
        "llama", perturb=False, readout="token", latent_gate=True, latent_residual=True, latent_residual_init=0.5,
        latent_residual_matrix=True,
    )
    matrix.coprocessor.load_state_dict({**scalar.coprocessor.state_dict(), "residual": matrix.coprocessor.residual})
    hidden = scalar.coprocessor.soft_tokens.shape[1]
    torch.testing.assert_close(matrix.coprocessor.residual.detach(), 0.5 * torch.eye(hidden), rtol=0, atol=0)
    positions = torch.arange(3)[None]
    # r = 0.5 I gives the latents of the scalar r = 0.5
    torch.testing.assert_close(
        matrix.coprocessor(DynamicCache(), positions), scalar.coprocessor(DynamicCache(), positions), rtol=1e-6, atol=1e-6
    )
    # the matrix trains at the body's lr, not the interface's
    assert all(p is not matrix.coprocessor.residual for p in matrix.interface_parameters())
    assert any(p is matrix.coprocessor.residual for p in matrix.trainable_parameters())
    # at r = 0 the latents are the soft tokens; one step with open gates moves r off zero in many directions
    closed = _lm("llama", perturb=False, readout="token", latent_gate=True, latent_residual=True, latent_residual_matrix=True)
    coprocessor = closed.coprocessor
    torch.testing.assert_close(coprocessor(DynamicCache(), positions), coprocessor.soft_tokens[None], rtol=0, atol=0)
    with torch.no_grad():
        coprocessor.gate.fill_(0.5)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    closed.training_loss(input_ids, torch.tensor(POINT_SETS[0])).loss.backward()
    assert torch.linalg.matrix_rank(coprocessor.residual.grad) > 1
    torch.optim.AdamW(closed.trainable_parameters(), lr=1e-2).step()
    assert (coprocessor(DynamicCache(), positions) - coprocessor.soft_tokens[None]).abs().max() > 1e-4


def test_residual_matrix_decoding_equals_a_full_recompute():
    lm = _lm("qwen3", **RECIPES["residual_matrix"])
    prompt = torch.randint(2, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    generation = stream(lm, prompt, 9, augment="sync", reaugment_every=3)
    events = list(generation)
    finish = events[-1]
    full = full_recompute(lm, prompt, finish.token_ids, finish.insertions, generation.latents)
    torch.testing.assert_close(torch.stack([e.logits for e in events[:-1]]), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), True, "1"])
def test_residual_init_refuses_what_is_not_a_finite_number(bad):
    from cacheaug.config import CoprocessorConfig
    from cacheaug.errors import ConfigError

    with pytest.raises(ConfigError, match="latent_residual_init"):
        CoprocessorConfig(latent_residual=True, latent_residual_init=bad)
    with pytest.raises(ConfigError, match="turn latent_residual on"):
        CoprocessorConfig(latent_residual_init=1.0)
    with pytest.raises(ConfigError, match="turn latent_residual on"):
        CoprocessorConfig(latent_residual_matrix=True)
    with pytest.raises(ConfigError, match="latent_residual_matrix must be true or false"):
        CoprocessorConfig(latent_residual=True, latent_residual_matrix="yes")
