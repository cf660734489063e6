"""Hostile and malformed bodies for /v1/completions and /v1/chat/completions: every one is refused 4xx with an
OpenAI-shaped ``{"error": {"message": ...}}``, never 5xx or 200, and the server keeps serving afterwards.

The bodies are a fixed list plus seeded random combinations of bad fields, so a failure names a case that reruns.
EDGE_VALID holds the few valid requests at the edge of the sampling ranges: they must be served, not refused.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from cacheaug.models import byte_tokenizer
from cacheaug.serving.loadtest import BackgroundServer
from cacheaug.serving.server import create_app
from helpers import CHAT_TEMPLATE

# `model` (the perturbed tiny AugmentedLM and its tokenizer) comes from conftest.py.

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
JSON = "application/json"
# Valid bodies the mutations start from (test_the_unmutated_bodies_are_served): two tokens, greedy, so a mutation
# the server wrongly accepts costs milliseconds.
VALID = {
    COMPLETIONS: {"prompt": "hi", "max_tokens": 2, "temperature": 0},
    CHAT: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0},
}

# Each value is invalid for its field on its own (wrong type under strict validation, or out of range), so any body
# holding one must be refused. Edge values that are valid are not here but in EDGE_OVERRIDES, so that random
# combinations never land on one.
BAD_VALUES: dict[str, list] = {
    "model": [42, 4.2, True, ["m"], {"id": "m"}],
    "max_tokens": ["8", 2.0, 2.5, True, False, [2], {"value": 2}, 10**30, -(10**30), -1, 0],
    "temperature": ["0.5", None, True, [0.5], {}, -1, -1e-300, -1e308],
    "top_p": ["1", None, True, [1], {}, 0, 0.0, -0.5, 2, 1.0000001, 1e308],
    "seed": ["1", 1.5, 1.0, True, [1], {}, 2**70, 2**63, -1],
    "stop": [42, True, {}, {"s": "a"}, [1], [None], [["a"]], [True], ["a"] * 5, ["a"] * 1000, [{"s": "a"}]],
    "stream": ["yes", "true", 1, 0, None, [], {}],
    "n": [5, 0, -1, None, "1", 1.0, True, [1]],
    "user": [42, [], {}, True],
    "augment": ["maybe", "", "SYNC", None, 1, True, [], {}],
    "reaugment_every": [0, -3, "4", 4.5, True, [], {}],
}
BAD_PROMPTS = [42, 1.5, None, True, False, ["hi"], [1, 2], [], {}, {"text": "hi"}, ""]
BAD_MESSAGES = [
    "hi", None, 42, [], {}, {"role": "user", "content": "hi"}, ["hi"], [None], [["user", "hi"]], [{}],
    [{"role": "user"}], [{"content": "hi"}], [{"role": "robot", "content": "hi"}], [{"role": "tool", "content": "hi"}],
    [{"role": "developer", "content": "hi"}], [{"role": "USER", "content": "hi"}], [{"role": None, "content": "hi"}],
    [{"role": 1, "content": "hi"}], [{"role": "user", "content": None}], [{"role": "user", "content": 42}],
    [{"role": "user", "content": ["hi"]}], [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "user", "content": {"text": "hi"}}], [{"role": "user", "content": "hi", "name": "bob"}],
    [{"role": "user", "content": "hi"}, "and then"],
]
UNKNOWN_FIELDS = [
    "temprature", "logprobs", "echo", "best_of", "frequency_penalty", "presence_penalty", "logit_bias", "suffix",
    "stream_options", "", "__proto__", "max_tokens ", "Prompt",
]
# Values at the edge of the ranges, by case name: valid (EDGE_VALID) or refused (a temperature past OpenAI's 2).
EDGE_OVERRIDES: dict[str, dict] = {
    "temperature=1e-300": {"temperature": 1e-300},
    "temperature=1e+308": {"temperature": 1e308},
    "top_p=1e-300, sampled": {"temperature": 1.0, "top_p": 1e-300},  # greedy would never read top_p
}


@dataclass(frozen=True)
class Case:
    name: str  # stable across runs: EDGE_VALID and failure reports name cases by it
    path: str
    body: bytes
    content_type: str | None = JSON


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


def _endpoint(path: str) -> str:
    return "chat" if path == CHAT else "completions"


def _json_case(path: str, name: str, body: dict) -> Case:
    return Case(f"{_endpoint(path)}:{name}", path, json.dumps(body).encode())


def _field_cases() -> list[Case]:
    """Every bad value of every field, alone on an otherwise valid body, at both endpoints."""
    cases = []
    for path, valid in VALID.items():
        for name, values in BAD_VALUES.items():
            cases += [_json_case(path, f"{name}={_short(v)}", {**valid, name: v}) for v in values]
        cases += [_json_case(path, name, {**valid, **override}) for name, override in EDGE_OVERRIDES.items()]
        for name in UNKNOWN_FIELDS:
            # a value no field's type takes, so the refusal holds even once the server learns the name
            cases.append(_json_case(path, f"unknown field {name!r}", {**valid, name: [[["x"]]]}))
        cases.append(_json_case(path, "stream with a bad max_tokens", {**valid, "stream": True, "max_tokens": 0}))
    cases += [_json_case(COMPLETIONS, f"prompt={_short(v)}", {**VALID[COMPLETIONS], "prompt": v}) for v in BAD_PROMPTS]
    cases += [_json_case(CHAT, f"messages={_short(v)}", {**VALID[CHAT], "messages": v}) for v in BAD_MESSAGES]
    cases.append(_json_case(CHAT, "a prompt on chat", {**VALID[CHAT], "prompt": "hi"}))
    cases.append(_json_case(COMPLETIONS, "messages on completions", {**VALID[COMPLETIONS], "messages": []}))
    return cases


def _long_cases(tokenizer, max_context: int) -> list[Case]:
    """Prompts past the model's context, sized with the served tokenizer (and its chat template, as the server
    renders it); and prompts that fit but leave no room for the latents and a token."""

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    def chat_tokens(messages: list[dict]) -> int:
        return tokens(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    over = "x" * (max_context + 1)
    multibyte = "é" * (max_context // 2 + 1)  # fewer characters than positions, more byte tokens
    snug = "y" * (max_context - 2)  # fits alone; the 4 latents and one token do not
    overhead = chat_tokens([{"role": "user", "content": ""}])
    snug_messages = [{"role": "user", "content": "y" * (max_context - 2 - overhead)}]
    many = [{"role": "user", "content": "x"}] * max_context
    assert tokens(over) > max_context and tokens(multibyte) > max_context and len(multibyte) < max_context
    assert tokens(snug) == chat_tokens(snug_messages) == max_context - 2 and chat_tokens(many) > max_context
    completions, chat = VALID[COMPLETIONS], VALID[CHAT]
    return [
        _json_case(COMPLETIONS, "max_tokens past the context", {**completions, "max_tokens": max_context + 1}),
        _json_case(CHAT, "max_tokens past the context", {**chat, "max_tokens": max_context + 1}),
        _json_case(COMPLETIONS, "prompt past the context", {**completions, "prompt": over}),
        _json_case(COMPLETIONS, "multibyte prompt past the context", {**completions, "prompt": multibyte}),
        _json_case(COMPLETIONS, "prompt leaving no room", {**completions, "prompt": snug, "max_tokens": 1}),
        _json_case(COMPLETIONS, "prompt leaving no room, default max_tokens", {"prompt": snug}),
        _json_case(CHAT, "message past the context", {**chat, "messages": [{"role": "user", "content": over}]}),
        _json_case(CHAT, "messages past the context", {**chat, "messages": many}),
        _json_case(CHAT, "message leaving no room", {**chat, "messages": snug_messages}),
        _json_case(CHAT, "message leaving no room, default max_tokens", {"messages": snug_messages}),
    ]


def _raw_cases() -> list[Case]:
    """Bodies that are not JSON objects, or whose JSON text json.dumps would never write."""
    raw = {
        "empty body": b"",
        "blank body": b"  \n ",
        "NUL byte": b"\x00",
        "truncated object": b'{"prompt": "hi", "max_tokens": 2',
        "truncated string": b'{"prompt": "h',
        "only an open brace": b"{",
        "trailing comma": b'{"prompt": "hi",}',
        "single quotes": b"{'prompt': 'hi'}",
        "unquoted key": b'{prompt: "hi"}',
        "trailing garbage": b'{"prompt": "hi", "max_tokens": 2} extra',
        "two objects": b'{"prompt": "hi"}{"prompt": "hi"}',
        "whole body an array": b'[{"prompt": "hi", "max_tokens": 2}]',
        "whole body an empty array": b"[]",
        "whole body a string": b'"hi"',
        "whole body a number": b"42",
        "whole body a float": b"-1.5e300",
        "whole body true": b"true",
        "whole body null": b"null",
        "empty object": b"{}",
        "a long array": b"[" + b"1," * 100_000 + b"1]",
        "nested lists in prompt (200)": b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}",
        "duplicate key, last one bad": b'{"prompt": "hi", "max_tokens": 2, "prompt": 5}',
        "prompt NaN": b'{"prompt": NaN, "max_tokens": 2}',
        "max_tokens NaN": b'{"prompt": "hi", "max_tokens": NaN}',
        "max_tokens Infinity": b'{"prompt": "hi", "max_tokens": Infinity}',
        "max_tokens 1e400": b'{"prompt": "hi", "max_tokens": 1e400}',
        "temperature NaN": b'{"prompt": "hi", "max_tokens": 2, "temperature": NaN}',
        "temperature -Infinity": b'{"prompt": "hi", "max_tokens": 2, "temperature": -Infinity}',
        "top_p NaN": b'{"prompt": "hi", "max_tokens": 2, "top_p": NaN}',
        "top_p Infinity": b'{"prompt": "hi", "max_tokens": 2, "top_p": Infinity}',
        "seed NaN": b'{"prompt": "hi", "max_tokens": 2, "seed": NaN}',
        "seed -Infinity": b'{"prompt": "hi", "max_tokens": 2, "seed": -Infinity}',
        # known gaps, below
        "invalid UTF-8 before the object": b'\xff{"prompt": "hi", "max_tokens": 2}',
        "temperature Infinity": b'{"prompt": "hi", "max_tokens": 2, "temperature": Infinity}',
        "temperature 1e400": b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e400}',
        "invalid UTF-8 in prompt": b'{"prompt": "hi \xff\xfe", "max_tokens": 2}',
        "overlong UTF-8 in prompt": b'{"prompt": "\xc0\xaf", "max_tokens": 2}',
        "UTF-8-encoded surrogate in prompt": b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}',
        "lone surrogate in prompt": b'{"prompt": "\\ud800", "max_tokens": 2}',
        "nested lists as the body (100000)": b"[" * 100_000,
        "nested lists in prompt (100000)": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "max_tokens with 5000 digits": b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
        "temperature 1e-300, streamed": b'{"prompt": "hi", "max_tokens": 2, "temperature": 1e-300, "stream": true}',
    }
    cases = [Case(f"completions:{name}", COMPLETIONS, body) for name, body in raw.items()]
    chat_raw = {
        "empty body": b"",
        "truncated object": b'{"messages": [{"role": "user", "content": "hi"}',
        "whole body an array": b'[{"role": "user", "content": "hi"}]',
        "content NaN": b'{"messages": [{"role": "user", "content": NaN}], "max_tokens": 2}',
        "temperature 1e-300, streamed":
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 1e-300, '
            b'"stream": true}',
        "invalid UTF-8 in content": b'{"messages": [{"role": "user", "content": "\xff"}], "max_tokens": 2}',
        "UTF-8-encoded surrogate in content":
            b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 2}',
        "lone surrogate in content": b'{"messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}',
    }
    cases += [Case(f"chat:{name}", CHAT, body) for name, body in chat_raw.items()]
    return cases


def _content_type_cases() -> list[Case]:
    """Valid JSON bodies sent as something other than JSON."""
    types = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"]
    return [
        Case(f"{_endpoint(path)}:Content-Type {kind}", path, json.dumps(valid).encode(), kind)
        for path, valid in VALID.items() for kind in types
    ]


def _random_cases(count: int = 120, seed: int = 2412_17747) -> list[Case]:
    """``count`` valid bodies with one to three fields made bad, sometimes an unknown field, sometimes streamed."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        path = rng.choice([COMPLETIONS, CHAT])
        body = dict(VALID[path])
        table = {**BAD_VALUES, **({"messages": BAD_MESSAGES} if path == CHAT else {"prompt": BAD_PROMPTS})}
        for name in rng.sample(sorted(table), rng.randint(1, 3)):
            body[name] = rng.choice(table[name])
        if rng.random() < 0.2:
            body[rng.choice(UNKNOWN_FIELDS)] = rng.choice([1, "x", None, [], {}])
        if rng.random() < 0.3 and "stream" not in body:
            body["stream"] = True  # refused before the status line, so never an in-band error
        cases.append(Case(f"{_endpoint(path)}:random {index:03d}", path, json.dumps(body).encode()))
    return cases


