"""An OpenAI-compatible HTTP server for augmented generation (FastAPI): completions, chat, SSE streaming.

Requests are decoded by one continuous-batching loop (scheduler.py): every active request advances one token
per batched forward, new ones join between steps, and a client that disconnects frees its row at the next
step. Requests are validated strictly (unknown fields, wrong types, lengths past the model's context) and
answered 4xx with an OpenAI-shaped ``{"error": {...}}``; a full queue answers 503 with ``Retry-After``.
``--bank DIR`` continues prompts that begin with a banked context from its stored augmented cache. With an API
key, every endpoint but ``/health`` needs ``Authorization: Bearer <key>`` (compared in constant time), as
vLLM's server does. ``/metrics`` is in the Prometheus text format. The load-test client lives in loadtest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..stream import FinishEvent, TokenEvent
from .protocol import (
    ChatCompletionRequest, CompletionRequest, RequestError, SamplingFields, check_text, error_response, validation_message,
)
from .scheduler import Scheduler
from .tickets import ErrorEvent, QueueFull, Sampling, Ticket

__all__ = ["API_KEY_ENV", "ChatCompletionRequest", "CompletionRequest", "RequestError", "create_app", "serve"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
API_KEY_ENV = "CACHEAUG_API_KEY"
RETRY_AFTER_S = 1

log = logging.getLogger(__name__)


@dataclass
class _Server:
    lm: object
    tokenizer: object
    model_name: str
    max_context: int
    scheduler: Scheduler
    api_key_sha256: bytes | None = None
    http_errors: dict = field(default_factory=dict)  # status -> count of error answers

    @property
    def num_latents(self) -> int:
        config = getattr(self.lm, "config", None)
        return getattr(config, "num_latents", 0) if getattr(self.lm, "coprocessor", None) is not None else 0

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the key (sha256 of both compared in constant time, so
        neither the key's content nor its length leaks through timing)."""
        if self.api_key_sha256 is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(given, self.api_key_sha256) and scheme.lower() == "bearer"

    def check_lengths(self, num_prompt: int, request: SamplingFields, chat: bool) -> int:
        """Raise RequestError unless prompt + latents + max_tokens fit the context; return max_tokens."""
        if num_prompt == 0:
            raise RequestError(400, "the prompt is empty", "messages" if chat else "prompt")
        if num_prompt > self.max_context:
            raise RequestError(
                400, f"the prompt is {num_prompt} tokens, longer than the model's context of {self.max_context}",
                "messages" if chat else "prompt",
            )
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = self.room(num_prompt, request) if chat else DEFAULT_COMPLETION_TOKENS
        if not 1 <= max_tokens <= self.max_context:
            message = f"max_tokens must be between 1 and {self.max_context}, got {max_tokens}"
            raise RequestError(400, message, "max_tokens")
        insertions = 0
        if request.augment != "off":
            insertions = 1 + (max_tokens // request.reaugment_every if request.reaugment_every else 0)
        latents = insertions * self.num_latents
        if num_prompt + latents + max_tokens > self.max_context:
            raise RequestError(
                400,
                f"prompt ({num_prompt} tokens) + latents ({latents}) + max_tokens ({max_tokens}) exceed the "
                f"model's context of {self.max_context} tokens",
                "max_tokens",
            )
        return max_tokens

    def room(self, num_prompt: int, request: SamplingFields) -> int:
        """The most tokens that fit after the prompt and the latents they bring (OpenAI chat's default)."""
        if request.augment == "off":
            return self.max_context - num_prompt
        room = self.max_context - num_prompt - self.num_latents
        if request.reaugment_every:  # every k tokens bring N_L more positions: m + N_L * (m // k) <= room
            room = room * request.reaugment_every // (request.reaugment_every + self.num_latents)
        return room

    def submit(self, ids: list[int], request: SamplingFields, max_tokens: int) -> Ticket:
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        sample = request.temperature > 0
        seed = request.seed if request.seed is not None else (secrets.randbits(62) if sample else None)
        sampling = Sampling(max_tokens, request.temperature, request.top_p, seed, stop, request.augment,
                            request.reaugment_every)
        try:
            return self.scheduler.submit(ids, sampling, loop=asyncio.get_running_loop())
        except QueueFull as error:
            raise RequestError(503, f"the server is busy ({error}); retry later", None,
                               {"Retry-After": str(RETRY_AFTER_S)}) from None

    def augmentation(self, request: SamplingFields, finish: FinishEvent, ticket: Ticket) -> dict:
        return {
            "requested": request.augment,
            "status": finish.augmentation,
            "applied": bool(finish.insertions),
            "insertions": finish.insertions,
            "num_latents": self.num_latents,
            "bank": ticket.bank,  # {"prefix_tokens", "status"} when the prompt began with a banked context
        }


def _usage(finish: FinishEvent) -> dict:
    completion = len(finish.token_ids)
    return {"prompt_tokens": finish.num_prompt_tokens, "completion_tokens": completion,
            "total_tokens": finish.num_prompt_tokens + completion}


def _openai_reason(finish: FinishEvent) -> str:
    return "length" if finish.finish_reason == "length" else "stop"  # eos and stop strings are both "stop"


async def _watch_disconnect(request: Request, ticket: Ticket) -> None:
    """Cancel ``ticket`` (its row leaves at the next step) once the client has gone."""
    while not ticket.done.is_set():
        if await request.is_disconnected():
            ticket.cancel()
            return
        await asyncio.sleep(0.1)


def _error_event(server: _Server, event: ErrorEvent) -> JSONResponse:
    server.http_errors[event.status] = server.http_errors.get(event.status, 0) + 1
    return error_response(event.status, event.message)


async def _respond(server: _Server, http: Request, ids: list[int], request: SamplingFields, chat: bool):
    max_tokens = server.check_lengths(len(ids), request, chat)
    ticket = server.submit(ids, request, max_tokens)
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model or server.model_name,
    }
    if request.stream:
        return StreamingResponse(_sse(server, ticket, request, head, chat), media_type="text/event-stream")
    watcher = asyncio.create_task(_watch_disconnect(http, ticket))
    pieces = []
    try:
        async for event in ticket.aevents():
            if isinstance(event, ErrorEvent):
                return _error_event(server, event)
            pieces.append(event.text)
    finally:
        watcher.cancel()
        ticket.cancel()  # a no-op once finished; frees the row if this handler was cancelled
    finish, text = event, "".join(pieces)
    if chat:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": _openai_reason(finish)}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _openai_reason(finish)}
    return {**head, "choices": [choice], "usage": _usage(finish),
            "augmentation": server.augmentation(request, finish, ticket)}


