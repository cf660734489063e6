"""The KL-to-base regulariser: the one-pass KL and its gradients equal the point-by-point definition, its p_base is
the plain base's logits (Gemma 2's soft-capping included), it is 0 at the gates' initial value, weight 0 is the old
loss, and TrainArgs anneals its weight, validates it, and a tiny run logs it."""

from __future__ import annotations

import json

import pytest
import torch

from cacheaug import AugmentedLM, ConfigError, CoprocessorConfig
from cacheaug.config import RunConfig, TrainArgs, load_run_config
from helpers import PAPER, POINT_SETS, ROOT, VOCAB, assert_equivalent, configs, make_base, perturbed_lm

KL_WEIGHT = 0.3
FULL_ATTENTION = ["llama", "qwen3", "gpt2"]  # sliding windows count slots, which the latents share (test_recipe.py)


class _WithKL:
    """``lm`` whose training_loss and reference_loss add the KL at ``kl_weight``: what assert_equivalent compares."""

    def __init__(self, lm: AugmentedLM, kl_weight: float):
        self.lm, self.kl_weight = lm, kl_weight

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def training_loss(self, input_ids, points):
        return self.lm.training_loss(input_ids, points, kl_weight=self.kl_weight)

    def reference_loss(self, input_ids, points):
        return self.lm.reference_loss(input_ids, points, kl_weight=self.kl_weight)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed)), torch.tensor(POINT_SETS[0])


@pytest.mark.parametrize("recipe", [{}, PAPER], ids=["default", "paper"])
def test_one_pass_kl_equals_reference(arch, recipe):
    lm = perturbed_lm(arch, num_latents=3, num_ahead=4, num_points=5, **recipe)
    input_ids, points = _inputs()
    assert_equivalent(_WithKL(lm, KL_WEIGHT), input_ids, points)  # loss 1e-5, gradients 1e-4
    fast, slow = lm.training_loss(input_ids, points, kl_weight=KL_WEIGHT), lm.reference_loss(input_ids, points, kl_weight=KL_WEIGHT)
    assert fast.kl > 1e-4  # the KL term is not vacuous: the perturbed coprocessor moved the model off the base
    torch.testing.assert_close(fast.kl, slow.kl, rtol=1e-4, atol=1e-6)


def _widened_gemma2():
    """Gemma 2 (final logit soft-capping) with a window wider than the test sequences, so latents share no slot."""
    from transformers import AutoModelForCausalLM

    config = configs()["gemma2"]
    config.sliding_window = 64
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", FULL_ATTENTION + ["gemma2-wide"])
def test_kl_is_zero_at_the_gates_initial_value(arch):
    base = _widened_gemma2() if arch == "gemma2-wide" else make_base(arch)
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=3, num_ahead=4, num_points=5))  # readout="token", gated
    out = lm.training_loss(*_inputs(), kl_weight=1.0)
    assert abs(out.kl.item()) <= 1e-6  # the augmented model IS the base there


def test_kl_base_logits_are_the_plain_base_logits(arch, monkeypatch):
    import cacheaug.coprocessor as coprocessor

    seen = []
    token_kl = coprocessor.token_kl
    monkeypatch.setattr(coprocessor, "token_kl", lambda logits, base_logits: seen.append(base_logits) or token_kl(logits, base_logits))
    lm = perturbed_lm(arch, num_latents=3, num_ahead=4, num_points=5)
    if arch == "gemma2":
        assert lm.base.config.final_logit_softcapping is not None  # the capping is in play
    input_ids, points = _inputs()
    lm.training_loss(input_ids, points, kl_weight=KL_WEIGHT)
    with torch.no_grad():
        plain = lm.base(input_ids=input_ids).logits  # (B, T, V)
    before = (points[:, :, None] + torch.arange(4)).clamp(max=input_ids.shape[1] - 2)  # predicts x_{before+1}
    want = plain.gather(1, before.flatten(1)[..., None].expand(-1, -1, plain.shape[-1])).view(*before.shape, -1)
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-5)


