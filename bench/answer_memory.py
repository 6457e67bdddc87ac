"""The memory of answers: a real publisher takes every answer of N simulated nodes to each of
R requests, on a real RabbitMQ, with the baseline's publisher (no byte budget: it keeps the
last 1,000 requests whole) and with this tree's (``PULLER_ANSWER_MEMORY_MB``, 64 by default).

    .venv/bin/python -m bench.answer_memory [--nodes 1000 10000] [--requests 30]
                                            [--baseline a586a0b]

The nodes are :class:`~localcluster.fake_nodes.FakeNodes` (one pika connection publishing
every node's result to the publisher's reply queue, as the wire contract says); the
publisher runs in a process of its own (bench/answer_memory_publisher.py), so that its RSS
and CPU-seconds are its own. For each request: the answers/s the publisher took (from the
first answer published to the last one in its hands; the nodes' own publishing rate beside
it: on a loaded machine the nodes' side is the bottleneck), its CPU-seconds per 1,000
answers (and the answers a second that CPU makes: what one core would take), its RSS and its
kept bytes (this tree only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import bench_environment, print_table, save
from localcluster.fake_nodes import FakeNodes

BASELINE = "a586a0b"
"""The last commit before the byte budget (issue 25)."""
TREE = Path(__file__).resolve().parent.parent
CHILD = TREE / "bench" / "answer_memory_publisher.py"


def baseline_tree(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(TREE), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "x", "-C", str(into)], input=archive, check=True)
    return into


def run(amqp_url: str, source: Path, nodes: int, requests: int) -> dict[str, Any]:
    """One publisher (``source``'s) through ``requests`` requests, each answered by ``nodes``."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    env.pop("PULLER_ANSWER_MEMORY_MB", None)
    rows: list[dict[str, Any]] = []
    with FakeNodes(amqp_url, nodes, prefix=f"bench-{nodes}") as fake:  # bound before a request
        child = subprocess.Popen(
            [sys.executable, "-P", str(CHILD), amqp_url, str(requests), str(nodes)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        lines = iter(child.stdout or ())
        try:
            start_rss = json.loads(next(lines))["rss"]
            for _ in range(requests):
                json.loads(next(lines))  # the request is out
                sent = fake.answer_next(timeout=60)
                taken = json.loads(next(lines))
                if taken["answered"] != nodes:
                    raise RuntimeError(f"{taken['answered']} of {nodes} answers in 300 s")
                rows.append(taken | {"publish_seconds": sent.seconds, "bytes": sent.bytes})
        finally:
            child.wait(timeout=60)
    last = rows[-1]
    cpu_per_1000 = 1000 * sum(r["cpu"] for r in rows) / (nodes * requests)
    return {
        "nodes": nodes,
        "requests": requests,
        "answers_per_second": round(nodes / statistics.median(r["wall"] for r in rows)),
        "nodes_publish_per_second": round(
            nodes / statistics.median(r["publish_seconds"] for r in rows)
        ),
        "cpu_seconds_per_1000_answers": round(cpu_per_1000, 4),
        "answers_per_cpu_second": round(1000 / cpu_per_1000),
        "rss_start_mb": round(start_rss / 2**20, 1),
        "rss_end_mb": round(last["rss"] / 2**20, 1),
        "kept_mb": None if last["kept"] is None else round(last["kept"] / 2**20, 1),
        "answer_bytes_received_mb": round(sum(r["bytes"] for r in rows) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--baseline", default=BASELINE, help="a revision; empty: none")
    args = parser.parse_args(argv)
    figures: list[dict[str, Any]] = []
    with bench_environment() as environment, tempfile.TemporaryDirectory() as source:
        builds = [("this tree", TREE)]
        if args.baseline:
            builds.insert(
                0, (f"baseline {args.baseline}", baseline_tree(args.baseline, Path(source)))
            )
        for nodes in args.nodes:
            for label, tree in builds:
                figures.append(
                    {"publisher": label} | run(environment.amqp_url, tree, nodes, args.requests)
                )
    header = list(figures[0])
    print_table(
        f"a publisher taking every answer of N nodes to {args.requests} requests, one by one",
        header,
        [list(row.values()) for row in figures],
    )
    path = save("answer_memory", {"requests": args.requests, "runs": figures})
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
