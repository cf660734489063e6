"""A loopback server in a thread and an HTTP load-test client for it (tests and benchmarks/serve.py)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

__all__ = ["BackgroundServer", "LoadResult", "percentile", "run_load_test"]


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


def run_load_test(url: str, payloads: list[dict], concurrency: int, timeout_s: float = 300.0) -> LoadResult:
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

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout_s, limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
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
