"""The one-pass block-masked loss equals the point-by-point definition, for every architecture."""

from __future__ import annotations

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig
from conftest import VOCAB, make_base

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _perturbed(arch: str, **config) -> AugmentedLM:
    """A coprocessor that no longer equals the base copy, so its gradients are generic."""
    lm = AugmentedLM(make_base(arch), CoprocessorConfig(**config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in lm.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return lm


def assert_equivalent(lm: AugmentedLM, input_ids: torch.Tensor, points: torch.Tensor) -> None:
    fast = lm.training_loss(input_ids, points)
    fast_grads = torch.autograd.grad(fast.loss, lm.trainable_parameters())
    slow = lm.reference_loss(input_ids, points)
    slow_grads = torch.autograd.grad(slow.loss, lm.trainable_parameters())

    assert fast.num_tokens == slow.num_tokens
    assert abs(fast.loss.item() - slow.loss.item()) <= LOSS_RTOL * abs(slow.loss.item())
    torch.testing.assert_close(fast.nll_by_offset, slow.nll_by_offset, rtol=1e-5, atol=1e-5)
    names = [name for name, p in lm.coprocessor.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, fast_grads, slow_grads):
        if want.numel() == 1:
            continue  # a scalar's gradient is a sum that may nearly cancel: checked in the global norm below
        error = (got - want).norm() / want.norm().clamp(min=1e-12)
        assert error <= GRAD_RTOL, f"{name}: relative gradient error {error:.2e}"
    got_all = torch.cat([g.flatten() for g in fast_grads])
    want_all = torch.cat([g.flatten() for g in slow_grads])
    assert (got_all - want_all).norm() / want_all.norm() <= GRAD_RTOL


POINT_SETS = [
    # the very start, the middle, and within N_A of the end (truncated ahead windows)
    [[0, 3, 9, 16, 18], [1, 2, 7, 12, 17]],
    [[0, 1, 2, 3, 4], [14, 15, 16, 17, 18]],
    [[5, 6, 10, 11, 18], [0, 8, 9, 13, 18]],
]


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
