"""The roster under a presence flood: ``GET /nodes``, ``POST /pulls`` without ``expect`` and
``puller nodes``, first with a quiet presence stream (the baseline, same run), then while one
pika connection publishes junk to ``puller.presence`` as fast as it can.

    .venv/bin/python -m bench.presence_flood [--amqp-url URL] [--workers 3] [--samples 20]
        [--flood-first 10]

``--amqp-url``: a vhost where the user may do everything (default: a fresh vhost of this
machine's RabbitMQ, as guest); the flood goes there, so give it a broker of your own when
others share this one. The flood runs ``--flood-first`` seconds before the measurements
start and stops after them (at most ten minutes in all). Answers are timed end to end; an
answer that is not 200, or lists the wrong nodes, is counted as wrong.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import bench_environment, percentile, print_table, save, stop_all
from localcluster.cluster import GatewayProcess, WorkerProcess
from localcluster.engines import NodeEngine
from localcluster.faults import flood_presence
from localcluster.registry import Registry

Sample = tuple[float, bool]
"""Seconds, and whether the answer was right."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--flood-first", type=float, default=10.0)
    args = parser.parse_args(argv)
    with _environment(args.amqp_url) as (amqp_url, root, registry, engine):
        workers = [
            WorkerProcess(
                node=f"flood-{i + 1}",
                docker_host=engine.docker_host,
                amqp_url=amqp_url,
                log_path=root / f"flood-{i + 1}.log",
                extra_env={"PULLER_PRESENCE_INTERVAL": "5"},
            )
            for i in range(args.workers)
        ]
        gateway = GatewayProcess(amqp_url, root / "gateway.log")
        try:
            for worker in workers:
                worker.start(timeout=120)
            gateway.start()
            image = registry.push_files("bench/flood", "1", {"f": b"f"})
            nodes = sorted(worker.node for worker in workers)
            calls = _calls(gateway, amqp_url, image, nodes)
            rows = [["quiet", "-", *_row(name, call, args.samples)] for name, call in calls]
            with _flood(amqp_url, args.flood_first) as rate:
                flooded = [_row(name, call, args.samples) for name, call in calls]
            rows += [["flooded", f"{rate[0]:.0f}", *row] for row in flooded]
        finally:
            gateway.stop()
            stop_all([worker.process for worker in workers])
    print_table(
        f"the roster with {args.workers} nodes, quiet and flooded (ms; {args.samples} calls, "
        "3 for the CLI)",
        ["stream", "flood msg/s", "call", "p50", "p90", "max", "wrong"],
        rows,
    )
    save("presence_flood", {"rows": rows})
    return 0


def _calls(
    gateway: GatewayProcess, amqp_url: str, image: str, nodes: list[str]
) -> list[tuple[str, Callable[[], bool]]]:
    def get_nodes() -> bool:
        status, body = _http(gateway, "GET", "/nodes", None)
        return status == 200 and [n["node"] for n in body["nodes"]] == nodes

    def post_pulls() -> bool:
        status, body = _http(gateway, "POST", "/pulls", {"image": image, "timeout": 30})
        return status == 200 and body["ok"] and [r["node"] for r in body["nodes"]] == nodes

    def cli_nodes() -> bool:
        puller = Path(sys.executable).parent / "puller"
        done = subprocess.run(
            [str(puller), "--amqp-url", amqp_url, "nodes", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        listed = json.loads(done.stdout)["nodes"] if done.returncode == 0 else []
        return [n["node"] for n in listed] == nodes

    return [("GET /nodes", get_nodes), ("POST /pulls", post_pulls), ("puller nodes", cli_nodes)]


def _row(name: str, call: Callable[[], bool], samples: int) -> list[object]:
    taken: list[Sample] = []
    for _ in range(3 if name == "puller nodes" else samples):
        started = time.monotonic()
        right = call()
        taken.append((time.monotonic() - started, right))
    seconds = [s for s, _ in taken]
    return [
        name,
        1000 * percentile(seconds, 0.5),
        1000 * percentile(seconds, 0.9),
        1000 * max(seconds),
        sum(1 for _, right in taken if not right),
    ]


def _http(gateway: GatewayProcess, method: str, path: str, body: object) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


@contextmanager
def _flood(amqp_url: str, first: float) -> Iterator[list[float]]:
    """Floods ``puller.presence`` from another process: yields (once ``first`` seconds have
    passed) a list that holds the flood's rate, messages a second, when it ends."""
    process = flood_presence(amqp_url, 600)
    output = process.stdout
    if output is None:
        raise RuntimeError("the flood's output is not a pipe")
    counted = [0]
    began = time.monotonic()

    def count() -> None:
        for line in output:
            counted[0] = int(line)

    reader = threading.Thread(target=count, daemon=True)
    reader.start()
    time.sleep(first)
    rate = [0.0]
    try:
        yield rate
    finally:
        rate[0] = counted[0] / (time.monotonic() - began)
        process.kill()
        process.wait()
        reader.join(timeout=5)
        output.close()


@contextmanager
def _environment(amqp_url: str | None) -> Iterator[tuple[str, Path, Registry, NodeEngine]]:
    if amqp_url is None:
        with bench_environment() as environment:
            engine = environment.add_engines(1)[0]
            yield environment.amqp_url, environment.root, environment.registry, engine
        return
    root = Path(tempfile.mkdtemp(prefix="pb-flood-", dir="/tmp"))
    registry = Registry(root / "registry")
    engine = NodeEngine("e1", root / "e1")
    try:
        registry.start()
        engine.start()
        yield amqp_url, root, registry, engine
    finally:
        engine.remove()
        registry.remove()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
