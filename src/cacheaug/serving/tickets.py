"""A request as the decode loop sees it from outside: its sampling settings, its ticket (the events it is sent,
readable from a thread or an asyncio loop, and its cancellation), and the two ways it can end without a
completion (ErrorEvent, QueueFull)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from ..errors import CacheaugError, InputError
from ..stream import AUGMENT_MODES, FinishEvent, TokenEvent

__all__ = ["ErrorEvent", "QueueFull", "Sampling", "Ticket"]


class QueueFull(CacheaugError):
    """Every row is busy and the waiting queue is full: try again later."""


@dataclass
class Sampling:
    """One request's decoding settings."""

    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    augment: str = "sync"
    reaugment_every: int | None = None

    def __post_init__(self) -> None:
        if self.augment not in AUGMENT_MODES:
            raise InputError(f"augment must be one of {AUGMENT_MODES}, got {self.augment!r}")
        if self.max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.reaugment_every is not None and self.reaugment_every < 1:
            raise InputError(f"reaugment_every must be >= 1, got {self.reaugment_every}")


@dataclass
class ErrorEvent:
    """The request failed in the server (or timed out); ``status`` is the HTTP status to answer with."""

    message: str
    status: int = 500


class Ticket:
    """One submitted request: its events as they are made, readable from a thread (``events()``) or from an
    asyncio loop (``aevents()``, when submitted with ``loop``). ``cancel()`` frees its row at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop | None = None):
        self.id = next(self._ids)
        self.prompt_ids, self.sampling, self.loop = prompt_ids, sampling, loop
        self.submitted_at = time.monotonic()
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.bank: dict | None = None  # {"prefix_tokens", "status"} when a banked context was used
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop is not None else queue.SimpleQueue()

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, event) -> None:
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self.done.set()
        if self.loop is None:
            self._queue.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the client's event loop is gone: nobody reads this request any more
            self.cancel()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent | FinishEvent | ErrorEvent]:
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return

    async def aevents(self) -> AsyncIterator[TokenEvent | FinishEvent | ErrorEvent]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return
