"""Tiny random-weight models, one per supported architecture, built in-process (no hub, no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 160
WINDOW = 6  # sliding windows shorter than the test sequences, so they bind


def _configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(initializer_range=0.3, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256)
    return {
        "llama": LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2),
        "gemma2": Gemma2Config(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
            query_pre_attn_scalar=8, attn_implementation="eager",
        ),
        "gemma3": Gemma3TextConfig(
            **common, num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
        ),
        "qwen2": Qwen2Config(
            **common, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
            sliding_window=WINDOW, max_window_layers=1,
        ),
        "qwen3": Qwen3Config(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "mistral": MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW),
        "gpt2": GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
            bos_token_id=0, eos_token_id=1,
        ),
    }


ARCHITECTURES = list(_configs())


def make_base(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.name_or_path = f"tiny-{arch}"
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