def hostile_cases(tokenizer, max_context: int) -> dict[str, Case]:
    """Every case by name; ``tokenizer`` is the served one, with its chat template."""
    cases = [*_field_cases(), *_long_cases(tokenizer, max_context), *_raw_cases(), *_content_type_cases(),
             *_random_cases()]
    by_name = {case.name: case for case in cases}
    assert len(by_name) == len(cases), "two cases share a name"
    return by_name


# Valid requests at the edge of the ranges, not refusals: a temperature or top_p so small that float32 rounds the
# distribution to the top token. They must be answered 200 with a completion (the fixed list has them so that the
# sampler is fuzzed too); everything else must be refused 4xx.
EDGE_VALID = {
    "completions:temperature=1e-300", "chat:temperature=1e-300", "completions:top_p=1e-300, sampled",
    "chat:top_p=1e-300, sampled", "completions:temperature 1e-300, streamed", "chat:temperature 1e-300, streamed",
}


def _problem(response) -> str | None:
    """None for a 4xx whose JSON body has a non-empty ``error.message``; else what came back instead."""
    answer = f"HTTP {response.status_code}: {response.text[:300]!r}"
    if not 400 <= response.status_code < 500:
        return answer
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"{answer} (no error.message)"
    return None if isinstance(message, str) and message.strip() else f"{answer} (empty error.message)"


