"""Reconnect spread: when RabbitMQ drops every worker's connection at once, how the workers'
new connections spread in time; the baseline's workers and this tree's, in the same run.

    .venv/bin/python -m bench.reconnect_spread [--workers 30] [--rounds 2] [--baseline 03d5020]

One fresh RabbitMQ node of the script's own (:mod:`localcluster.broker_cluster`), N workers
with no Docker Engine (they connect and serve without one), and RabbitMQ closing every
connection at once (``rabbitmqctl close_all_connections``: what a broker node's restart or
loss looks like to its workers, without the wait for it to come back). From each worker's
log: when it saw the loss and when it was serving again. Reported per build: the spread of
the comebacks (first to last), and the most that came back within any 100 ms.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.common import print_table, save
from bench.prune_race import worker_from
from localcluster.broker_cluster import BrokerCluster, rabbitmqctl
from localcluster.cluster import WorkerProcess

BASELINE = "03d5020"
"""The last commit before the first attempt after a lost connection waited (issue 25)."""
WINDOW = 0.1


def events(worker: WorkerProcess, name: str) -> list[float]:
    """Unix times of the worker's log lines whose event is ``name``."""
    found = []
    for line in worker.log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == name:
            found.append(datetime.fromisoformat(entry["timestamp"]).timestamp())
    return found


def busiest_window(times: list[float]) -> int:
    """The most of ``times`` within any :data:`WINDOW` seconds."""
    ordered = sorted(times)
    return max(
        (sum(1 for t in ordered[i:] if t - start < WINDOW) for i, start in enumerate(ordered)),
        default=0,
    )


def measure(
    cluster: BrokerCluster,
    root: Path,
    label: str,
    command: list[str] | None,
    args: argparse.Namespace,
) -> list[list[object]]:
    prefix = "base" if command else "tree"
    workers = [
        WorkerProcess(
            node=f"{prefix}-{i + 1}",
            docker_host=f"unix://{root}/no-engine.sock",
            amqp_url=cluster.node_url(1),
            log_path=root / prefix / f"{i + 1}.log",
            command=command,
        )
        for i in range(args.workers)
    ]
    rows: list[list[object]] = []
    try:
        for worker in workers:
            worker.launch()
        for worker in workers:
            worker.wait_serving(timeout=120)
        for number in range(1, args.rounds + 1):
            rabbitmqctl(cluster.node(1).name, "close_all_connections", "bench: all at once")
            deadline = time.monotonic() + 60
            while any(len(events(w, "serving")) <= number for w in workers):
                if time.monotonic() > deadline:
                    raise RuntimeError("not every worker was serving again within 60 s")
                time.sleep(0.2)
            lost = [events(w, "connection lost; reconnecting")[number - 1] for w in workers]
            back = [events(w, "serving")[number] for w in workers]
            delays = sorted(b - a for a, b in zip(lost, back, strict=True))
            rows.append(
                [
                    label,
                    number,
                    round(max(lost) - min(lost), 3),
                    round(max(back) - min(back), 3),
                    busiest_window(back),
                    round(delays[0], 3),
                    round(delays[len(delays) // 2], 3),
                    round(delays[-1], 3),
                ]
            )
            time.sleep(1.0)  # settled: every worker announced itself again
    finally:
        for worker in workers:
            worker.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="a revision; empty: none")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rspread-", dir="/tmp"))
    root.chmod(0o711)  # the broker runs as the rabbitmq user, who must pass through
    rows: list[list[object]] = []
    with BrokerCluster(root / "broker", size=1) as cluster:
        if args.baseline:
            baseline = worker_from(args.baseline, root / "baseline")
            rows += measure(cluster, root, f"baseline {args.baseline}", baseline, args)
        rows += measure(cluster, root, "this tree", None, args)
    header = [
        "workers",
        "round",
        "losses spread s",
        "comebacks spread s",
        f"most back within {WINDOW:g} s",
        "delay min s",
        "delay p50 s",
        "delay max s",
    ]
    print_table(f"{args.workers} workers, every connection closed at once", header, rows)
    path = save(
        "reconnect_spread",
        {"workers": args.workers, "rows": [dict(zip(header, r, strict=True)) for r in rows]},
    )
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
