"""The loopback server and the load-test clients, plain and streaming (benchmarks/serve.py uses them)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cacheaug.serving.loadtest import (
    BackgroundServer,
    percentile,
    resident_memory_bytes,
    run_load_test,
    run_stream_load_test,
)
from cacheaug.serving.server import create_app

# `model` (the perturbed tiny AugmentedLM and its tokenizer) comes from conftest.py.


def test_loopback_server_and_load_test(model):
    import httpx

    lm, tokenizer = model
    with BackgroundServer(create_app(lm, tokenizer)) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        payloads = [{"prompt": f"load {i}", "max_tokens": 4, "temperature": 0, "augment": "async"} for i in range(6)]
        result = run_load_test(server.url, payloads, concurrency=3)
        assert result.errors == 0 and result.requests == 6 and result.latency_p95_s >= result.latency_p50_s > 0
        refused = run_load_test(server.url, [{"prompt": "x", "max_tokens": 0}], concurrency=1)
        assert refused.errors == 1 and "HTTP 400" in refused.error_samples[0]


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)


PIECE_GAP_S = 0.01  # between the fake server's chunks, so the first token comes measurably before the last


def _fake_openai_app():
    """SSE in OpenAI's text_completion chunk format: ``max_tokens`` one-word chunks (none for "silent"), a final
    chunk with finish_reason and usage, then [DONE]; "/bad" prompts get an in-band error, "/busy" an HTTP 503.
    Requests without ``authorization: Bearer sesame`` get a 401, so the headers are checked to arrive."""
    app = FastAPI()

    def chunk(text: str, reason: str | None = None, **extra) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        body = {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake", "choices": [choice]}
        return f"data: {json.dumps({**body, **extra})}\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        if request.headers.get("authorization") != "Bearer sesame":
            return JSONResponse({"error": {"message": "no key"}}, status_code=401)
        body = await request.json()
        if body["prompt"] == "busy":
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        if body.get("stream") is not True:
            return JSONResponse({"error": {"message": "this fake only streams"}}, status_code=400)
        tokens = 0 if body["prompt"] == "silent" else body["max_tokens"]

        async def events():
            if body["prompt"] == "bad":
                yield f"data: {json.dumps({'error': {'message': 'boom', 'type': 'server_error'}})}\n\n"
            else:
                for index in range(tokens):
                    await asyncio.sleep(PIECE_GAP_S)
                    yield chunk(f" w{index}")
                usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": 1 + tokens}
                yield chunk("", "length", usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_stream_load_test_times_tokens_and_counts_errors():
    auth = {"authorization": "Bearer sesame"}
    with BackgroundServer(_fake_openai_app()) as server:
        payloads = [{"prompt": f"p{i}", "max_tokens": 3 + i % 3} for i in range(6)]  # 3, 4, 5, 3, 4, 5 tokens
        result = run_stream_load_test(server.url, payloads, concurrency=3, headers=auth)
        assert result.errors == 0 and result.requests == 6 and result.error_samples == []
        assert result.generated_tokens == 24 and result.tokens_per_s == pytest.approx(24 / result.wall_s)
        assert 0 < result.ttft_p50_s <= result.ttft_p95_s <= result.latency_p95_s
        assert result.ttft_p50_s <= result.latency_p50_s <= result.latency_p95_s <= result.wall_s
        # after the first token, each of the rest takes one gap
        assert PIECE_GAP_S * 0.8 <= result.token_latency_p50_s <= result.token_latency_p95_s < 1.0
        assert set(result.to_dict()) >= {"ttft_p95_s", "token_latency_p95_s", "tokens_per_s", "error_samples"}

        silent = run_stream_load_test(server.url, [{"prompt": "silent", "max_tokens": 3}], 1, headers=auth)
        assert silent.errors == 0 and silent.generated_tokens == 0
        assert 0 < silent.ttft_p50_s <= silent.latency_p50_s  # no text: the final chunk's time

        mixed = [{"prompt": prompt, "max_tokens": 2} for prompt in ("bad", "busy", "ok")]
        failed = run_stream_load_test(server.url, mixed, concurrency=2, headers=auth)
        assert failed.errors == 2 and failed.generated_tokens == 2 and len(failed.error_samples) == 2
        assert any("in-band error" in sample and "boom" in sample for sample in failed.error_samples)
        assert any(sample.startswith("HTTP 503") for sample in failed.error_samples)

        unauthorised = run_stream_load_test(server.url, payloads[:4], concurrency=2)
        assert unauthorised.errors == 4 and len(unauthorised.error_samples) == 3  # only the first 3 kept
        assert unauthorised.error_samples[0].startswith("HTTP 401")
        assert unauthorised.tokens_per_s == 0 and unauthorised.ttft_p50_s != unauthorised.ttft_p50_s  # nan
        plain = run_load_test(server.url, [{"prompt": "busy", "max_tokens": 1}], 1, headers=auth)
        assert plain.errors == 1 and plain.error_samples[0].startswith("HTTP 503")


def test_stream_load_test_against_the_server(model):
    lm, tokenizer = model
    with BackgroundServer(create_app(lm, tokenizer)) as server:
        payloads = [{"prompt": f"stream {i}", "max_tokens": 5, "temperature": 0, "augment": "off"} for i in range(3)]
        result = run_stream_load_test(server.url, payloads, concurrency=2)
        assert result.errors == 0 and 3 <= result.generated_tokens <= 15  # eos may end one early
        assert 0 < result.ttft_p50_s <= result.latency_p50_s
        refused = run_stream_load_test(server.url, [{"prompt": "x", "max_tokens": 0}], concurrency=1)
        assert refused.errors == 1 and "HTTP 400" in refused.error_samples[0]


def test_resident_memory_bytes():
    rss = resident_memory_bytes()
    assert 10 * 2**20 < rss < 64 * 2**30  # a Python process with torch loaded: tens of MiB at least
    assert resident_memory_bytes(os.getpid()) == pytest.approx(rss, rel=0.5)
    ballast = bytearray(64 * 2**20)  # touched pages count: RSS grows by about 64 MiB
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])
    assert resident_memory_bytes() - rss > 32 * 2**20
    del ballast
