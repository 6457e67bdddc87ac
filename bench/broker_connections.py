"""What a worker's connection costs a RabbitMQ node: this machine's RabbitMQ (Debian's 3.10),
started with the configuration the demo's broker cluster writes
(:data:`localcluster.broker_cluster.CONFIG`).

    .venv/bin/python -m bench.broker_connections [--connections 1000]

Starts one fresh broker node, shows the settings it runs with (the listen socket's accept
queue as the kernel reports it, ``collect_statistics_interval``, the node's open-file limit),
then opens ``--connections`` connections shaped as a worker's (a channel consuming an
exclusive queue bound to the pull exchange, and a second, idle channel for presence) and
reports what they added, per connection: the node's memory by category
(``rabbitmq-diagnostics memory_breakdown``), the Erlang VM's resident memory, and its open
file descriptors. bench/README.md and docs/operations.md use the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pika

from bench.common import print_table, save
from localcluster.broker_cluster import BrokerCluster, BrokerNode, rabbitmqctl

CATEGORIES = (
    "connection_readers",
    "connection_writers",
    "connection_channels",
    "connection_other",
    "queue_procs",
)
"""The categories of ``memory_breakdown`` a worker's connection adds to (its exclusive queue
is a classic queue). Not ``binary``: a binary referenced by many processes is counted once
for each, so it adds up to more than the process's whole resident memory."""
SETTLE_SECONDS = 3.0
"""Waited before each reading: the breakdown is the runtime's, read within a few seconds."""


def beam_pid(cluster: BrokerCluster) -> int:
    found = [pid for pid, command in cluster.processes().items() if "beam.smp" in command]
    if len(found) != 1:
        raise RuntimeError(f"expected one Erlang VM, found {found}")
    return found[0]


def memory(node: BrokerNode, pid: int) -> dict[str, int]:
    """The node's memory breakdown in bytes, with the VM's resident memory and open files."""
    output = rabbitmqctl(
        node.name,
        "memory_breakdown",
        "--unit",
        "bytes",
        "--formatter",
        "json",
        tool="rabbitmq-diagnostics",
    )
    breakdown = json.loads(output[output.index("{") :])
    figures = {key: int(breakdown[key]["bytes"]) for key in CATEGORIES}
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    figures["vm_rss"] = int(found[1]) * 1024 if found else 0
    figures["open_files"] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return figures


def settings(node: BrokerNode, pid: int) -> dict[str, str]:
    """What the node runs with, as it and the kernel report it."""
    listen = subprocess.run(
        ["ss", "-ltnH", f"sport = :{node.amqp_port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    limits = Path(f"/proc/{pid}/limits").read_text()
    files = re.search(r"^Max open files\s+(\d+)", limits, re.MULTILINE)
    return {
        "accept queue (ss Send-Q)": listen[2] if len(listen) > 2 else "?",
        "tcp_listen_options": rabbitmqctl(
            node.name, "eval", "application:get_env(rabbit, tcp_listen_options)."
        ).strip(),
        "collect_statistics_interval": rabbitmqctl(
            node.name, "eval", "application:get_env(rabbit, collect_statistics_interval)."
        ).strip(),
        "open-file limit": files[1] if files else "?",
    }


def open_worker_like(url: str, count: int) -> list[pika.BlockingConnection]:
    """``count`` connections, each with a consumer on an exclusive queue bound to a fanout
    exchange and a second open channel, as a worker holds them between requests."""
    opened = []
    parameters = pika.URLParameters(url)
    parameters.heartbeat = 0  # nothing serves them while the figures are read
    for number in range(count):
        connection = pika.BlockingConnection(parameters)
        live = connection.channel()
        live.exchange_declare("bench.pulls", exchange_type="fanout", durable=True)
        queue = live.queue_declare(f"bench.node.{number}", exclusive=True).method.queue
        live.queue_bind(queue, "bench.pulls")
        live.basic_consume(queue, lambda *_: None)
        connection.channel()  # presence
        opened.append(connection)
    return opened


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bconn-", dir="/tmp"))
    root.chmod(0o711)  # the broker runs as the rabbitmq user, who must pass through
    with BrokerCluster(root, size=1) as cluster:
        node = cluster.node(1)
        pid = beam_pid(cluster)
        running = settings(node, pid)
        time.sleep(SETTLE_SECONDS)
        before = memory(node, pid)
        started = time.monotonic()
        connections = open_worker_like(cluster.node_url(1), args.connections)
        opening = time.monotonic() - started
        try:
            time.sleep(SETTLE_SECONDS)
            after = memory(node, pid)
        finally:
            for connection in connections:
                connection.close()
    per_connection = {
        key: round((after[key] - before[key]) / args.connections, 1) for key in before
    }
    print_table("the node runs with", ["setting", "value"], list(running.items()))
    print_table(
        f"{args.connections} worker-shaped connections (2 channels, 1 consumer each), "
        f"opened in {opening:.1f} s",
        ["figure", "before", "after", "per connection"],
        [[key, before[key], after[key], per_connection[key]] for key in before],
    )
    path = save(
        "broker_connections",
        {
            "connections": args.connections,
            "opening_seconds": round(opening, 2),
            "settings": running,
            "before": before,
            "after": after,
            "per_connection": per_connection,
        },
    )
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
