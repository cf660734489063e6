"""What the tests build: tiny random-weight models, one per supported architecture (no hub, no network), the one
perturbed AugmentedLM, the full recompute every decode path is checked against, and the loss equivalence check.

conftest.py turns the shared ones into fixtures; test files import the rest from here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cacheaug import AugmentedLM, CoprocessorConfig
from cacheaug.config import PAPER_RECIPE
from cacheaug.masks import GATED_ATTENTION, block_attention_for

VOCAB = 160
WINDOW = 6  # sliding windows shorter than the test sequences, so they bind
ROOT = Path(__file__).resolve().parents[1]
PAPER = PAPER_RECIPE  # readout="latent", no gates, Gaussian soft tokens: the layout of arXiv 2412.17747


def configs():
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


ARCHITECTURES = ["llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "gpt2"]


def make_base(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs()[arch], dtype=dtype)
    model.name_or_path = f"tiny-{arch}"
    return model.eval()


def byte_vocab_base(arch: str):
    """A tiny random ``arch`` model over the byte tokenizer's 257 ids (256 = eos)."""
    from transformers import AutoModelForCausalLM

    config = configs()[arch]
    config.vocab_size, config.eos_token_id = 257, 256
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def perturb(lm: AugmentedLM, seed: int = 1, scale: float = 0.05) -> AugmentedLM:
    """Move every trainable parameter by seeded Gaussian noise (in place): the coprocessor is no longer the
    base's copy, the gates are open, so latents matter and gradients are generic, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lm.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return lm


def perturbed_lm(arch: str = "llama", *, seed: int = 1, scale: float = 0.05, base=None, **config) -> AugmentedLM:
    """THE perturbed tiny model: ``arch``'s tiny base (or ``base``) + a coprocessor of ``config``, perturbed."""
    lm = AugmentedLM(make_base(arch) if base is None else base, CoprocessorConfig(**config))
    return perturb(lm, seed, scale) if scale else lm


# The byte tokenizer has no chat template; the server's chat tests give it this one: "<role>content\n" per message.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def served_model() -> tuple[AugmentedLM, object]:
    """What the serving tests serve: tiny-random (a 2048-position Llama) + a perturbed 4-latent coprocessor, and its
    byte tokenizer."""
    from cacheaug import load_base

    base, tokenizer = load_base("tiny-random")
    torch.manual_seed(0)  # the soft tokens come from the global RNG: the same model whatever ran before
    return perturb(AugmentedLM(base, CoprocessorConfig(num_latents=4)), seed=2), tokenizer


def prompt_ids(batch: int = 1, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- the independent references
@torch.no_grad()
def full_recompute(lm, prompt: torch.Tensor, tokens: list[int], insertions: list[int], latents: list[torch.Tensor]):
    """One cacheless forward of the base over what decoding fed it, laid out by definition: (n, V) logits that
    predicted each generated token. ``prompt`` (1, T); ``latents[i]`` (1, N_L, H) inserted before token
    ``insertions[i]``. readout="latent": the latents follow, at the next positions. readout="token": the last
    token's slot is hidden, the latents share its position and it is read again after them. Gated latents are
    read through their own softmax (masks.gated_attention), as in training."""
    embed = lm.base.get_input_embeddings()
    token_readout = getattr(lm.config, "readout", "latent") == "token"
    gate = getattr(getattr(lm, "coprocessor", None), "gate", None)
    pieces, positions = [embed(prompt)], list(range(prompt.shape[1]))
    visible, latent = [1] * prompt.shape[1], [False] * prompt.shape[1]
    predicting, last = [], int(prompt[0, -1])
    for index, token in enumerate(tokens):
        if index in insertions:
            block = latents[insertions.index(index)]  # (1, N_L, H)
            if token_readout:
                visible[-1] = 0
                pieces += [block, embed(torch.tensor([[last]]))]
                positions += [positions[-1]] * (block.shape[1] + 1)
                visible += [1] * (block.shape[1] + 1)
                latent += [True] * block.shape[1] + [False]
            else:
                pieces.append(block)
                positions += list(range(positions[-1] + 1, positions[-1] + 1 + block.shape[1]))
                visible += [1] * block.shape[1]
                latent += [True] * block.shape[1]
        predicting.append(len(positions) - 1)
        if index < len(tokens) - 1:
            pieces.append(embed(torch.tensor([[token]])))
            positions.append(positions[-1] + 1)
            visible.append(1)
            latent.append(False)
            last = token
    sequence = torch.cat(pieces, dim=1)
    if not token_readout and gate is None:  # the plain layout: a plain forward
        return lm.base(inputs_embeds=sequence).logits[0, predicting]
    options = {"cacheaug_latent_keys": torch.tensor([latent]), "cacheaug_gates": gate} if gate is not None else {}
    with block_attention_for(lm.base if gate is not None else None, implementation=GATED_ATTENTION):
        out = lm.base(inputs_embeds=sequence, position_ids=torch.tensor([positions]),
                      attention_mask=torch.tensor([visible]), **options)
    return out.logits[0, predicting]


LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
POINT_SETS = [
    # the very start, the middle, and within N_A of the end (truncated ahead windows)
    [[0, 3, 9, 16, 18], [1, 2, 7, 12, 17]],
    [[0, 1, 2, 3, 4], [14, 15, 16, 17, 18]],
    [[5, 6, 10, 11, 18], [0, 8, 9, 13, 18]],
]


def assert_equivalent(lm: AugmentedLM, input_ids: torch.Tensor, points: torch.Tensor) -> None:
    """The one-pass loss and its gradients equal the point-by-point definition (reference_loss)."""
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


# ---------------------------------------------------------------------------- shared models and data
MC_BIAS = 30.0  # every byte but "z" costs about MC_BIAS nats: one continuation's likelihood dominates by construction
MC_ITEMS = [
    # " zzz" costs ~BIAS (the space), the others ~BIAS per byte: acc and acc_norm both pick it
    {"context": "Pick one:", "choices": ["abc", "zzz", "bzz"], "gold": 1},
    # " q" costs ~2*BIAS in all; " zzz...zqq" costs ~3*BIAS but spread over 42 characters:
    # acc picks "q" (wrong here), acc_norm (per character of the choice) picks the long one (right)
    {"context": "And now:", "choices": ["q", "z" * 40 + "qq"], "gold": 1},
]


def biased_head(head, token: int, bias: float = MC_BIAS):
    """``head`` with +``bias`` on ``token``'s logit."""
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(head.bias if head.bias is not None else torch.zeros(head.out_features))
        biased.bias[token] += bias
    return biased.requires_grad_(False)


def biased_lm(method: str = "coprocessor") -> tuple[AugmentedLM, object]:
    """tiny-random whose LM head gets a bias of +MC_BIAS on the byte "z" (paper layout: references read it)."""
    from cacheaug import load_base

    base, tokenizer = load_base("tiny-random")
    base.lm_head = biased_head(base.lm_head, ord("z"))
    return AugmentedLM(base, CoprocessorConfig(num_latents=2, num_ahead=3, method=method, **PAPER)).eval(), tokenizer


def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of `cacheaug train --config configs/tiny.yaml`, trained once per test session."""
    from cacheaug.cli import main

    out = tmp_path_factory.getbasetemp() / "tiny-run"
    if not (out / "step-000004" / "coprocessor.safetensors").is_file():
        assert main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--train.output_dir", str(out),
                     "--overwrite"]) == 0
    return out / "step-000004"
