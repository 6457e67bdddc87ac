"""The HTTP gateway's cost: ``POST /pull_images`` at 1, 8 and 32 concurrent clients, against
``Publisher.request()`` from as many threads, in the same run, on the same workers.

    .venv/bin/python -m bench.http_gateway [--clients 1,8,32] [--requests 2000] [--workers 3]

Each HTTP client keeps one connection open (keep-alive), as a service's HTTP client does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections.abc import Callable

from bench.common import bench_environment, percentile, print_table, save, stop_all
from localcluster.cluster import GatewayProcess
from publisher import Publisher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency level")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]
    rows: list[list[object]] = []
    with bench_environment() as environment:
        environment.add_engines(1)
        image = environment.registry.push_files("bench/http", "1", {"f": b"h"})
        workers = environment.start_workers(args.workers, prefix="h")
        gateway = GatewayProcess(environment.amqp_url, environment.root / "gateway.log")
        try:
            gateway.start()
            with Publisher(environment.amqp_url) as publisher:
                publisher.pull(image, expect=args.workers, timeout=60)  # present everywhere
                for clients in levels:
                    direct = run(clients, args.requests, lambda: _direct(publisher, image))
                    over_http = run(clients, args.requests, lambda: _http(gateway.port, image))
                    rows.append(
                        [
                            clients,
                            direct[0],
                            direct[1],
                            direct[2],
                            over_http[0],
                            over_http[1],
                            over_http[2],
                            over_http[1] - direct[1],
                        ]
                    )
        finally:
            gateway.stop()
            stop_all([w.process for w in workers])
    print_table(
        f"/pull_images against Publisher.request(), {args.requests} calls per level, "
        f"{args.workers} workers (goal: p99 within 2 ms of request()'s at 8 clients)",
        [
            "clients",
            "request() p50 ms",
            "p99 ms",
            "calls/s",
            "/pull_images p50 ms",
            "p99 ms",
            "calls/s",
            "p99 difference ms",
        ],
        rows,
    )
    print(f"\nfigures saved to {save('http_gateway', {'rows': rows})}")
    return 0


def _direct(publisher: Publisher, image: str) -> Callable[[], object]:
    return lambda: publisher.request(image, session_id="bench")


def _http(port: int, image: str) -> Callable[[], object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"id": "bench", "image_name": image}).encode()
    headers = {"Content-Type": "application/json"}

    def call() -> object:
        connection.request("POST", "/pull_images", body, headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"/pull_images answered {response.status}: {data[:200]!r}")
        return data

    return call


def run(
    clients: int, total: int, make_caller: Callable[[], Callable[[], object]]
) -> tuple[float, float, float]:
    """p50 ms, p99 ms and calls per second of ``total`` calls over ``clients`` threads, each
    with a caller of its own."""
    per_client = max(1, total // clients)
    samples: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        call = make_caller()
        for _ in range(min(20, per_client)):  # warm the connection
            call()
        mine = []
        start.wait()
        for _ in range(per_client):
            began = time.perf_counter()
            call()
            mine.append(time.perf_counter() - began)
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    return (
        1000 * percentile(samples, 0.5),
        1000 * percentile(samples, 0.99),
        len(samples) / elapsed,
    )


if __name__ == "__main__":
    sys.exit(main())
