"""The loopback server and the load-test client (benchmarks/serve.py uses them)."""

from __future__ import annotations

import pytest

from cacheaug.serving.loadtest import BackgroundServer, percentile, run_load_test
from cacheaug.serving.server import create_app


@pytest.fixture(scope="module")
def model():
    import torch

    from cacheaug import AugmentedLM, CoprocessorConfig, load_base

    base, tokenizer = load_base("tiny-random")
    torch.manual_seed(0)
    return AugmentedLM(base, CoprocessorConfig(num_latents=4)), tokenizer


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
