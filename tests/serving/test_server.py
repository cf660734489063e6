"""The HTTP server: strict validation with 4xx messages, SSE equal to the plain response, concurrent requests
equal to sequential ones, a broken coprocessor never failing a request, and a loopback load test."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from cacheaug import AugmentedLM, CoprocessorConfig, load_base
from cacheaug.models import byte_tokenizer
from cacheaug.serving.server import create_app
from helpers import CHAT_TEMPLATE

# `model` (the perturbed tiny AugmentedLM and its tokenizer) comes from conftest.py.


@pytest.fixture(scope="module")
def client(model):
    lm, tokenizer = model
    with TestClient(create_app(lm, tokenizer)) as test_client:
        yield test_client


def _complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"max_tokens": 12, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _sse(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events) and events[-1] == "data: [DONE]"
    return [json.loads(block[len("data: ") :]) for block in events[:-1]]


def test_health(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny-random"
    assert health["coprocessor"] and health["num_latents"] == 4 and health["max_context"] == 2048
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-random"


@pytest.mark.parametrize(
    "body, message",
    [
        ("{not json", "invalid JSON"),
        ('[1, 2]', "JSON object"),
        ('{"max_tokens": 4}', "'prompt' is required"),
        ('{"prompt": "hi", "temprature": 0.5}', "unknown field 'temprature'"),
        ('{"prompt": 42}', "'prompt': Input should be a valid string"),
        ('{"prompt": "hi", "max_tokens": "8"}', "'max_tokens': Input should be a valid integer"),
        ('{"prompt": "hi", "stream": "yes"}', "'stream'"),
        ('{"prompt": "hi", "augment": "maybe"}', "'augment'"),
        ('{"prompt": "hi", "max_tokens": 0}', "max_tokens must be between 1 and 2048"),
        ('{"prompt": "hi", "max_tokens": 1000000}', "max_tokens must be between 1 and 2048"),
        ('{"prompt": "hi", "max_tokens": 2046}', "exceed the model's context of 2048"),
        (json.dumps({"prompt": "x" * 2049}), "longer than the model's context of 2048"),
        ('{"prompt": ""}', "the prompt is empty"),
        ('{"prompt": "hi", "temperature": -0.5}', "'temperature': Input should be greater than or equal to 0"),
        ('{"prompt": "hi", "top_p": 0}', "'top_p': Input should be greater than 0"),
        ('{"prompt": "hi", "top_p": 1.5}', "'top_p'"),
        ('{"prompt": "hi", "n": 2}', "'n'"),
        ('{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "at most 4 items"),
        ('{"prompt": "\\ud800"}', "'prompt' is not valid Unicode"),
        (b'{"prompt": "\xff"}', "the body could not be parsed"),
    ],
)
def test_invalid_requests_get_4xx_with_a_message_and_the_server_keeps_serving(client, body, message):
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert _complete(client, prompt="still serving")["choices"][0]["finish_reason"] in ("length", "stop")


def test_completion_reports_augmentation(client, model):
    lm, tokenizer = model
    augmented = _complete(client, prompt="The answer is")
    plain = _complete(client, prompt="The answer is", augment="off")
    assert augmented["augmentation"] == {
        "requested": "sync", "status": "applied", "applied": True, "insertions": [0], "num_latents": 4, "bank": None
    }
    assert plain["augmentation"]["status"] == "off" and not plain["augmentation"]["applied"]
    ids = tokenizer("The answer is", return_tensors="pt").input_ids
    expected = lm.generate(ids, 12, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1] :]
    assert augmented["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    usage = {"prompt_tokens": 13, "completion_tokens": len(expected), "total_tokens": 13 + len(expected)}
    assert augmented["usage"] == usage
    assert augmented["object"] == "text_completion"
    reaugmented = _complete(client, prompt="The answer is", reaugment_every=5)
    assert reaugmented["augmentation"]["insertions"] == [0, 5, 10]


@pytest.mark.parametrize("body", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.8, "seed": 11}])
def test_sse_chunks_concatenate_to_the_plain_text(client, body):
    request = {"prompt": "Once upon a time", "max_tokens": 20, **body}
    plain = client.post("/v1/completions", json=request).json()
    chunks = _sse(client, "/v1/completions", request)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["choices"][0]["text"]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["augmentation"]["applied"] and chunks[-1]["usage"] == plain["usage"]


def test_stop_strings(client):
    full = _complete(client, prompt="Stop here", max_tokens=20)["choices"][0]["text"]
    stop = full[6:8]
    stopped = _complete(client, prompt="Stop here", max_tokens=20, stop=stop)
    assert stopped["choices"][0]["text"] == full[: full.find(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    body = {"prompt": "Stop here", "max_tokens": 20, "temperature": 0, "stop": [stop]}
    chunks = _sse(client, "/v1/completions", body)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == full[: full.find(stop)]
    one_long = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stop": "a stop string of 30 chars"})
    assert one_long.status_code == 200  # the 4-item limit is on lists, not on a single string's length


def test_concurrent_requests_equal_sequential_ones(client):
    requests = [
        {"prompt": f"Request number {i} asks something {'longer ' * i}", "max_tokens": 10,
         "augment": ["sync", "off"][i % 2], **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {"temperature": 0})}
        for i in range(8)
    ]
    sequential = [client.post("/v1/completions", json=r).json()["choices"][0]["text"] for r in requests]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda r: client.post("/v1/completions", json=r), requests))
    concurrent = [response.json()["choices"][0]["text"] for response in responses]
    assert concurrent == sequential
    assert len(set(sequential)) >= 4  # the prompts lead to different texts: a mix-up would show


def test_broken_coprocessor_never_fails_a_request(model, monkeypatch):
    lm, tokenizer = model

    def explode(*args, **kwargs):
        raise RuntimeError("no latents today")

    with TestClient(create_app(lm, tokenizer)) as client:
        plain = _complete(client, prompt="Robust", augment="off")
        monkeypatch.setattr(lm.coprocessor, "forward", explode)
        for augment in ("sync", "async"):
            broken = _complete(client, prompt="Robust", augment=augment)
            assert broken["augmentation"]["status"] == "failed: RuntimeError: no latents today"
            assert not broken["augmentation"]["applied"]
            assert broken["choices"][0]["text"] == plain["choices"][0]["text"]


def test_chat_needs_a_template_and_streams(model):
    lm, _ = model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    with TestClient(create_app(lm, byte_tokenizer())) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages})
        assert response.status_code == 404 and "chat template" in response.json()["error"]["message"]
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    with TestClient(create_app(lm, tokenizer)) as client:
        body = {"messages": messages, "max_tokens": 10, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
        rendered = "<system>Be brief.\n<user>Hi?\n<assistant>"
        same = client.post("/v1/completions", json={"prompt": rendered, "max_tokens": 10, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"] == same["choices"][0]["text"]
        chunks = _sse(client, "/v1/chat/completions", body)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        assert streamed == reply["choices"][0]["message"]["content"]
        bad = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert bad.status_code == 400 and "messages.0.role" in bad.json()["error"]["message"]


def test_serve_cli_loads_the_checkpoint(tmp_path, monkeypatch):
    import cacheaug.serving.server
    from cacheaug.cli import main

    base, _ = load_base("tiny-random")
    AugmentedLM(base, CoprocessorConfig(num_latents=4)).save_pretrained(tmp_path / "ckpt")
    calls = []
    monkeypatch.setattr(cacheaug.serving.server, "serve", lambda lm, tokenizer, **options: calls.append((lm, options)))
    assert main(["serve", "--ckpt", str(tmp_path / "ckpt"), "--port", "8123"]) == 0
    lm, options = calls[0]
    assert lm.config.num_latents == 4 and options == {
        "host": "127.0.0.1", "port": 8123, "augment_timeout_s": 30.0, "max_batch": 32, "max_queue": 64,
        "request_timeout_s": 600.0, "bank": None, "api_key": None,
    }
    monkeypatch.setenv("CACHEAUG_API_KEY", "from-the-environment")
    assert main(["serve", "--ckpt", str(tmp_path / "ckpt"), "--max-batch", "4"]) == 0
    assert calls[1][1]["api_key"] == "from-the-environment" and calls[1][1]["max_batch"] == 4
    assert main(["serve", "--ckpt", str(tmp_path / "ckpt"), "--bank", str(tmp_path / "nowhere")]) == 2


def test_chat_default_max_tokens_fill_the_context_with_room_for_latents(client):
    from cacheaug.serving.server import ChatCompletionRequest

    server = client.app.state.cacheaug
    messages = [{"role": "user", "content": "x"}]
    for options, latents_per_token in (({}, 0), ({"reaugment_every": 8}, 4 / 8), ({"augment": "off"}, 0)):
        request = ChatCompletionRequest(messages=messages, **options)
        max_tokens = server.check_lengths(1000, request, chat=True)
        first = 0 if request.augment == "off" else 4
        assert 1000 + first + max_tokens * (1 + latents_per_token) <= 2048
        assert 1000 + first + (max_tokens + 8) * (1 + latents_per_token) > 2048 - 8  # and nearly fill it


def test_an_api_key_guards_every_endpoint_but_health(model):
    lm, tokenizer = model
    body = {"prompt": "Who goes there", "max_tokens": 3}
    with TestClient(create_app(lm, tokenizer, api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret-and-more"}):
            for method, path in (("post", "/v1/completions"), ("get", "/metrics"), ("get", "/v1/models")):
                response = getattr(client, method)(path, headers=headers, **({"json": body} if method == "post" else {}))
                assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
                assert response.headers["www-authenticate"] == "Bearer" and "choices" not in response.json()
        assert client.app.state.cacheaug.scheduler.counters["tokens"] == 0  # nothing was decoded for them
        good = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3


def test_metrics_are_prometheus_text(client):
    _complete(client, prompt="Count me")
    client.post("/v1/completions", json={"prompt": 7})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    for name in ("cacheaug_queue_depth", "cacheaug_active_rows", "cacheaug_tokens_per_second",
                 "cacheaug_generated_tokens_total"):
        assert name in samples
    assert samples['cacheaug_requests_total{outcome="completed"}'] >= 1
    assert samples['cacheaug_errors_total{status="400"}'] >= 1 and samples["cacheaug_generated_tokens_total"] >= 12


def test_a_full_queue_answers_503_and_a_disconnect_frees_the_row(model):
    import httpx

    from cacheaug.serving.loadtest import BackgroundServer

    lm, tokenizer = model
    app = create_app(lm, tokenizer, max_batch=1, max_queue=0)
    scheduler = app.state.cacheaug.scheduler
    long = {"prompt": "A long story", "max_tokens": 1500, "temperature": 0, "augment": "off", "stream": True}
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long) as stream:
            assert stream.status_code == 200
            # decoding: the only row is taken. The iterator is kept: a discarded one is closed at once, and with it
            # the connection, so the server would see a disconnect and free the row before the next request
            lines = stream.iter_lines()
            next(lines)
            busy = http.post("/v1/completions", json={"prompt": "me too", "max_tokens": 2})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "busy" in busy.json()["error"]["message"]
        deadline = time.monotonic() + 10  # the client has gone: its row must be freed, not decoded to the end
        while scheduler.active_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active_rows == 0 and scheduler.counters["cancelled"] == 1
        assert scheduler.counters["tokens"] < 1000
        assert http.post("/v1/completions", json={"prompt": "me too", "max_tokens": 2}).status_code == 200


def test_a_banked_prefix_gives_the_completion_computed_afresh(model, tmp_path):
    import torch

    from cacheaug.serving.bank import CacheBank
    from cacheaug.stream import generate_text

    lm, tokenizer = model
    context = "A long shared document that many questions are asked about. " * 3
    bank = CacheBank(tmp_path / "bank", lm, tokenizer)
    bank.add_text(context)
    context_ids = tokenizer(context).input_ids
    with TestClient(create_app(lm, tokenizer, bank=CacheBank(tmp_path / "bank", lm, tokenizer))) as client:
        for question, augment in (("Q: what is it about?", "sync"), ("Q: and then?", "async"), ("", "sync")):
            reply = _complete(client, prompt=context + question, max_tokens=10, augment=augment)
            rest = tokenizer(context + question).input_ids[len(context_ids):]
            with torch.no_grad():
                fresh = lm.augment(torch.tensor([context_ids]))  # the banked context computed afresh
            mode = augment if rest else "off"  # a prompt that is the context decodes from its latents
            delay = reply["augmentation"]["insertions"][-1] if augment == "async" else None
            expected = generate_text(lm, torch.tensor([rest], dtype=torch.long), 10, augment=mode, context=fresh,
                                     tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id,
                                     async_delay_tokens=delay)
            assert reply["choices"][0]["text"] == expected.text
            bank_use = reply["augmentation"]["bank"]
            assert bank_use["prefix_tokens"] == len(context_ids) and bank_use["status"].startswith("hit")
            assert reply["usage"]["prompt_tokens"] == len(context_ids) + len(rest)
        unbanked = _complete(client, prompt="Something else entirely", max_tokens=4)
        assert unbanked["augmentation"]["bank"] is None
        off = _complete(client, prompt=context + "Q: plain?", max_tokens=4, augment="off")
        assert off["augmentation"]["bank"] is None  # the bank holds augmented contexts: not for "off"
        assert client.get("/metrics").text.count("cacheaug_bank_hits_total 3") == 1


def test_binding_beyond_loopback_without_a_key_warns(model, monkeypatch, capsys):
    import uvicorn

    from cacheaug.serving import server

    lm, tokenizer = model
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    server.serve(lm, tokenizer, host="0.0.0.0")
    assert "without an API key" in capsys.readouterr().err
    for host, options in (("0.0.0.0", {"api_key": "k"}), ("127.0.0.1", {}), ("localhost", {}), ("::1", {})):
        server.serve(lm, tokenizer, host=host, **options)
        assert "API key" not in capsys.readouterr().err


def test_a_client_that_gives_up_on_a_plain_request_frees_its_row(model):
    import httpx

    from cacheaug.serving.loadtest import BackgroundServer

    lm, tokenizer = model
    app = create_app(lm, tokenizer)
    scheduler = app.state.cacheaug.scheduler
    scheduler.eos_token_id = None  # no early end: the request outlasts the client's patience
    long = {"prompt": "A long answer", "max_tokens": 1800, "temperature": 0, "augment": "off"}
    with BackgroundServer(app) as server:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.3) as http:
            http.post("/v1/completions", json=long)  # no stream: the client waits, then hangs up
        deadline = time.monotonic() + 10
        while (scheduler.active_rows or not scheduler.counters["cancelled"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active_rows == 0 and scheduler.counters["cancelled"] == 1
        assert scheduler.counters["tokens"] < 1800
