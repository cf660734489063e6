"""Scoring continuations after an (augmented) context: tokenisation as lm-evaluation-harness splits it, and the
summed log-likelihood of each continuation, scored from a copy of the context's state."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..state import DecodeState, context_state, copy_state, feed

__all__ = ["context_state", "continuation_logprobs", "encode", "encode_pair"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the continuation's ids are those of
    ``context + continuation`` after the context's own ids, so word-boundary merges are kept.
    """
    if not context:
        raise InputError("the context must be non-empty: the coprocessor reads its cache")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    return context_ids, whole[len(context_ids):]


def encode(tokenizer, text: str) -> list[int]:
    """A prompt's ids, with the tokenizer's own special tokens (BOS for models that expect one)."""
    return list(tokenizer(text).input_ids)


@torch.no_grad()
def continuation_logprobs(
    lm, state: DecodeState, continuations: list[list[int]]
) -> list[tuple[float, bool]]:
    """(sum of log p, greedy?) of each continuation after ``state``, each scored from a copy of its cache."""
    results = []
    for continuation in continuations:
        if not continuation:
            results.append((0.0, True))
            continue
        logits = [state.logits]  # (1, V): predicts the first continuation token
        if len(continuation) > 1:
            inputs = torch.tensor([continuation[:-1]], device=lm.device)
            logits.append(feed(lm.base, copy_state(state), inputs, logits_to_keep=0)[0])
        log_probs = torch.log_softmax(torch.cat(logits).float(), dim=-1)  # (n, V)
        targets = torch.tensor(continuation, device=lm.device)
        total = log_probs.gather(-1, targets[:, None]).sum().item()
        results.append((total, bool((log_probs.argmax(-1) == targets).all())))
    return results
