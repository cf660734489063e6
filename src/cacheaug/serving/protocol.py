"""The OpenAI-compatible request bodies (strict pydantic models) and the OpenAI-shaped error answers: what a
request may hold, and the one readable sentence a refused one gets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import CacheaugError

__all__ = [
    "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "RequestError", "SamplingFields", "StrictModel", "check_text",
    "error_response", "validation_message",
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplingFields(StrictModel):
    model: str | None = None
    max_tokens: int | None = None  # None: 16 for completions, the rest of the context for chat
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0 = greedy; OpenAI's range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # up to 4 stop strings, as OpenAI
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None
    augment: Literal["off", "sync", "async"] = "sync"
    reaugment_every: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class RequestError(CacheaugError):
    """A request the server refuses; answered with ``status`` and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 499: "cancelled", 503: "overloaded_error",
                504: "timeout_error"}


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    kind = kind or ("server_error" if status >= 500 and status not in _ERROR_TYPES else
                    _ERROR_TYPES.get(status, "invalid_request_error"))
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors) -> tuple[str, str | None]:
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


def check_text(text: str, param: str) -> None:
    """JSON may carry lone surrogates (\\ud800), which no tokenizer can encode: refused by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(400, f"'{param}' is not valid Unicode ({error.reason} at character {error.start})", param) from None