def _post(client, case: Case):
    headers = {"content-type": case.content_type} if case.content_type else {}
    return client.post(case.path, content=case.body, headers=headers)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The tiny model's byte tokenizer with a chat template: without one every chat body would get a 404 before its
    fields are looked at."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def client(model, chat_tokenizer):
    lm, _ = model
    with TestClient(create_app(lm, chat_tokenizer), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def cases(model, chat_tokenizer):
    lm, _ = model
    return hostile_cases(chat_tokenizer, int(lm.base.config.max_position_embeddings))


def test_the_unmutated_bodies_are_served(client):
    """The mutations start from bodies the server accepts, so each refusal is down to what was mutated."""
    for path, body in VALID.items():
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text


def test_hostile_bodies_get_4xx_with_an_error_message(client, cases):
    assert len(cases) >= 200 and EDGE_VALID <= set(cases)
    checked = [case for name, case in cases.items() if name not in EDGE_VALID]
    problems = [f"{case.name}: {case.body[:120]!r} -> {problem}"
                for case in checked if (problem := _problem(_post(client, case))) is not None]
    assert not problems, f"{len(problems)} of {len(checked)} bodies mishandled:\n" + "\n".join(problems)
    assert client.get("/health").status_code == 200
    assert client.post(COMPLETIONS, json=VALID[COMPLETIONS]).status_code == 200  # and it still generates


@pytest.mark.parametrize("name", sorted(EDGE_VALID))
def test_edge_of_range_sampling_is_served(client, cases, name):
    response = _post(client, cases[name])
    assert response.status_code == 200, response.text[:300]
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
    else:
        assert response.json()["usage"]["completion_tokens"] >= 1


def test_a_hostile_request_never_fails_the_request_decoded_beside_it(model):
    """A request at the edge of the sampler's range, decoded in the same batch, never disturbs a bystander."""
    import httpx

    lm, tokenizer = model
    bystander = {"prompt": "a bystander", "max_tokens": 48, "temperature": 0, "augment": "off", "stream": True}
    hostile = {"prompt": "x", "max_tokens": 2, "temperature": 1e-300, "augment": "off"}
    with BackgroundServer(create_app(lm, tokenizer)) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", COMPLETIONS, json=bystander) as response:
            lines = response.iter_lines()
            seen = [next(line for line in lines if line.startswith("data:"))]  # it is decoding now
            http.post(COMPLETIONS, json=hostile)
            seen += [line for line in lines if line.startswith("data:")]
    assert seen[-1] == "data: [DONE]" and not any('"error"' in line for line in seen), seen[-3:]
