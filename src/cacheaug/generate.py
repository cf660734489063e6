"""Decoding from a decode state: ONE batched loop, greedy or sampled, in which rows leave the batch when they are
done and latents pending in the state go in after their delay, with two front-ends: token ids (:func:`decode`)
and texts cut before a stop string (:func:`generate_until`). Streaming (stream.py) runs the same loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import InputError
from .state import DecodeState, base_of, feed_token, insert_latents, select_rows

__all__ = ["DecodeLoop", "DecodeOutput", "Step", "StopStrings", "cut_at_stop", "decode", "generate_until",
           "generate_until_batch", "next_token"]


def next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    # The max subtracted first, so a tiny temperature tends to argmax instead of overflowing to inf - inf = nan;
    # below float32's smallest normal number the temperature itself would round to 0 (0 / 0 = nan): float64.
    scaled = logits.float() if temperature >= 1e-37 else logits.double()
    probs = torch.softmax((scaled - scaled.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[..., 0] = False  # even for a top_p that rounds to 0 in float32
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generator_for(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


class StopStrings:
    """The one stop-string matcher: where a text first meets a stop string, and how much of its tail could
    still become one (text streamed out must hold that back)."""

    def __init__(self, stop=()):
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]

    def find(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string in ``text`` at or after ``start``; -1 when there is none."""
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def cut(self, text: str) -> str:
        """``text`` before its earliest stop string."""
        index = self.find(text)
        return text if index < 0 else text[:index]

    def held(self, pending: str) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for size in range(min(len(pending), longest), 0, -1):
            if any(s.startswith(pending[-size:]) for s in self.stop):
                return size
        return 0


def cut_at_stop(text: str, stop) -> str:
    """``text`` before the earliest occurrence of any stop sequence."""
    return StopStrings(stop).cut(text)


@dataclass
class Step:
    index: int  # 0-based among the generated tokens
    rows: torch.Tensor  # (b,) the original row of each row still decoding
    tokens: torch.Tensor  # (b,) the token each chose
    logits: torch.Tensor  # (b, V) the logits it was chosen from
    finished: torch.Tensor  # (b,) bool: eos; a consumer sets more (a stop string) before asking for the next step


def _lock(lock) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if lock is None else lock


class DecodeLoop:
    """The decode loop: iterate for one :class:`Step` per generated token.

    Each step inserts the latents that are due (``state.pending`` at token ``state.pending_after``, then
    whatever ``before_token(index, state) -> state`` does), chooses a token per row, and feeds the rows that
    are not finished; finished rows leave the batch. The last token is never fed (nobody needs its logits).
    ``state`` is consumed: ``self.state`` is the state of the rows still decoding. ``lock`` serialises the
    base's forward passes with other users of the same model.
    """

    def __init__(
        self,
        lm,
        state: DecodeState,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | None = None,
        before_token: Callable[[int, DecodeState], DecodeState] | None = None,
        lock=None,
    ):
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        self.lm, self.state, self.max_new_tokens = lm, state, max_new_tokens
        self.sampling, self.seed, self.eos_token_id = (do_sample, temperature, top_p), seed, eos_token_id
        self.before_token, self.lock = before_token, lock

    def __iter__(self) -> Iterator[Step]:
        base = base_of(self.lm)
        generator = generator_for(self.seed, self.state.logits.device)
        rows = torch.arange(self.state.logits.shape[0], device=self.state.logits.device)
        for index in range(self.max_new_tokens):
            if self.state.pending is not None and index == self.state.pending_after:
                latents, self.state.pending = self.state.pending, None
                with _lock(self.lock):
                    self.state = insert_latents(self.lm, self.state, latents)
            if self.before_token is not None:
                self.state = self.before_token(index, self.state)
            logits = self.state.logits  # (b, V)
            tokens = next_token(logits, *self.sampling, generator)  # (b,)
            eos = self.eos_token_id
            finished = tokens == eos if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
            step = Step(index, rows, tokens, logits, finished)
            yield step
            if index == self.max_new_tokens - 1 or bool(step.finished.all()):
                return
            if bool(step.finished.any()):
                keep = (~step.finished).nonzero()[:, 0]
                self.state, rows, tokens = select_rows(self.state, keep), rows[keep], tokens[keep]
            with _lock(self.lock):
                feed_token(base, self.state, tokens)


# ---------------------------------------------------------------------------- token ids
@dataclass
class DecodeOutput:
    tokens: torch.Tensor  # (B, n) generated token ids
    logits: torch.Tensor  # (B, n, V) the logits each token was chosen from


@torch.no_grad()
def decode(
    lm,
    state: DecodeState,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> DecodeOutput:
    """Up to ``max_new_tokens`` tokens after ``state`` (consumed; ``lm`` an AugmentedLM or a plain base).

    Stops early once every row has produced ``eos_token_id``; a row that is done leaves the batch, and its
    later entries read eos, with logits that put all their mass on eos.
    """
    batch, vocab = state.logits.shape
    tokens, logits = [], []
    for step in DecodeLoop(lm, state, max_new_tokens, do_sample, temperature, top_p, seed, eos_token_id):
        if len(step.rows) == batch:
            tokens.append(step.tokens)
            logits.append(step.logits)
            continue
        done_logits = torch.full((batch, vocab), float("-inf"), dtype=step.logits.dtype, device=step.logits.device)
        done_logits[:, eos_token_id] = 0.0
        tokens.append(torch.full_like(tokens[-1], eos_token_id).index_copy(0, step.rows, step.tokens))
        logits.append(done_logits.index_copy(0, step.rows, step.logits))
    if not tokens:
        device = state.logits.device
        return DecodeOutput(torch.zeros(batch, 0, dtype=torch.long, device=device), state.logits.new_zeros(batch, 0, vocab))
    return DecodeOutput(torch.stack(tokens, dim=1), torch.stack(logits, dim=1))


# ---------------------------------------------------------------------------- texts
@torch.no_grad()
def generate_until_batch(lm, tokenizer, state: DecodeState, max_new_tokens: int, stop=()) -> list[str]:
    """Greedy text for every row of ``state`` (consumed), each cut before its first stop string or at EOS.

    Rows that finish leave the batch, so a long answer does not keep the others' caches growing. Each row's
    text is that of the row decoded alone (for padded rows: see state.padded_batches_are_exact).
    """
    matcher, eos = StopStrings(stop), tokenizer.eos_token_id
    tokens: list[list[int]] = [[] for _ in range(state.logits.shape[0])]
    for step in DecodeLoop(lm, state, max_new_tokens, eos_token_id=eos):
        for slot, (row, token) in enumerate(zip(step.rows.tolist(), step.tokens.tolist())):
            if token == eos:
                continue  # finished: the loop drops the row
            tokens[row].append(token)
            if matcher.find(tokenizer.decode(tokens[row], skip_special_tokens=True)) >= 0:
                step.finished[slot] = True
    return [matcher.cut(tokenizer.decode(row, skip_special_tokens=True)) for row in tokens]


def generate_until(lm, tokenizer, state: DecodeState, max_new_tokens: int, stop=()) -> str:
    """Greedy text after a one-row ``state`` (extended in place), cut before the first stop string or at EOS."""
    return generate_until_batch(lm, tokenizer, state, max_new_tokens, stop)[0]
