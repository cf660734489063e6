"""One sequence streamed token by token on the decode loop of generate.py, with the coprocessor run before
decoding (sync), beside it in a background thread (async, arXiv 2412.17747 appendix A.5), after a fixed delay,
or again every k generated tokens; text pieces are released as they become final."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .generate import DecodeLoop, StopStrings, _lock
from .state import DecodeState, compute_latents, copy_state, insert_latents, prefill

__all__ = [
    "AUGMENT_MODES", "Completion", "FinishEvent", "Generation", "LatentsWorker", "TextStream", "TokenEvent",
    "generate_text", "stream",
]

AUGMENT_MODES = ("off", "sync", "async")


# ---------------------------------------------------------------------- the background coprocessor
class LatentsWorker:
    """``compute()`` in a daemon thread (torch releases the GIL in its kernels), read back as a future.

    A worker that hangs is abandoned, never joined: decoding must not wait on it.
    """

    def __init__(self, compute: Callable[[], torch.Tensor]):
        self.started_at = time.monotonic()
        self._future: Future = Future()
        thread = threading.Thread(target=self._run, args=(compute,), name="cacheaug-coprocessor", daemon=True)
        thread.start()

    def _run(self, compute: Callable[[], torch.Tensor]) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                latents = compute()
        except BaseException as error:  # reported to the decoder, which carries on unaugmented
            self._future.set_exception(error)
        else:
            self._future.set_result(latents)

    def wait(self, timeout: float | None) -> bool:
        """Block until the latents are ready or failed; False if ``timeout`` seconds passed first."""
        try:
            self._future.exception(timeout=timeout)
        except TimeoutError:
            return False
        return True

    def result(self) -> torch.Tensor:
        return self._future.result(timeout=0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at


def _failure(error: BaseException) -> str:
    return f"failed: {type(error).__name__}: {error}"


# ---------------------------------------------------------------------- token ids -> text pieces
class TextStream:
    """Turns token ids into text pieces whose concatenation is the decoded text, cut before a stop string.

    Holds back a piece while it ends inside a UTF-8 character (one byte-level token can be half a character)
    or while its tail could still become a stop string, so no stop text is ever released. Decodes a short
    window of ids each time (vLLM/TGI style): ``context_ids`` (the prompt's last ids) give tokenizers that
    drop a leading space at the start of a decode the context they need.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, context_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = StopStrings(stop or [])
        self.ids = list(context_ids or [])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.prefix_text = self._decode(self.ids)  # decode(ids[prefix_offset:read_offset]), kept across calls
        self.text = ""  # complete characters decoded so far (generated part only)
        self.released = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        full = self._decode(self.ids[self.prefix_offset :])
        if final or (len(full) > len(self.prefix_text) and not full.endswith("\ufffd")):
            self.text += full[len(self.prefix_text) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it releases (often ""; always "" once stopped)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._advance(final=False)
        hit = self.stop.find(self.text, self.released)
        if hit >= 0:
            self.text, self.stopped = self.text[:hit], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self.stop.held(self.text[self.released :]))

    def _release(self, end: int) -> str:
        piece, self.released = self.text[self.released : max(end, self.released)], max(end, self.released)
        return piece

    def flush(self) -> str:
        """At the end: everything held back, an unfinished character decoded as U+FFFD."""
        if not self.stopped and self.read_offset < len(self.ids):
            self._advance(final=True)
        return self._release(len(self.text))


# ---------------------------------------------------------------------- streamed generation
@dataclass
class TokenEvent:
    index: int  # 0-based among the generated tokens
    token_id: int
    text: str  # text this token releases ("" when no tokenizer or while held back)
    augmented: bool  # latents were in the cache when this token was chosen
    logits: torch.Tensor  # (V,) the logits it was chosen from


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" (a stop string), "length" (max_new_tokens) or "eos"
    augmentation: str  # "applied" | "off" | "failed: <why>" | "timed out" | "not ready" (ended before the latents)
    text: str  # text held back until the end ("" when none)
    token_ids: list[int]
    num_prompt_tokens: int
    insertions: list[int] = field(default_factory=list)  # generated-token counts at which latents went in


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    augmentation: str
    insertions: list[int]
    num_prompt_tokens: int
    logits: torch.Tensor  # (n, V) the logits each generated token was chosen from


class Generation:
    """One sequence's decoding as an iterator of TokenEvent ... FinishEvent.

    Construction prefills the prompt and, per ``augment``: "sync" waits (up to ``augment_timeout_s``) for the
    coprocessor and inserts its latents after the prompt; "async" starts it in a background thread on a copy
    of the prompt cache and decoding begins at once; its latents go in at the current position as soon as
    they are ready (checked before each token), or after exactly ``async_delay_tokens`` tokens, computed
    synchronously (the fixed delay N of the paper's Table 8). A coprocessor that raises, is late past
    ``augment_timeout_s`` or is absent leaves decoding unaugmented; FinishEvent.augmentation says which.
    ``reaugment_every`` = k runs the coprocessor again on the current cache every k tokens after each
    insertion. ``base_lock``/``coprocessor_lock`` serialise forward passes shared with other requests.
    ``context``: an DecodeState (e.g. from a CacheBank) that the prompt continues; it is not mutated.
    ``latents_fn(state) -> (1, N_L, H)`` replaces the coprocessor (tests inject failing or hanging ones).
    """

    def __init__(
        self,
        lm,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        augment: str = "sync",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        tokenizer=None,
        eos_token_id: int | None = None,
        reaugment_every: int | None = None,
        augment_timeout_s: float = 30.0,
        async_delay_tokens: int | None = None,
        context: DecodeState | None = None,
        base_lock=None,
        coprocessor_lock=None,
        latents_fn: Callable[[object], torch.Tensor] | None = None,
    ):
        if augment not in AUGMENT_MODES:
            raise InputError(f"augment must be one of {AUGMENT_MODES}, got {augment!r}")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or (input_ids.shape[1] == 0 and context is None):
            raise InputError(f"input_ids must be (1, length>0), got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if reaugment_every is not None and reaugment_every < 1:
            raise InputError(f"reaugment_every must be >= 1, got {reaugment_every}")
        if async_delay_tokens is not None and (augment != "async" or async_delay_tokens < 0):
            raise InputError(f"async_delay_tokens needs augment='async' and a value >= 0, got {async_delay_tokens}")
        if stop and tokenizer is None:
            raise InputError("stop strings need a tokenizer")
        self.lm, self.base = lm, getattr(lm, "base", lm)
        self.max_new_tokens, self.eos_token_id = max_new_tokens, eos_token_id
        self.sampling = (do_sample, temperature, top_p)
        self.seed, self.reaugment_every, self.timeout = seed, reaugment_every, augment_timeout_s
        self.delay, self.base_lock, self.coprocessor_lock = async_delay_tokens, base_lock, coprocessor_lock
        if latents_fn is None and getattr(lm, "coprocessor", None) is not None:
            latents_fn = lambda state: compute_latents(lm, state)  # noqa: E731
        self.latents_fn = latents_fn
        self.num_prompt_tokens = input_ids.shape[1]
        self.detokenizer = None
        if tokenizer is not None:
            self.detokenizer = TextStream(tokenizer, stop, input_ids[0, -5:].tolist())
        self.insertions: list[int] = []
        self.latents: list[torch.Tensor] = []  # (1, N_L, H) per insertion, in order
        self.worker: LatentsWorker | None = None
        self.delayed_latents: torch.Tensor | None = None
        with torch.no_grad():
            with _lock(base_lock):  # an empty prompt decodes straight from the context
                self.state = copy_state(context) if input_ids.shape[1] == 0 else prefill(self.base, input_ids, context)
            self.status = self._start(augment)

    # ------------------------------------------------------------------ augmentation
    def _launch(self) -> LatentsWorker:
        snapshot = copy_state(self.state)  # the worker's own: decoding rebinds only ours

        def compute() -> torch.Tensor:
            with _lock(self.coprocessor_lock):
                return self.latents_fn(snapshot)

        return LatentsWorker(compute)

    def _start(self, augment: str) -> str:
        if augment == "off":
            return "off"
        if self.latents_fn is None:
            return "failed: no coprocessor"
        if augment == "sync":
            return self._run_now(0)
        if self.delay is not None:
            self.delayed_latents, problem = self._latents_now()
            return problem or "pending"
        self.worker = self._launch()
        return "pending"

    def _latents_now(self) -> tuple[torch.Tensor | None, str]:
        """The coprocessor on the current cache, waited for up to the timeout: (latents, "") or (None, why not)."""
        worker = self._launch()
        if not worker.wait(self.timeout):
            return None, "timed out"
        try:
            return worker.result(), ""
        except Exception as error:
            return None, _failure(error)

    def _run_now(self, generated: int) -> str:
        """Latents for the current cache, inserted now; the status this leaves."""
        latents, problem = self._latents_now()
        if problem:
            return problem
        try:
            return self._insert(latents, generated)
        except Exception as error:  # the base refused the latents: the state is untouched
            return _failure(error)

    def _insert(self, latents: torch.Tensor, generated: int) -> str:
        with _lock(self.base_lock):
            self.state = insert_latents(self.lm, self.state, latents)
        self.insertions.append(generated)
        self.latents.append(latents)
        return "applied"

    def wait_for_latents(self, timeout: float | None = None) -> bool:
        """Block until the async coprocessor has finished (or failed); True when it has."""
        return self.worker is None or self.worker.wait(timeout)

    def _before_token(self, generated: int, state: DecodeState) -> DecodeState:
        """Insert whatever latents are due before choosing the next token; the state to choose it from."""
        self.state = state
        try:
            if self.status == "pending" and self.delayed_latents is not None:
                if generated == self.delay:
                    self.status = self._insert(self.delayed_latents, generated)
            elif self.status == "pending" and self.worker is not None:
                if self.worker.wait(timeout=0):
                    worker, self.worker = self.worker, None
                    self.status = self._insert(worker.result(), generated)
                elif self.worker.elapsed() > self.timeout:
                    self.worker, self.status = None, "timed out"
            elif self.status == "applied" and self.reaugment_every is not None:
                if generated - self.insertions[-1] == self.reaugment_every:
                    status = self._run_now(generated)
                    if status != "applied":
                        self.reaugment_every = None  # a failing coprocessor is not retried every k tokens
        except Exception as error:  # the worker raised: carry on unaugmented
            self.worker, self.status = None, _failure(error)
        return self.state

    # ------------------------------------------------------------------ decoding
    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]:
        return self._events()

    @torch.no_grad()
    def _events(self) -> Iterator[TokenEvent | FinishEvent]:
        tokens: list[int] = []
        finish = "length"
        do_sample, temperature, top_p = self.sampling
        loop = DecodeLoop(
            self.lm, self.state, self.max_new_tokens, do_sample, temperature, top_p, self.seed, self.eos_token_id,
            before_token=self._before_token, lock=self.base_lock,
        )
        for step in loop:
            tokens.append(int(step.tokens[0]))
            piece = self.detokenizer.push(tokens[-1]) if self.detokenizer is not None else ""
            yield TokenEvent(step.index, tokens[-1], piece, bool(self.insertions), step.logits[0])
            if self.eos_token_id is not None and tokens[-1] == self.eos_token_id:
                finish = "eos"
            elif self.detokenizer is not None and self.detokenizer.stopped:
                finish, step.finished[0] = "stop", True
        self.state = loop.state
        yield self._finish(finish, tokens)

    def _finish(self, finish: str, tokens: list[int]) -> FinishEvent:
        status = self.status
        if status == "pending":  # decoding ended before the latents were due or ready
            late = self.worker is not None and self.worker.elapsed() > self.timeout
            status = "timed out" if late else "not ready"
        rest = self.detokenizer.flush() if self.detokenizer is not None else ""
        return FinishEvent(finish, status, rest, tokens, self.num_prompt_tokens, list(self.insertions))


def stream(lm, input_ids: torch.Tensor, max_new_tokens: int, **options) -> Generation:
    """Streamed decoding of one sequence (1, T): iterate the result for TokenEvents, then one FinishEvent.

    ``lm`` is an AugmentedLM (or a plain base: augmentation then reports "failed: no coprocessor"); options
    are Generation's. With the same seed, the tokens equal ``decode``/``AugmentedLM.generate``'s.
    """
    return Generation(lm, input_ids, max_new_tokens, **options)


def generate_text(lm, input_ids: torch.Tensor, max_new_tokens: int, **options) -> Completion:
    """The stream collected: text (the pieces joined), token ids, finish reason and augmentation status."""
    pieces, logits = [], []
    for event in stream(lm, input_ids, max_new_tokens, **options):
        pieces.append(event.text)
        if isinstance(event, TokenEvent):
            logits.append(event.logits)
    return Completion(
        text="".join(pieces),
        token_ids=event.token_ids,
        finish_reason=event.finish_reason,
        augmentation=event.augmentation,
        insertions=event.insertions,
        num_prompt_tokens=event.num_prompt_tokens,
        logits=torch.stack(logits) if logits else torch.zeros(0, 0),
    )
