"""HTTP load test of a scoring server: concurrent clients on keep-alive connections, each request
timed from send to the last byte of the answer. Standard library only."""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit


def request_body(images_b64: list[str], top_k: int = 0) -> bytes:
    """The ``inputs`` form of a scoring request: ``{"inputs": {"image": [...]}}``."""
    body: dict = {"inputs": {"image": images_b64}}
    if top_k:
        body["params"] = {"top_k": top_k}
    return json.dumps(body).encode()


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted latencies."""
    return sorted_ms[min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))]


def run_load(url: str, bodies: list[bytes], clients: int, requests: int, images_per_request: int) -> dict:
    """``requests`` POSTs to ``url``/invocations shared by ``clients`` threads, cycling through
    ``bodies``; returns latency percentiles, throughput and the count of non-200 answers."""
    parts = urlsplit(url)
    issued, lock = iter(range(requests)), threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        while True:
            with lock:
                index = next(issued, None)
            if index is None:
                break
            start = time.perf_counter()
            try:
                connection.request("POST", "/invocations", bodies[index % len(bodies)], {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                latencies.append(elapsed)
                statuses[status] += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": requests, "images_per_request": images_per_request,
        "p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99), "mean_ms": statistics.fmean(ordered),
        "requests_per_s": requests / wall, "images_per_s": requests * images_per_request / wall,
        "errors": requests - statuses[200], "statuses": {str(key): count for key, count in statuses.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load-test an `mlflow models serve` endpoint with image files.")
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files, sent round-robin")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the server (default http://127.0.0.1:5000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=1000, help="total requests (default 1000)")
    parser.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    args = parser.parse_args(argv)
    encoded = [base64.b64encode(path.read_bytes()).decode("ascii") for path in args.images]
    bodies = [request_body([encoded[(i + j) % len(encoded)] for j in range(args.batch)]) for i in range(len(encoded))]
    print(json.dumps(run_load(args.url, bodies, args.clients, args.requests, args.batch), indent=2))
