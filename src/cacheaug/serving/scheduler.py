"""The server's decode loop (continuous batching): every active request advances by one token per batched
forward of the base; new requests are admitted between steps, and finished, cancelled or timed-out ones leave
at once.

One thread runs the loop. Each step: admit waiting requests (their prompts prefilled in one padded batch,
bounded by ``max_prefill_tokens`` so that running streams keep flowing; the ``sync`` ones then share one
batched coprocessor pass and one insertion), insert the latents that are due (an ``async`` request's, as soon
as its background coprocessor is done; ``reaugment_every``'s), choose a token per row with that row's own
sampling settings and generator, and feed the rows that go on in one forward. Rows are stacked aligned on
their last slot (state.stack_states), so each decodes as it would alone. That needs full attention: with a
sliding-window layer, padding would shift the window, so such a base decodes every request in its own
one-row state, still one token per request per step, exact but unbatched (``Scheduler.batching`` says so).

A request's events are stream.TokenEvent ... stream.FinishEvent (or an ErrorEvent), the same as
stream.Generation yields for that request alone: a greedy request gets exactly the tokens it gets alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

import torch

from ..errors import InputError
from ..generate import generator_for, next_token
from ..state import (
    DecodeState, base_of, compute_latents, drop_hidden_slots, feed_token, insert_latents, padded_batches_are_exact,
    prefill, prefill_rows, select_rows, stack_states,
)
from ..stream import FinishEvent, LatentsWorker, TextStream, TokenEvent
from .tickets import ErrorEvent, QueueFull, Sampling, Ticket

__all__ = ["ErrorEvent", "QueueFull", "Sampling", "Scheduler", "Ticket"]

log = logging.getLogger(__name__)


class _Row:
    """A request being decoded: what stream.Generation keeps for one sequence."""

    def __init__(self, ticket: Ticket, tokenizer, eos_token_id: int | None, device: torch.device):
        self.ticket, self.sampling = ticket, ticket.sampling
        sampling = ticket.sampling
        self.sample = sampling.temperature > 0
        self.generator = generator_for(sampling.seed, device) if self.sample else None  # None: torch's global one
        self.detokenizer = TextStream(tokenizer, sampling.stop, ticket.prompt_ids[-5:]) if tokenizer is not None else None
        self.eos_token_id = eos_token_id
        self.tokens: list[int] = []
        self.insertions: list[int] = []
        self.status = "off" if sampling.augment == "off" else "pending"
        self.worker: LatentsWorker | None = None
        self.reaugment_every = sampling.reaugment_every
        self.due = False  # latents to insert before the next token (reaugment_every)

    def finish_status(self, timeout: float) -> str:
        if self.status != "pending":
            return self.status
        late = self.worker is not None and self.worker.elapsed() > timeout
        return "timed out" if late else "not ready"  # decoding ended before the latents were ready


class _Group:
    """Rows decoded by one forward: ``state`` holds ``rows[i]`` in its row i."""

    def __init__(self, state: DecodeState, rows: list[_Row]):
        self.state, self.rows = state, rows


class Scheduler:
    """The continuous-batching decode loop of ``lm`` (an AugmentedLM, or a plain base) in a daemon thread.

    ``submit(prompt_ids, sampling)`` queues a request and returns its Ticket, or raises QueueFull when
    ``max_queue`` requests already wait; at most ``max_batch`` rows decode at once. ``bank`` (a CacheBank):
    a prompt that begins with a banked context continues from its stored augmented cache (the longest one).
    ``augment_timeout_s``: an async coprocessor later than this leaves its request unaugmented; a sync pass runs
    in the loop itself, batched, and is not timed out. ``request_timeout_s``: a request still running after this
    many seconds from its submission ends with an ErrorEvent (504).
    """

    def __init__(
        self,
        lm,
        tokenizer=None,
        *,
        max_batch: int = 32,
        max_queue: int = 64,
        max_prefill_tokens: int = 1024,
        augment_timeout_s: float = 30.0,
        request_timeout_s: float | None = None,
        bank=None,
    ):
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1:
            raise InputError(f"max_batch and max_prefill_tokens must be >= 1 and max_queue >= 0, got "
                             f"{max_batch}, {max_prefill_tokens}, {max_queue}")
        self.lm, self.base, self.tokenizer, self.bank = lm, base_of(lm), tokenizer, bank
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.augment_timeout_s, self.request_timeout_s = augment_timeout_s, request_timeout_s
        self.has_coprocessor = getattr(lm, "coprocessor", None) is not None
        self.batched = padded_batches_are_exact(self.base.config)
        self.batching = "batched" if self.batched else "per request (sliding-window layers: padding would shift their windows)"
        self._waiting: deque[Ticket] = deque()
        self._groups: list[_Group] = []
        self._wake = threading.Condition()
        self._closed = False
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "timed_out": 0, "rejected": 0,
                         "tokens": 0, "steps": 0, "bank_hits": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step of the last 10 s
        self._thread = threading.Thread(target=self._run, name="cacheaug-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the outside
    def submit(self, prompt_ids: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        if not prompt_ids:
            raise InputError("the prompt is empty")
        ticket = Ticket(list(prompt_ids), sampling, loop)
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue and self.active_rows >= self.max_batch:
                self.counters["rejected"] += 1
                raise QueueFull(f"{self.active_rows} requests are decoding and {len(self._waiting)} waiting")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    @property
    def active_rows(self) -> int:
        return sum(len(group.rows) for group in self._groups)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window_s]
        return sum(n for _, n in recent) / window_s

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._groups:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._take_waiting()
            with torch.no_grad():
                if admitted:
                    self._guarded(admitted, self._admit, admitted)
                for group in list(self._groups):
                    self._guarded([row.ticket for row in group.rows], self._step, group)
        for group in self._groups:
            for row in group.rows:
                row.ticket.put(ErrorEvent("the server shut down", 503))
        for ticket in self._waiting:
            ticket.put(ErrorEvent("the server shut down", 503))

    def _guarded(self, tickets: list[Ticket], work, *arguments) -> None:
        """``work(*arguments)``; if it raises, the requests it was advancing fail, with every request decoded in
        the same group (its state may be half-updated), and the loop goes on."""
        try:
            work(*arguments)
        except Exception as error:  # a bug or a resource failure: never the loop's end
            log.exception("decode loop: %s", error)
            failed = set(tickets)
            for group in [g for g in self._groups if any(row.ticket in failed for row in g.rows)]:
                failed |= {row.ticket for row in group.rows}
                self._groups.remove(group)
            for ticket in failed:
                if not ticket.done.is_set():
                    self.counters["failed"] += 1
                    ticket.put(ErrorEvent(f"{type(error).__name__}: {error}"))

    def _take_waiting(self) -> list[Ticket]:
        """Waiting requests that fit: free rows, and prompts within the prefill budget (at least one)."""
        taken, tokens = [], 0
        free = self.max_batch - self.active_rows
        while self._waiting and len(taken) < free:
            ticket = self._waiting[0]
            if ticket.cancelled.is_set():
                self._waiting.popleft()
                self.counters["cancelled"] += 1
                ticket.put(ErrorEvent("cancelled", 499))
                continue
            if taken and tokens + len(ticket.prompt_ids) > self.max_prefill_tokens:
                break
            taken.append(self._waiting.popleft())
            tokens += len(ticket.prompt_ids)
        return taken

    # ------------------------------------------------------------------ admission
    def _admit(self, tickets: list[Ticket]) -> None:
        rows = [_Row(ticket, self.tokenizer, self.eos_token_id, self.base.device) for ticket in tickets]
        for row in rows:
            if row.status == "pending" and not self.has_coprocessor:
                row.status = "failed: no coprocessor"
        parts: list[tuple[DecodeState, list[_Row]]] = []
        plain: list[_Row] = []
        for row in rows:
            banked = self._banked(row)
            if banked is not None:
                parts.append((banked, [row]))
            elif self.batched:
                plain.append(row)
            else:
                parts.append((prefill(self.base, torch.tensor([row.ticket.prompt_ids], device=self.base.device)), [row]))
        if plain:
            parts.insert(0, (prefill_rows(self.base, [row.ticket.prompt_ids for row in plain]), plain))
        for state, part_rows in parts:
            for index, row in enumerate(part_rows):
                if row.sampling.augment == "async" and row.status == "pending":
                    row.worker = self._launch(self._row_state(state, index))
        if self.batched:
            parts = [(stack_states([state for state, _ in parts]), [row for _, part in parts for row in part])]
        for state, part_rows in parts:
            sync = [i for i, row in enumerate(part_rows) if row.sampling.augment == "sync" and row.status == "pending"]
            state, part_rows = self._augment(state, part_rows, sync)
            self._add(state, part_rows)

    def _banked(self, row: _Row) -> DecodeState | None:
        """The request's state continued from the longest banked context its prompt begins with, or None."""
        if self.bank is None or row.sampling.augment == "off":  # the bank holds augmented contexts only
            return None
        found = self.bank.longest_prefix(row.ticket.prompt_ids)
        if found is None:
            return None
        context, length, status = found
        self.counters["bank_hits"] += 1
        row.ticket.bank = {"prefix_tokens": length, "status": status}
        rest = row.ticket.prompt_ids[length:]
        if context.latents is not None and not rest and row.status == "pending":
            row.status = "applied"  # the banked context ends with its latents: they are this request's
            row.insertions.append(0)
        if not rest:
            return context
        return prefill(self.base, torch.tensor([rest], device=self.base.device), context)

    def _row_state(self, state: DecodeState, index: int) -> DecodeState:
        if state.logits.shape[0] == 1:
            return state
        return select_rows(state, torch.tensor([index], device=state.logits.device))

    def _launch(self, state: DecodeState) -> LatentsWorker | None:
        if not self.has_coprocessor:
            return None
        return LatentsWorker(lambda: compute_latents(self.lm, state))

    def _augment(self, state: DecodeState, rows: list[_Row], which: list[int],
                 latents: torch.Tensor | None = None) -> tuple[DecodeState, list[_Row]]:
        """Latents inserted into rows ``which`` of ``state`` before each one's next token (computed now, in one
        batched pass, unless given as (len(which), N_L, H)); the new state and its rows (the augmented ones last)."""
        if not which:
            return state, rows
        chosen = [rows[i] for i in which]
        if not self.has_coprocessor:
            for row in chosen:
                row.status = "failed: no coprocessor"
            return state, rows
        others = [i for i in range(len(rows)) if i not in set(which)]
        device = state.logits.device
        part = state if not others else select_rows(state, torch.tensor(which, device=device))
        try:
            if latents is None:
                latents = compute_latents(self.lm, part)
            part = insert_latents(self.lm, part, latents)
        except Exception as error:  # the coprocessor or the base refused: these rows go on unaugmented
            for row in chosen:
                row.status = f"failed: {type(error).__name__}: {error}"
                row.reaugment_every = None  # a failing coprocessor is not retried every k tokens
            return state, rows
        for row in chosen:
            row.status = "applied"
            row.insertions.append(len(row.tokens))
        if not others:
            return part, chosen
        rest = select_rows(state, torch.tensor(others, device=device))
        return stack_states([rest, part]), [rows[i] for i in others] + chosen

    def _add(self, state: DecodeState, rows: list[_Row]) -> None:
        if self.batched and self._groups:
            group = self._groups[0]
            group.state, group.rows = stack_states([group.state, state]), group.rows + rows
        else:
            self._groups.append(_Group(state, rows))

    # ------------------------------------------------------------------ one step of a group
    def _step(self, group: _Group) -> None:
        now = time.monotonic()
        self._leave(group, [i for i, row in enumerate(group.rows) if self._ended_outside(row, now)])
        if not group.rows:
            return
        self._insert_due(group)
        state, rows = group.state, group.rows
        logits = state.logits  # (b, V)
        tokens = logits.argmax(dim=-1)  # (b,) greedy rows; sampled rows below, each with its own generator
        finished = []
        for i, row in enumerate(rows):
            if row.sample:
                try:
                    tokens[i] = next_token(logits[i : i + 1], True, row.sampling.temperature, row.sampling.top_p,
                                           row.generator)[0]
                except Exception as error:  # this row's settings or logits: it fails alone
                    log.exception("sampling failed: %s", error)
                    self.counters["failed"] += 1
                    row.ticket.put(ErrorEvent(f"{type(error).__name__}: {error}"))
                    finished.append(i)
        failed = len(finished)
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if i in finished:
                continue
            reason = self._emit(row, token, logits[i])
            if reason is not None:
                self._finish(row, reason)
                finished.append(i)
        self.counters["tokens"] += len(rows) - failed
        self.counters["steps"] += 1
        self._recent.append((time.monotonic(), len(rows) - failed))
        while self._recent and time.monotonic() - self._recent[0][0] > 10:
            self._recent.popleft()
        keep = [i for i in range(len(rows)) if i not in set(finished)]
        if keep:
            feed_token(self.base, self._leave(group, finished), tokens[keep])
            for row in group.rows:
                if (row.status == "applied" and row.reaugment_every is not None
                        and len(row.tokens) - row.insertions[-1] == row.reaugment_every):
                    row.due = True
        else:
            self._groups.remove(group)

    def _ended_outside(self, row: _Row, now: float) -> bool:
        """Cancelled (the client left) or past the request timeout: answered here, the row is dropped."""
        if row.ticket.cancelled.is_set():
            self.counters["cancelled"] += 1
            row.ticket.put(ErrorEvent("cancelled", 499))
            return True
        if self.request_timeout_s is not None and now - row.ticket.submitted_at > self.request_timeout_s:
            self.counters["timed_out"] += 1
            row.ticket.put(ErrorEvent(f"the request took longer than {self.request_timeout_s:g} s", 504))
            return True
        return False

    def _leave(self, group: _Group, gone: list[int]) -> DecodeState | None:
        """Drop rows ``gone`` of ``group``; its remaining state (None when no row is left)."""
        if not gone:
            return group.state
        keep = [i for i in range(len(group.rows)) if i not in set(gone)]
        group.rows = [group.rows[i] for i in keep]
        if not keep:
            if group in self._groups:
                self._groups.remove(group)
            return None
        state = select_rows(group.state, torch.tensor(keep, device=group.state.logits.device))
        # compacted once a quarter of the slots are hidden from every row: the cache stays within 4/3 of what the
        # rows need, however long the batch runs with requests coming and going
        group.state = drop_hidden_slots(state, at_least=0.25) if self.batched else state
        return group.state

    def _insert_due(self, group: _Group) -> None:
        """Async latents that are ready (or late), and re-augmentations due, before this step's token."""
        ready, latents, due = [], [], []
        for row in group.rows:
            if row.worker is not None and row.status == "pending":
                if row.worker.wait(timeout=0):
                    worker, row.worker = row.worker, None
                    try:
                        latents.append(worker.result())  # (1, N_L, H)
                        ready.append(row)
                    except Exception as error:  # the coprocessor raised: this row goes on unaugmented
                        row.status = f"failed: {type(error).__name__}: {error}"
                elif row.worker.elapsed() > self.augment_timeout_s:
                    row.worker, row.status = None, "timed out"
            elif row.due:
                row.due = False
                due.append(row)
        if ready:
            which = [group.rows.index(row) for row in ready]
            group.state, group.rows = self._augment(group.state, group.rows, which, torch.cat(latents))
        if due:
            which = [group.rows.index(row) for row in due]
            group.state, group.rows = self._augment(group.state, group.rows, which)

    def _emit(self, row: _Row, token: int, logits: torch.Tensor) -> str | None:
        """Send the row's next token; the finish reason when it is its last."""
        row.tokens.append(token)
        piece = row.detokenizer.push(token) if row.detokenizer is not None else ""
        row.ticket.put(TokenEvent(len(row.tokens) - 1, token, piece, bool(row.insertions), logits))
        if row.eos_token_id is not None and token == row.eos_token_id:
            return "eos"
        if row.detokenizer is not None and row.detokenizer.stopped:
            return "stop"
        if len(row.tokens) == row.sampling.max_tokens:
            return "length"
        return None

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.detokenizer.flush() if row.detokenizer is not None else ""
        self.counters["completed"] += 1
        row.ticket.put(FinishEvent(reason, row.finish_status(self.augment_timeout_s), rest, list(row.tokens),
                                   len(row.ticket.prompt_ids), list(row.insertions)))
