"""A loopback server in a thread and HTTP load-test clients for it, plain and streaming (tests, benchmarks/serve.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

__all__ = [
    "BackgroundServer", "LoadResult", "StreamLoadResult", "percentile", "resident_memory_bytes", "run_load_test",
    "run_stream_load_test",
]


class BackgroundServer:
    """uvicorn serving ``app`` on ``host`` (a free port by default) in a daemon thread; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url = ""

    def __enter__(self) -> "BackgroundServer":
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))  # bound before uvicorn starts: the port is ours, no race
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    latency_p50_s: float
    latency_p95_s: float
    requests_per_s: float
    error_samples: list[str] = field(default_factory=list)  # the first few error messages

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _client(concurrency: int, timeout_s: float, headers: dict | None):
    """One httpx.Client shared by ``concurrency`` worker threads (httpx.Client is thread-safe)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.Client(timeout=timeout_s, limits=limits, headers=headers)


def run_load_test(
    url: str, payloads: list[dict], concurrency: int, timeout_s: float = 300.0, headers: dict | None = None
) -> LoadResult:
    """POST every payload to ``url``/v1/completions, ``concurrency`` at a time; latency of each successful one."""
    import httpx

    def one(client: httpx.Client, payload: dict) -> tuple[float, str | None]:
        start = time.perf_counter()
        try:
            response = client.post(f"{url}/v1/completions", json=payload)
            problem = None if response.status_code == 200 else f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"
        return time.perf_counter() - start, problem

    with _client(concurrency, timeout_s, headers) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        outcomes = list(pool.map(lambda payload: one(client, payload), payloads))
        wall = time.perf_counter() - start
    latencies = [seconds for seconds, problem in outcomes if problem is None]
    problems = [problem for _, problem in outcomes if problem is not None]
    return LoadResult(
        concurrency=concurrency, requests=len(payloads), errors=len(problems), wall_s=wall,
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        requests_per_s=len(latencies) / wall if wall > 0 else float("nan"), error_samples=problems[:3],
    )


@dataclass
class StreamLoadResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    generated_tokens: int  # usage.completion_tokens summed over the successful requests
    tokens_per_s: float  # generated_tokens / wall_s: the aggregate decode rate
    ttft_p50_s: float
    ttft_p95_s: float
    token_latency_p50_s: float  # (latency - ttft) / (tokens - 1): the gap between tokens after the first
    token_latency_p95_s: float
    latency_p50_s: float
    latency_p95_s: float
    error_samples: list[str] = field(default_factory=list)  # the first few error messages

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Streamed:
    """One streamed request: its timings, or the problem that made it an error."""

    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    completion_tokens: int = 0
    problem: str | None = None


def _read_stream(response, start: float) -> _Streamed:
    """Time the SSE of one completion: ``data: {chunk}`` lines, the last with ``usage``, then ``data: [DONE]``."""
    first_text_s = last_chunk_s = None
    usage, done = None, False
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments and other SSE fields
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return _Streamed(problem=f"not JSON in the stream: {data[:200]}")
        if not isinstance(chunk, dict):
            return _Streamed(problem=f"not a JSON object in the stream: {data[:200]}")
        if "error" in chunk:  # the status line was 200 already: the server reports failures in-band
            return _Streamed(problem=f"in-band error: {json.dumps(chunk['error'])[:200]}")
        last_chunk_s = time.perf_counter() - start
        choices = chunk.get("choices") or [{}]
        if first_text_s is None and choices[0].get("text"):
            first_text_s = last_chunk_s
        usage = chunk.get("usage") or usage
    if not done:
        return _Streamed(problem="the stream ended before data: [DONE]")
    if not isinstance((usage or {}).get("completion_tokens"), int):
        return _Streamed(problem="no usage.completion_tokens in the final chunk")
    # no text at all: the final chunk is the first answer the client sees
    ttft = first_text_s if first_text_s is not None else last_chunk_s
    return _Streamed(ttft, time.perf_counter() - start, usage["completion_tokens"])


def run_stream_load_test(
    url: str, payloads: list[dict], concurrency: int, timeout_s: float = 300.0, headers: dict | None = None
) -> StreamLoadResult:
    """POST every payload with ``"stream": true`` to ``url``/v1/completions, ``concurrency`` at a time (a closed
    loop); time to first token, gap between tokens and latency of each successful one, and the aggregate tokens/s."""
    import httpx

    def one(client: httpx.Client, payload: dict) -> _Streamed:
        start = time.perf_counter()
        try:
            with client.stream("POST", f"{url}/v1/completions", json={**payload, "stream": True}) as response:
                if response.status_code != 200:
                    response.read()
                    return _Streamed(problem=f"HTTP {response.status_code}: {response.text[:200]}")
                return _read_stream(response, start)
        except httpx.HTTPError as error:
            return _Streamed(problem=f"{type(error).__name__}: {error}")

    with _client(concurrency, timeout_s, headers) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        outcomes = list(pool.map(lambda payload: one(client, payload), payloads))
        wall = time.perf_counter() - start
    served = [outcome for outcome in outcomes if outcome.problem is None]
    problems = [outcome.problem for outcome in outcomes if outcome.problem is not None]
    ttfts = [outcome.ttft_s for outcome in served]
    latencies = [outcome.latency_s for outcome in served]
    token_latencies = [(o.latency_s - o.ttft_s) / max(o.completion_tokens - 1, 1) for o in served]
    generated = sum(outcome.completion_tokens for outcome in served)
    return StreamLoadResult(
        concurrency=concurrency, requests=len(payloads), errors=len(problems), wall_s=wall,
        generated_tokens=generated, tokens_per_s=generated / wall if wall > 0 else float("nan"),
        ttft_p50_s=percentile(ttfts, 50), ttft_p95_s=percentile(ttfts, 95),
        token_latency_p50_s=percentile(token_latencies, 50), token_latency_p95_s=percentile(token_latencies, 95),
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95), error_samples=problems[:3],
    )


def resident_memory_bytes(pid: int | None = None) -> int:
    """The resident set size of process ``pid`` (default: this one), from VmRSS in /proc/<pid>/status.

    Without /proc (not Linux) this falls back to ``resource.getrusage``, which knows only this process and gives
    its *peak* RSS (ru_maxrss), not the current one; another ``pid`` then raises FileNotFoundError.
    """
    pid = os.getpid() if pid is None else pid
    status = f"/proc/{pid}/status"
    if os.path.exists("/proc/self/status"):
        with open(status) as lines:
            for line in lines:
                if line.startswith("VmRSS:"):  # "VmRSS:	  123456 kB"
                    return int(line.split()[1]) * 1024
        return 0  # a zombie or a kernel thread: no VmRSS line, no resident memory
    if pid != os.getpid():
        raise FileNotFoundError(f"{status} is missing: the RSS of another process needs /proc")
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on the other Unixes
