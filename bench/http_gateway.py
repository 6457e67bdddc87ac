"""The HTTP gateway's cost: ``POST /pull_images`` at 1, 8 and 32 concurrent clients, against
``Publisher.request()`` from as many threads, in the same run, on the same workers; then
``/pull_images`` again while fleet pages are open (each polling ``/fleet.json`` as the page
does, naming ``--page-images`` images), against it with none, in the same run.

    .venv/bin/python -m bench.http_gateway [--clients 1,8,32] [--requests 2000] [--workers 3]
        [--pages 4] [--page-images 20]

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
from urllib.parse import urlencode

from bench.common import bench_environment, percentile, print_table, save, stop_all
from contract import NodePresence, NodeResult, Status
from gateway.fleet_matrix import fleet_matrix
from localcluster.cluster import GatewayProcess, metric_value
from publisher import Publisher
from publisher.client import Survey
from publisher.report import StatusReport
from publisher.roster import Roster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency level")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--pages", type=int, default=4, help="fleet pages open at once")
    parser.add_argument("--page-images", type=int, default=20, help="images each page names")
    parser.add_argument(
        "--page-rounds", type=int, default=2, help="no page / pages open, alternated, per level"
    )
    parser.add_argument(
        "--settled",
        action="store_true",
        help="the pages name images every node has (checked every 10 s), not missing ones",
    )
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.clients.split(",")]
    rows: list[list[object]] = []
    page_rows: list[list[object]] = []
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
                named = [f"{image.rsplit(':', 1)[0]}-page-{i}:1" for i in range(args.page_images)]
                if args.settled:
                    named = [
                        environment.registry.push_files(f"bench/page-{i}", "1", {"f": b"%d" % i})
                        for i in range(args.page_images)
                    ]
                    publisher.warm(named, expect=args.workers, timeout=600, progress=False)
                for clients in levels:
                    for _ in range(args.page_rounds):
                        closed = run(clients, args.requests, lambda: _http(gateway.port, image))
                        before = _fleet_metrics(gateway.port)
                        with OpenPages(gateway.port, args.pages, named) as pages:
                            opened = run(clients, args.requests, lambda: _http(gateway.port, image))
                        after = _fleet_metrics(gateway.port)
                        page_rows.append(
                            [
                                clients,
                                closed[0],
                                closed[1],
                                opened[0],
                                opened[1],
                                opened[1] - closed[1],
                                pages.polls,
                                after[0] - before[0],
                                after[1] - before[1],
                                pages.biggest,
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
    print_table(
        f"/pull_images with {args.pages} fleet pages open (each polling /fleet.json every "
        f"{POLL_SECONDS:g} s, {args.page_images} images named, "
        f"{'every node has them' if args.settled else 'no node has them'}) against none",
        [
            "clients",
            "no page p50 ms",
            "p99 ms",
            "pages open p50 ms",
            "p99 ms",
            "p99 difference ms",
            "polls",
            "surveys",
            "images checked",
            "fleet.json bytes",
        ],
        page_rows,
    )
    size = matrix_size(100, 100)
    print(
        f"\nfleet.json at 100 nodes x 100 images, every image present (gateway.fleet_matrix): "
        f"{size} bytes"
    )
    figures = {"rows": rows, "page_rows": page_rows, "fleet_json_100x100_bytes": size}
    print(f"\nfigures saved to {save('http_gateway', figures)}")
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


POLL_SECONDS = 2.0
"""As the page (gateway/page/fleet.js) polls."""


class OpenPages:
    """``count`` pages polling ``/fleet.json`` (each its own keep-alive connection) until the
    ``with`` ends; the polls made and the biggest answer."""

    def __init__(self, port: int, count: int, named: list[str]) -> None:
        self._port = port
        self._count = count
        self._query = "/fleet.json?" + urlencode([("image", name) for name in named])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.polls = 0
        self.biggest = 0

    def __enter__(self) -> OpenPages:
        for index in range(self._count):
            thread = threading.Thread(target=self._page, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        first = time.monotonic() + 30
        while self.polls < self._count and time.monotonic() < first:
            self._stop.wait(0.05)  # every page has its first answer: the survey runs
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _page(self, index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        self._stop.wait(index * POLL_SECONDS / self._count)  # pages opened at different times
        while not self._stop.is_set():
            connection.request("GET", self._query)
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"/fleet.json answered {response.status}: {data[:200]!r}")
            self.polls += 1
            self.biggest = max(self.biggest, len(data))
            self._stop.wait(POLL_SECONDS)
        connection.close()


def _fleet_metrics(port: int) -> tuple[float, float]:
    """The gateway's surveys and images checked for the fleet page so far."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return (
        metric_value(text, "puller_http_fleet_surveys_total"),
        metric_value(text, "puller_http_fleet_checks_total"),
    )


def matrix_size(nodes: int, images: int) -> int:
    """Bytes of the page's document for ``nodes`` x ``images``, every image present."""
    names = [f"node-{i:03}.eu-west-1.compute.internal" for i in range(nodes)]
    roster = Roster([NodePresence(name, "0.1.0", "20.10.24", 1.0, time.time()) for name in names])
    reports = []
    for index in range(images):
        image = f"docker.io/cyberdojofoundation/language_{index:03}:93eefc6"
        rows = tuple(
            NodeResult(
                "r",
                name,
                image,
                Status.PRESENT,
                0.001,
                image_id="sha256:" + "0" * 64,
                digest=f"{image.split(':', maxsplit=1)[0]}@sha256:" + "1" * 64,
            )
            for name in names
        )
        reports.append(StatusReport("r", image, rows))
    document = fleet_matrix(Survey(roster, tuple(reports)), {}, {})
    return len(json.dumps(document, separators=(",", ":")))


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
