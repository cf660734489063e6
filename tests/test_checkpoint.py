"""Checkpoint folders: round trip, self-description, refusal of the wrong base or a damaged file."""

from __future__ import annotations

import json

import pytest
import torch

from cacheaug import AugmentedLM
from cacheaug.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_directory
from helpers import VOCAB, make_base, perturbed_lm


def _trained(arch="llama", **config) -> AugmentedLM:
    return perturbed_lm(arch, **{"num_latents": 3, "num_ahead": 3, "num_points": 3, **config})


@pytest.mark.parametrize(
    "config",
    [
        {}, {"lora_rank": 2}, {"num_layers": 1, "latents_after_norm": False},
        {"lora_rank": 2, "latent_residual": True, "latent_residual_matrix": True},
    ],
)
def test_round_trip(tmp_path, config):
    lm = _trained(**config)
    lm.save_pretrained(tmp_path / "ckpt")
    description = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert description["coprocessor"]["base_model"] == "tiny-llama"
    assert description["coprocessor"]["base_identity"]["hidden_size"] == 32
    assert description["coprocessor"]["num_layers"] == config.get("num_layers", 2)  # resolved, not None
    loaded = AugmentedLM.from_pretrained(tmp_path / "ckpt", base=make_base("llama"))
    assert loaded.config == lm.config
    for (name, a), (_, b) in zip(lm.trainable_state_dict().items(), loaded.trainable_state_dict().items()):
        assert torch.equal(a, b), name
    prompt = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(lm.augment(prompt).logits, loaded.augment(prompt).logits, rtol=0, atol=0)


def test_lora_checkpoint_holds_only_adapters(tmp_path):
    from safetensors.torch import load_file

    _trained(lora_rank=2).save_pretrained(tmp_path / "ckpt")
    names = load_file(str(tmp_path / "ckpt" / WEIGHTS_NAME)).keys()
    assert all(n in ("soft_tokens", "latent_scale", "gate") or "lora_" in n for n in names)


def test_other_base_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="made for base 'tiny-llama'.*model_type"):
        AugmentedLM.from_pretrained(tmp_path / "ckpt", base=make_base("qwen3"))


def test_truncated_weights_are_refused(tmp_path):
    _trained().save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        AugmentedLM.from_pretrained(tmp_path / "ckpt", base=make_base("llama"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a cacheaug checkpoint"):
        AugmentedLM.from_pretrained(tmp_path, base=make_base("llama"))


def test_atomic_directory_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "out"
    atomic_directory(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_directory(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left behind


