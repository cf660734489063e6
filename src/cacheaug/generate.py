"""Decoding from a (possibly augmented) base cache: greedy and sampled, token by token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .coprocessor import AugmentedCache


@dataclass
class DecodeOutput:
    tokens: torch.Tensor  # (B, n) generated token ids
    logits: torch.Tensor  # (B, n, V) the logits each token was chosen from


def next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode(
    base,
    state: AugmentedCache,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> DecodeOutput:
    """Extend ``state`` by up to ``max_new_tokens`` tokens; its cache is extended in place.

    Stops early once every row has produced ``eos_token_id``; finished rows then repeat eos. Afterwards
    ``state`` holds every generated token but the last one, which is returned and never fed.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=state.logits.device).manual_seed(seed)
    logits = state.logits
    batch = logits.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    tokens, all_logits = [], []
    for step in range(max_new_tokens):
        token = next_token(logits, do_sample, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        tokens.append(token)
        all_logits.append(logits)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break  # the last token is returned, not fed: nobody needs its logits
        out = base(
            input_ids=token[:, None],
            cache=state.cache,
            position_ids=torch.full((batch, 1), state.next_position, device=logits.device),
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        state.next_position += 1
        state.logits = logits
    if not tokens:
        empty = torch.zeros(batch, 0, dtype=torch.long, device=logits.device)
        return DecodeOutput(empty, logits.new_zeros(batch, 0, logits.shape[-1]))
    return DecodeOutput(torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1))