async def _sse(server: _Server, ticket: Ticket, request: SamplingFields, head: dict, chat: bool):
    """``data: {chunk}\\n\\n`` per text piece, a last chunk with finish_reason, usage and augmentation, then [DONE].
    A client that goes away closes this generator, which cancels the request."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, reason: str | None = None, first: bool = False, **extra) -> str:
        if chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

    try:
        if chat:
            yield chunk("", first=True)
        async for event in ticket.aevents():
            if isinstance(event, TokenEvent):
                if event.text:
                    yield chunk(event.text)
            elif isinstance(event, ErrorEvent):  # the status line is sent already: report in-band
                server.http_errors[event.status] = server.http_errors.get(event.status, 0) + 1
                kind = "timeout_error" if event.status == 504 else "server_error"
                yield f"data: {json.dumps({'error': {'message': event.message, 'type': kind}})}\n\n"
            else:
                yield chunk(event.text, _openai_reason(event), usage=_usage(event),
                            augmentation=server.augmentation(request, event, ticket))
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()


class _BearerAuth:
    """Every HTTP endpoint but /health needs the API key, checked before the body is read. A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the endpoints."""

    def __init__(self, app, server: _Server, refuse):
        self.app, self.server, self.refuse = app, server, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.server.authorized(header):
                response = self.refuse(401, "a valid API key is required: Authorization: Bearer <key>",
                                       headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _metrics(server: _Server) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    scheduler = server.scheduler
    counts = scheduler.counters
    lines = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP cacheaug_{name} {text}", f"# TYPE cacheaug_{name} {kind}"])
        lines.extend(f"cacheaug_{name}{labels} {value:g}" for labels, value in samples)

    metric("queue_depth", "gauge", "Requests waiting for a row.", [("", scheduler.queue_depth)])
    metric("active_rows", "gauge", "Requests being decoded.", [("", scheduler.active_rows)])
    metric("max_batch", "gauge", "Rows decoded at once at most.", [("", scheduler.max_batch)])
    metric("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           [("", scheduler.tokens_per_s())])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", counts["tokens"])])
    metric("decode_steps_total", "counter", "Batched decode steps.", [("", counts["steps"])])
    outcomes = ("completed", "cancelled", "failed", "timed_out", "rejected")
    metric("requests_total", "counter", "Requests by outcome.", [(f'{{outcome="{o}"}}', counts[o]) for o in outcomes])
    metric("bank_hits_total", "counter", "Requests continued from a banked context.", [("", counts["bank_hits"])])
    errors = sorted(server.http_errors.items())
    metric("errors_total", "counter", "Error answers by HTTP status.",
           [(f'{{status="{status}"}}', count) for status, count in errors] or [('{status="500"}', 0)])
    return "\n".join(lines) + "\n"


def create_app(
    lm,
    tokenizer,
    model_name: str | None = None,
    augment_timeout_s: float = 30.0,
    *,
    max_batch: int = 32,
    max_queue: int = 64,
    max_prefill_tokens: int = 1024,
    request_timeout_s: float | None = 600.0,
    bank=None,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``lm`` (an AugmentedLM) with ``tokenizer``; its decode loop starts now and stops
    with the app (lifespan). ``bank``: a CacheBank whose contexts prompts may continue; ``api_key``: required as
    a Bearer token on every endpoint but /health."""
    base = getattr(lm, "base", lm)
    text_config = base.config.get_text_config()
    if model_name is None:
        model_name = getattr(getattr(lm, "config", None), "base_model", None) or str(base.config.name_or_path)
    scheduler = Scheduler(lm, tokenizer, max_batch=max_batch, max_queue=max_queue,
                          max_prefill_tokens=max_prefill_tokens, augment_timeout_s=augment_timeout_s,
                          request_timeout_s=request_timeout_s, bank=bank)
    key = hashlib.sha256(api_key.encode()).digest() if api_key else None
    server = _Server(lm, tokenizer, model_name, int(text_config.max_position_embeddings), scheduler, key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="cacheaug", description="Augmented generation (arXiv 2412.17747), OpenAI-compatible.",
                  lifespan=lifespan)
    app.state.cacheaug = server

    def refuse(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        server.http_errors[status] = server.http_errors.get(status, 0) + 1
        return error_response(status, message, param, headers=headers)

    app.add_middleware(_BearerAuth, server=server, refuse=refuse)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        message, param = validation_message(error.errors())
        return refuse(400, message, param)

    @app.exception_handler(RequestError)
    async def _refused(_: Request, error: RequestError):
        return refuse(error.status, error.message, error.param, error.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException):  # FastAPI's own: an unparsable body, no route, ...
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
        if error.status_code == 400 and "parsing the body" in detail:
            detail = "the body could not be parsed (not UTF-8, too deeply nested, or a number too long)"
        return refuse(error.status_code, messages.get(error.status_code, detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _failed(_: Request, error: Exception):
        return refuse(500, f"{type(error).__name__}: {error}")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.model_name, "coprocessor": server.num_latents > 0,
                "num_latents": server.num_latents, "max_context": server.max_context,
                "chat": bool(getattr(tokenizer, "chat_template", None)), "batching": scheduler.batching,
                "active_rows": scheduler.active_rows, "queue_depth": scheduler.queue_depth,
                "bank": bank is not None}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(_metrics(server), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "cacheaug"}]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        check_text(request.prompt, "prompt")
        ids = tokenizer(request.prompt).input_ids
        return await _respond(server, http, ids, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(404, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [message.model_dump() for message in request.messages]
        for index, message in enumerate(messages):
            check_text(message["content"], f"messages.{index}.content")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return await _respond(server, http, ids, request, chat=True)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def serve(lm, tokenizer, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve ``create_app(lm, tokenizer, **options)`` with uvicorn until interrupted."""
    import uvicorn

    if not options.get("api_key") and not is_loopback(host):
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
              f"(set --api-key or ${API_KEY_ENV})", file=sys.stderr)
    uvicorn.run(create_app(lm, tokenizer, **options), host=host, port=port, log_level="info")
