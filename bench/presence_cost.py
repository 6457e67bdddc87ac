"""What presence costs as the roster grows: N simulated nodes, each the worker's real broker
connection and presence code (many per process, one thread each), against a RabbitMQ node of
the bench's own, today's rule (every 5 s) and the stretching one side by side.

    .venv/bin/python -m bench.presence_cost [--nodes 100,1000] [--target-rate 100]
        [--seconds 60] [--per-process 250]

For each N and each rule, in a fresh vhost: the nodes connect (as a worker does: topology,
the node's queue, the keeper's token), announce for a warm-up, then for ``--seconds``; announcements
are counted from the presence stream afterwards (those sent inside the window), and the
broker's CPU (its Erlang VM's user + system time) over the window. ``before`` is today's
rule: every PULLER_PRESENCE_INTERVAL (5 s), no census; ``after`` counts the keeper's token
queue's consumers and stretches to nodes / ``--target-rate`` seconds (at most 60).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pika
import pika.exceptions
import structlog

from bench.common import print_table, save
from contract import PRESENCE_INTERVAL, NodePresence, decode_presence_stream
from contract import topology as topo
from localcluster.broker_cluster import BrokerCluster
from worker.broker.census import Census
from worker.broker.connection import WorkerBroker
from worker.catch_up.status import CatchUpStatus
from worker.daemon import CENSUS_EVERY
from worker.presence import PresenceAnnouncer
from worker.stores.contract import ImageStore

MODES = ("before", "after")
SLICE = 0.5
"""Seconds a simulated node serves its connection between looks at presence (the worker's
own loop slice)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,1000")
    parser.add_argument("--target-rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warm-up", type=float, default=25.0)
    parser.add_argument("--per-process", type=int, default=250)
    parser.add_argument("--child", nargs=4, metavar=("URL", "FIRST", "COUNT", "RATE"))
    args = parser.parse_args(argv)
    if args.child:
        url, first, count, rate = args.child
        return _child(url, int(first), int(count), float(rate))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the broker on the way out
    sizes = [int(n) for n in args.nodes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="pb-presence-", dir="/tmp"))
    root.chmod(0o755)  # the broker runs as the rabbitmq user
    rows, figures = [], []
    try:
        with BrokerCluster(root / "broker", size=1) as broker:
            for nodes in sizes:
                for mode in MODES:
                    figure = _run(broker, nodes, mode, args)
                    figures.append(figure)
                    rows.append(
                        [
                            nodes,
                            mode,
                            figure["announcements_per_s"],
                            figure["per_node_per_minute"],
                            figure["mean_declared_interval_s"],
                            figure["broker_cpu_s_per_minute"],
                        ]
                    )
                    print(json.dumps(figure), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        f"presence cost, target {args.target_rate:g}/s, window {args.seconds:g} s",
        ["nodes", "rule", "ann/s", "ann/node/min", "interval s", "broker cpu-s/min"],
        rows,
    )
    save("presence_cost", {"target_rate": args.target_rate, "runs": figures})
    return 0


def _run(
    broker: BrokerCluster, nodes: int, mode: str, args: argparse.Namespace
) -> dict[str, object]:
    vhost = f"presence-{mode}-{nodes}"
    broker.add_vhost(vhost)
    url = broker.node_url(1, vhost)
    rate = 0.0 if mode == "before" else args.target_rate
    children = []
    for first in range(0, nodes, args.per_process):
        count = min(args.per_process, nodes - first)
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.presence_cost",
                    "--child",
                    url,
                    str(first),
                    str(count),
                    str(rate) if mode == "after" else "-1",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for child in children:  # each says "ready" once all its nodes are connected
            said = child.stdout.readline().strip() if child.stdout is not None else ""
            if said != "ready":
                raise RuntimeError(f"a simulating process did not connect its nodes: {said}")
        time.sleep(args.warm_up)
        began, cpu_before = time.time(), _cpu(broker)
        time.sleep(args.seconds)
        ended, cpu_after = time.time(), _cpu(broker)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(60)
    sent = _announcements(url, began, ended)
    per_node = Counter(a.node for a in sent)
    window = ended - began
    intervals = [a.interval for a in sent if a.interval is not None]
    mean_interval = round(sum(intervals) / len(intervals), 2) if intervals else None
    return {
        "nodes": nodes,
        "rule": mode,
        "window_s": round(window, 1),
        "announcements": len(sent),
        "announcing_nodes": len(per_node),
        "announcements_per_s": round(len(sent) / window, 1),
        "per_node_per_minute": round(60 * len(sent) / window / nodes, 2),
        "mean_declared_interval_s": mean_interval,
        "broker_cpu_s_per_minute": round(60 * (cpu_after - cpu_before) / window, 2),
    }


def _cpu(broker: BrokerCluster) -> float:
    """The broker's processes' user + system CPU seconds so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in broker.processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _announcements(url: str, began: float, ended: float) -> list[NodePresence]:
    """The announcements in the presence stream sent in [began, ended)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    found = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        for method, _properties, body in channel.consume(
            topo.PRESENCE_STREAM.name,
            arguments={"x-stream-offset": datetime.fromtimestamp(began - 5, UTC)},
            inactivity_timeout=3,
        ):
            if method is None:
                break  # read to the end
            channel.basic_ack(method.delivery_tag, multiple=True)
            message = decode_presence_stream(body)
            if isinstance(message, NodePresence) and began <= message.last_seen < ended:
                found.append(message)
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):  # a stream refuses the requeue
            connection.close()
    return found


# -- a simulating process ---------------------------------------------------------------------


class _Engine:
    def version(self) -> str:
        return "bench"


class _NoCensus:
    """Today's worker: no census."""

    nodes = None

    def join(self) -> None:
        pass

    def ask(self, every: float) -> None:
        pass


def _caught_up() -> CatchUpStatus:
    return CatchUpStatus(True, True, 0, 0, None, "live")


def _child(url: str, first: int, count: int, rate: float) -> int:
    """``count`` nodes, one thread each; "ready" once all are connected; runs until killed.
    ``rate`` < 0: today's rule (no census, the base interval)."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: ours
    connected = threading.Semaphore(0)
    failed: list[BaseException] = []

    def node(index: int) -> None:
        broker = WorkerBroker(url, f"sim-{index:05d}", prefetch=1, heartbeat=60)
        if rate < 0:
            broker.census = cast(Census, _NoCensus())
        presence = PresenceAnnouncer(
            broker.queue, cast(ImageStore, _Engine()), PRESENCE_INTERVAL, _caught_up, max(rate, 0)
        )
        try:
            for attempt in range(5):
                try:
                    broker.connect(lambda _delivery: None)
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(1 + attempt)
            broker.desired.consume_token(lambda: None)  # as every worker does (the keeper's)
            broker.announce_arrival(presence.message(nodes=broker.census.nodes, first=True), 5)
        except BaseException as error:
            failed.append(error)
            connected.release()
            return
        connected.release()
        while True:
            if presence.due():
                broker.announce(presence.message(nodes=broker.census.nodes))
                broker.census.ask(every=CENSUS_EVERY * PRESENCE_INTERVAL)
            broker.process_events(SLICE)

    for index in range(first, first + count):
        threading.Thread(target=node, args=(index,), daemon=True).start()
        time.sleep(0.01)  # a connection storm is another bench's subject
    for _ in range(count):
        connected.acquire()
    if failed:
        print(f"failed: {failed[0]!r}", flush=True)
        return 1
    print("ready", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:  # ends with the bench, however it ends
        time.sleep(1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