def test_head_logits_refuses_a_logit_scale_it_does_not_apply():
    from cacheaug.errors import ModelError
    from cacheaug.models import head_logits

    base = make_base("llama")
    base.config.logits_scaling = 2.0  # as Granite's config would
    with pytest.raises(ModelError, match="logits_scaling"):
        head_logits(base, torch.zeros(1, 1, 32))


def test_zero_weight_is_the_old_loss_and_skips_the_kl(monkeypatch):
    import cacheaug.coprocessor as coprocessor

    lm = perturbed_lm("gemma2", num_latents=3, num_ahead=4, num_points=5)
    input_ids, points = _inputs()
    weighted = lm.training_loss(input_ids, points, kl_weight=KL_WEIGHT)
    monkeypatch.setattr(coprocessor, "head_logits", lambda *a: pytest.fail("kl_weight=0 computed base logits"))
    old, zero = lm.training_loss(input_ids, points), lm.training_loss(input_ids, points, kl_weight=0.0)
    assert torch.equal(zero.loss, old.loss) and zero.kl is None and old.kl is None
    assert torch.equal(weighted.nll_by_offset, old.nll_by_offset)  # nll_by_offset stays the pure NLL
    torch.testing.assert_close(weighted.loss - KL_WEIGHT * weighted.kl, old.loss, rtol=1e-6, atol=0)
    assert lm.reference_loss(input_ids[:1], points[:1, :2]).kl is None
    with pytest.raises(ValueError, match="kl_weight must be a non-negative number, got -1"):
        lm.training_loss(input_ids, points, kl_weight=-1)


def test_kl_weight_schedule_validation_and_flags():
    annealed = TrainArgs(kl_to_base=0.4, kl_anneal_steps=10)
    assert [annealed.kl_weight(s) for s in (0, 5, 10, 11)] == [0.4, 0.2, 0.0, 0.0]
    assert TrainArgs(kl_to_base=0.4).kl_weight(10_000) == 0.4 and TrainArgs().kl_weight(0) == 0.0
    for bad, words in [({"kl_to_base": -0.1}, "kl_to_base must be a non-negative number, got -0.1"),
                       ({"kl_to_base": "lots"}, "kl_to_base must be a non-negative number, got 'lots'"),
                       ({"kl_anneal_steps": 0}, "kl_anneal_steps must be a positive integer or null, got 0"),
                       ({"kl_anneal_steps": 2.5}, "kl_anneal_steps must be a positive integer or null, got 2.5")]:
        with pytest.raises(ConfigError, match=words) as error:
            TrainArgs(**bad)
        assert "\n" not in str(error.value)
    # a run config saved before these fields existed still loads, with the regulariser off
    saved = RunConfig().to_dict()
    del saved["train"]["kl_to_base"], saved["train"]["kl_anneal_steps"]
    assert RunConfig.from_dict(saved).train.kl_weight(0) == 0.0
    from cacheaug.cli import parse_overrides

    flags = parse_overrides(["--train.kl_to_base", "0.5", "--train.kl_anneal_steps", "250"])
    config = load_run_config(str(ROOT / "configs" / "tiny.yaml"), flags)
    assert (config.train.kl_to_base, config.train.kl_anneal_steps) == (0.5, 250)


def test_tiny_run_logs_the_annealed_kl(tmp_path):
    from cacheaug.train import train

    overrides = {"train.output_dir": str(tmp_path / "run"), "train.max_steps": 3, "train.eval_every": 0,
                 "train.save_every": 0, "train.kl_to_base": 0.5, "train.kl_anneal_steps": 2}
    train(load_run_config(str(ROOT / "configs" / "tiny.yaml"), overrides), command="test")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r.get("kl_weight") for r in steps] == [0.5, 0.25, None]  # the weight of steps 0, 1; annealed away at 2
    for record in steps[:2]:
        assert abs(record["nll"] + record["kl_weight"] * record["kl"] - record["loss"]) < 1e-6
    assert "kl" not in steps[2]
    assert all("kl" not in r for r in records if r.get("split") == "validation")  # validation stays plain NLL
