"""An OpenAI-compatible HTTP server for augmented generation (FastAPI): completions, chat, SSE streaming.

Each request decodes its own cache; the base's and the coprocessor's forward passes are each serialised by
a lock, so requests interleave token by token without touching each other's state, and an async
coprocessor still overlaps the base's decoding. Requests are validated strictly (unknown fields, wrong
types, lengths past the model's context) and answered 4xx with an OpenAI-shaped ``{"error": {...}}``.
The load-test client lives in loadtest.py; the cache bank (bank.py) is an offline tool the server does not read.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CacheaugError
from ..stream import FinishEvent, Generation, TokenEvent

__all__ = ["ChatCompletionRequest", "CompletionRequest", "RequestError", "create_app", "serve"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _SamplingFields(_Strict):
    model: str | None = None
    max_tokens: int | None = None  # None: 16 for completions, the rest of the context for chat
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, max_length=4)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None
    augment: Literal["off", "sync", "async"] = "sync"
    reaugment_every: int | None = Field(None, ge=1)


class CompletionRequest(_SamplingFields):
    prompt: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class RequestError(CacheaugError):
    """A request the server refuses; answered with ``status`` and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _validation_message(errors) -> tuple[str, str | None]:
    """Pydantic/FastAPI errors -> one readable sentence and the first offending parameter."""
    parts, params = [], []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        if error.get("type") == "json_invalid":
            detail = error.get("ctx", {}).get("error", error.get("msg", ""))
            parts.append(f"invalid JSON body ({detail})")
            continue
        name = ".".join(loc)
        if not name:
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
            continue
        params.append(name)
        if error.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{name}'")
        elif error.get("type") == "missing":
            parts.append(f"'{name}' is required")
        else:
            parts.append(f"'{name}': {error.get('msg')}")
    return "; ".join(parts) or "invalid request", (params[0].split(".")[0] if params else None)


@dataclass
class _Server:
    lm: object
    tokenizer: object
    model_name: str
    max_context: int
    augment_timeout_s: float
    base_lock: threading.Lock = field(default_factory=threading.Lock)
    coprocessor_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_latents(self) -> int:
        config = getattr(self.lm, "config", None)
        return getattr(config, "num_latents", 0) if getattr(self.lm, "coprocessor", None) is not None else 0

    def check_lengths(self, num_prompt: int, request: _SamplingFields, chat: bool) -> int:
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

    def room(self, num_prompt: int, request: _SamplingFields) -> int:
        """The most tokens that fit after the prompt and the latents they bring (OpenAI chat's default)."""
        if request.augment == "off":
            return self.max_context - num_prompt
        room = self.max_context - num_prompt - self.num_latents
        if request.reaugment_every:  # every k tokens bring N_L more positions: m + N_L * (m // k) <= room
            room = room * request.reaugment_every // (request.reaugment_every + self.num_latents)
        return room

    def start(self, ids: torch.Tensor, request: _SamplingFields, max_tokens: int) -> Generation:
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        sample = request.temperature > 0
        seed = request.seed if request.seed is not None else (secrets.randbits(62) if sample else None)
        return Generation(
            self.lm, ids.to(next(getattr(self.lm, "base", self.lm).parameters()).device), max_tokens,
            augment=request.augment, do_sample=sample, temperature=request.temperature, top_p=request.top_p,
            seed=seed, stop=stop, tokenizer=self.tokenizer, eos_token_id=self.tokenizer.eos_token_id,
            reaugment_every=request.reaugment_every, augment_timeout_s=self.augment_timeout_s,
            base_lock=self.base_lock, coprocessor_lock=self.coprocessor_lock,
        )

    def augmentation(self, request: _SamplingFields, finish: FinishEvent) -> dict:
        return {
            "requested": request.augment,
            "status": finish.augmentation,
            "applied": bool(finish.insertions),
            "insertions": finish.insertions,
            "num_latents": self.num_latents,
        }


def _usage(finish: FinishEvent) -> dict:
    completion = len(finish.token_ids)
    return {"prompt_tokens": finish.num_prompt_tokens, "completion_tokens": completion,
            "total_tokens": finish.num_prompt_tokens + completion}


def _openai_reason(finish: FinishEvent) -> str:
    return "length" if finish.finish_reason == "length" else "stop"  # eos and stop strings are both "stop"


def _respond(server: _Server, ids: torch.Tensor, request: _SamplingFields, chat: bool):
    max_tokens = server.check_lengths(ids.shape[1], request, chat)
    generation = server.start(ids, request, max_tokens)
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model or server.model_name,
    }
    if request.stream:
        return StreamingResponse(_sse(server, generation, request, head, chat), media_type="text/event-stream")
    pieces = []
    for event in generation:
        pieces.append(event.text)
    finish, text = event, "".join(pieces)
    if chat:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": _openai_reason(finish)}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _openai_reason(finish)}
    return {**head, "choices": [choice], "usage": _usage(finish), "augmentation": server.augmentation(request, finish)}


def _sse(server: _Server, generation: Generation, request: _SamplingFields, head: dict, chat: bool):
    """``data: {chunk}\\n\\n`` per text piece, a last chunk with finish_reason, usage and augmentation, then [DONE]."""
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
        for event in generation:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield chunk(event.text)
            else:
                yield chunk(event.text, _openai_reason(event), usage=_usage(event),
                            augmentation=server.augmentation(request, event))
    except Exception as error:  # the status line is sent already: report in-band
        problem = {"message": f"{type(error).__name__}: {error}", "type": "server_error"}
        yield f"data: {json.dumps({'error': problem})}\n\n"
    yield "data: [DONE]\n\n"


def create_app(lm, tokenizer, model_name: str | None = None, augment_timeout_s: float = 30.0) -> FastAPI:
    """The FastAPI app serving ``lm`` (an AugmentedLM) with ``tokenizer``."""
    base = getattr(lm, "base", lm)
    text_config = base.config.get_text_config()
    if model_name is None:
        model_name = getattr(getattr(lm, "config", None), "base_model", None) or str(base.config.name_or_path)
    server = _Server(lm, tokenizer, model_name, int(text_config.max_position_embeddings), augment_timeout_s)
    app = FastAPI(title="cacheaug", description="Augmented generation (arXiv 2412.17747), OpenAI-compatible.")
    app.state.cacheaug = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        message, param = _validation_message(error.errors())
        return _error(400, message, param)

    @app.exception_handler(RequestError)
    async def _refused(_: Request, error: RequestError):
        return _error(error.status, error.message, error.param)

    @app.exception_handler(Exception)
    async def _failed(_: Request, error: Exception):
        return _error(500, f"{type(error).__name__}: {error}", kind="server_error")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.model_name, "coprocessor": server.num_latents > 0,
                "num_latents": server.num_latents, "max_context": server.max_context,
                "chat": bool(getattr(tokenizer, "chat_template", None))}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "cacheaug"}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        ids = tokenizer(request.prompt, return_tensors="pt").input_ids
        return _respond(server, ids, request, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(404, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [message.model_dump() for message in request.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        return _respond(server, ids, request, chat=True)

    return app


def serve(lm, tokenizer, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve ``create_app(lm, tokenizer, **options)`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(lm, tokenizer, **options), host=host, port=port, log_level="info")
