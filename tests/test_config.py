"""config.py: validation names the field and the value, configs fill themselves from the base, every shipped
config parses and names its command, YAML's string exponents are numbers, old checkpoints load as the paper."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cacheaug import ConfigError, CoprocessorConfig
from cacheaug.config import load_run_config
from helpers import make_base

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_latents": 0}, "num_latents must be a positive integer, got 0"),
        ({"num_ahead": -1}, "num_ahead"),
        ({"num_points": 1.5}, "num_points"),
        ({"init": "random"}, "init must be one of"),
        ({"lora_rank": 4, "init": "scratch"}, "lora_rank needs init='pretrained'"),
        ({"latents_after_norm": "yes"}, "latents_after_norm"),
    ],
)
def test_config_validation(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        CoprocessorConfig(**kwargs)


def test_config_resolution_and_unknown_keys():
    base = make_base("gemma3")
    resolved = CoprocessorConfig(lora_rank=8).resolve(base.config, "tiny-gemma3")
    assert resolved.num_layers == 2 and resolved.lora_alpha == 8.0 and resolved.base_model == "tiny-gemma3"
    with pytest.raises(ConfigError, match="only 2 layers"):
        CoprocessorConfig(num_layers=3).resolve(base.config)
    with pytest.raises(ConfigError, match="unknown coprocessor config key"):
        CoprocessorConfig.from_dict({"num_latent": 4})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_name_their_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# cacheaug train --config configs/{path.name}")
    config = load_run_config(str(path))
    assert config.coprocessor.num_latents >= 1 and config.train.max_steps >= 1
    assert yaml.safe_load(path.read_text())["model"] == config.model


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads "3e-4" as a string; a float field takes it as 3e-4, a word is still refused.
    from cacheaug.cli import parse_overrides
    from cacheaug.config import ConfigError

    config = load_run_config(TINY, parse_overrides(["--train.lr", "3e-4"]))
    assert config.train.lr == 3e-4
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  grad_clip: 5e-1\n")
    config = load_run_config(str(path))
    assert (config.train.lr, config.train.grad_clip) == (1e-3, 0.5)
    with pytest.raises(ConfigError, match="lr must be a non-negative number, got 'fast'"):
        load_run_config(TINY, {"train.lr": "fast"})


def test_saved_config_without_recipe_fields_loads_as_the_paper():
    config = CoprocessorConfig(readout="token", latent_gate=True).resolve(make_base("llama").config, "tiny")
    saved = {k: v for k, v in config.to_dict().items() if k not in ("readout", "latent_gate", "soft_token_init")}
    old = CoprocessorConfig.from_dict(saved)
    assert (old.readout, old.latent_gate, old.soft_token_init) == ("latent", False, "random")
    assert CoprocessorConfig.from_dict(config.to_dict()).readout == "token"
