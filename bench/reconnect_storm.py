"""Reconnect storm: N workers reconnecting at once after their broker restarts, and what each
request costs the broker as N grows.

For each N: a fresh vhost on a 1-node RabbitMQ of our own (``localcluster.broker_cluster``,
never this machine's broker: we stop and start it), a registry, a few Docker Engines shared by
the workers (as ``round_trip`` does), ``--history`` earlier requests already in the history
stream (images present on the engines) so that joining means reading them. Then:

1. *cold join*: N fresh workers start at once; seconds until every ``/ready`` is 200.
2. *idle*: ``--idle-seconds`` with nothing published: the broker's bytes in and out (presence
   announcements, heartbeats) and its CPU.
3. *per request*: one probe request with our own reply queue (real body sizes of a request
   and of N results; one presence announcement read back from its stream), then
   ``--requests`` ``Publisher.pull(expect=N)`` in a row: the broker's bytes, CPU, the
   publisher's CPU, minus the idle rate.
4. *storm*: the broker is stopped (``rabbitmqctl stop``), left down ``--down-seconds``, started
   again; as soon as its AMQP port answers, ``--missed`` requests go into the history only
   (requests the nodes missed); then seconds from the broker being back until each worker is
   serving (its log's ``serving``) and caught up (``/ready`` 200), the attempts it made
   (``cannot serve yet`` lines; ``puller_worker_broker_connections_total``), and the broker's
   CPU and memory meanwhile.

    .venv/bin/python -m bench.reconnect_storm [--nodes 10,50,100] [--engines 2] [--history 200]
        [--missed 50] [--requests 30] [--idle-seconds 20] [--down-seconds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from bench.common import BenchEnvironment, percentile, print_table, save, stop_all
from contract import CONTENT_TYPE, PullRequest, parse_reference
from contract import topology as topo
from contract.connection import declare
from localcluster.broker_cluster import BrokerCluster
from localcluster.cluster import WorkerProcess
from localcluster.engines import NodeEngine
from localcluster.registry import Registry
from publisher import Publisher

IMAGES = 4
"""Distinct images the history's requests ask for, all present on every engine."""
POLL_PAUSE = 0.2
"""Seconds between sweeps of the workers' ``/ready`` during the storm."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100")
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--missed", type=int, default=50)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--down-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.nodes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="storm-", dir="/tmp"))
    root.chmod(0o711)  # the broker node runs as the rabbitmq user, who must pass through
    cluster = BrokerCluster(root / "broker", size=1)
    registry = Registry(root / "registry")
    engines: list[NodeEngine] = []
    figures: dict[str, Any] = {
        "settings": vars(args),
        "machine": {"cores": os.cpu_count(), "load_before": os.getloadavg()},
        "by_n": {},
    }
    try:
        cluster.start()
        registry.start()
        for index in range(args.engines):
            engine = NodeEngine(f"e{index + 1}", root / f"e{index + 1}")
            engine.start()
            engines.append(engine)
        images = [
            registry.push_files(f"bench/storm-{i}", "1", {"f": f"{i}".encode()})
            for i in range(IMAGES)
        ]
        for engine in engines:
            client = engine.client()
            for image in images:
                client.images.pull(image)
            client.close()
        for n in sizes:
            figures["by_n"][str(n)] = measure(cluster, registry, engines, images, root, n, args)
            save("reconnect_storm", figures)
    finally:
        for engine in engines:
            engine.remove()
        registry.remove()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    figures["machine"]["load_after"] = os.getloadavg()
    report(figures["by_n"])
    print(f"\nfigures saved to {save('reconnect_storm', figures)}")
    return 0


def measure(
    cluster: BrokerCluster,
    registry: Registry,
    engines: list[NodeEngine],
    images: list[str],
    root: Path,
    n: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    vhost = f"storm-{n}-{secrets.token_hex(3)}"
    cluster.add_vhost(vhost)
    url = cluster.node_url(1, vhost)
    environment = BenchEnvironment(root / f"n{n}", url, registry, engines)
    publish_history(url, images, args.history)
    print(f"\nN = {n}: starting {n} workers ({args.history} requests in the history)")
    sys.stdout.flush()
    began = time.monotonic()
    workers = environment.start_workers(n, prefix=f"n{n}")
    result: dict[str, Any] = {"cold_join_s": time.monotonic() - began}
    try:
        result["sizes"] = message_sizes(url, images[0], n)
        result["idle"] = idle_costs(cluster, vhost, args.idle_seconds, n)
        result["per_request"] = request_costs(
            cluster, vhost, url, images[0], n, args.requests, result["idle"]
        )
        result["storm"] = storm(cluster, url, images, workers, args)
    finally:
        stop_all([w.process for w in workers])
    return result


# -- the history, and the sizes of what goes over the wire ------------------------------------


def publish_history(url: str, images: Sequence[str], count: int, attempts: int = 1) -> float:
    """``count`` pull requests into the history only, as a publisher's history copies are
    (declaring the shared topology first, with the workers' default retention); returns when
    they were all confirmed (Unix time). Tries again, ``attempts`` times in all, while the
    broker is still booting."""
    for attempt in range(attempts):
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
            try:
                channel = connection.channel()
                for item in topo.shared_declarations():
                    declare(channel, item)
                channel.confirm_delivery()
                properties = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2)
                for index in range(count):
                    request = PullRequest.new(parse_reference(images[index % len(images)]))
                    channel.basic_publish(topo.HISTORY.name, "", request.encode(), properties)
            finally:
                if connection.is_open:
                    connection.close()
        except pika.exceptions.AMQPError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
            continue
        return time.time()
    raise RuntimeError("no attempts")


def message_sizes(url: str, image: str, n: int) -> dict[str, float]:
    """Body sizes, in bytes, of a real pull request, of the N results it brings (to a reply
    queue of our own, bound as a publisher's is), and of a presence announcement read back
    from the presence stream."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        queue = channel.queue_declare(
            f"{topo.REPLY_QUEUE_PREFIX}probe-{uuid.uuid4().hex[:8]}", exclusive=True
        ).method.queue
        channel.queue_bind(queue, topo.REPLIES.name, routing_key=queue)
        body = PullRequest.new(parse_reference(image)).encode()
        request_id = json.loads(body)["request_id"]
        replies: list[int] = []

        def on_reply(_c: object, _m: object, properties: pika.BasicProperties, b: bytes) -> None:
            if properties.correlation_id == request_id:
                replies.append(len(b))

        channel.basic_consume(queue, on_reply, auto_ack=True)
        channel.basic_publish(
            topo.PULLS.name,
            "",
            body,
            pika.BasicProperties(
                content_type=CONTENT_TYPE, correlation_id=request_id, reply_to=queue
            ),
        )
        deadline = time.monotonic() + 60
        while len(replies) < n and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.1)
        presence = read_presence_sizes(connection.channel(), n)
    finally:
        # Closing cancels the stream consumer, and pika rejects what it has not dispatched,
        # which a stream answers by closing the connection: what we wanted is read by then.
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()
    return {
        "pull_request": len(body),
        "result_p50": statistics.median(replies) if replies else 0.0,
        "results_received": len(replies),
        "presence_p50": statistics.median(presence) if presence else 0.0,
    }


def read_presence_sizes(channel: Any, wanted: int) -> list[int]:
    sizes: list[int] = []
    channel.basic_qos(prefetch_count=200)

    def on_entry(ch: Any, method: Any, _p: object, body: bytes) -> None:
        if b'"presence"' in body:
            sizes.append(len(body))
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(
        topo.PRESENCE_STREAM.name, on_entry, arguments={"x-stream-offset": "first"}
    )
    deadline = time.monotonic() + 10
    while len(sizes) < wanted and time.monotonic() < deadline:
        channel.connection.process_data_events(time_limit=0.1)
    return sizes


# -- what the broker spends ---------------------------------------------------------------------


def broker_usage(cluster: BrokerCluster) -> tuple[float, float]:
    """CPU seconds used so far and resident MB now, over the broker node's processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = rss = 0.0
    for pid in cluster.processes():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / ticks
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
    return cpu, rss


def broker_octets(cluster: BrokerCluster, vhost: str) -> tuple[int, int]:
    """Bytes the broker received and sent so far over the vhost's open connections."""
    output = cluster.ctl("list_connections", "vhost", "recv_oct", "send_oct", "--formatter", "json")
    rows = json.loads(output[output.find("[") :])
    mine = [row for row in rows if row.get("vhost") == vhost]
    return sum(int(r["recv_oct"]) for r in mine), sum(int(r["send_oct"]) for r in mine)


def idle_costs(cluster: BrokerCluster, vhost: str, seconds: float, n: int) -> dict[str, float]:
    recv0, send0 = broker_octets(cluster, vhost)
    cpu0, _ = broker_usage(cluster)
    began = time.monotonic()
    time.sleep(seconds)
    recv1, send1 = broker_octets(cluster, vhost)
    cpu1, rss = broker_usage(cluster)
    elapsed = time.monotonic() - began
    return {
        "seconds": elapsed,
        "recv_bytes_per_s": (recv1 - recv0) / elapsed,
        "send_bytes_per_s": (send1 - send0) / elapsed,
        "recv_bytes_per_node_per_5s": (recv1 - recv0) / elapsed * 5 / n,
        "broker_cpu_percent": 100 * (cpu1 - cpu0) / elapsed,
        "broker_rss_mb": rss,
    }


def request_costs(
    cluster: BrokerCluster,
    vhost: str,
    url: str,
    image: str,
    n: int,
    requests: int,
    idle: dict[str, float],
) -> dict[str, float]:
    with Publisher(url) as publisher:
        for _ in range(3):  # warm up: the reply queue, the publisher's connection
            publisher.pull(image, expect=n, timeout=60)
        recv0, send0 = broker_octets(cluster, vhost)
        cpu0, _ = broker_usage(cluster)
        mine0 = time.process_time()
        began = time.monotonic()
        rounds = []
        for _ in range(requests):
            started = time.perf_counter()
            report = publisher.pull(image, expect=n, timeout=60)
            rounds.append(time.perf_counter() - started)
            if not report.ok:
                raise RuntimeError(f"a pull failed: {report}")
        elapsed = time.monotonic() - began
        mine1 = time.process_time()
        cpu1, _ = broker_usage(cluster)
        recv1, send1 = broker_octets(cluster, vhost)
    return {
        "requests": requests,
        "broker_recv_bytes": (recv1 - recv0 - idle["recv_bytes_per_s"] * elapsed) / requests,
        "broker_send_bytes": (send1 - send0 - idle["send_bytes_per_s"] * elapsed) / requests,
        "broker_cpu_ms": 1000
        * (cpu1 - cpu0 - idle["broker_cpu_percent"] / 100 * elapsed)
        / requests,
        "bench_process_cpu_ms": 1000 * (mine1 - mine0) / requests,
        "pull_p50_ms": 1000 * statistics.median(rounds),
        "pull_p99_ms": 1000 * percentile(rounds, 0.99),
    }


# -- the storm ----------------------------------------------------------------------------------


def storm(
    cluster: BrokerCluster,
    url: str,
    images: Sequence[str],
    workers: Sequence[WorkerProcess],
    args: argparse.Namespace,
) -> dict[str, Any]:
    connections_before = [w.metric("puller_worker_broker_connections_total") for w in workers]
    node = cluster.node(1)
    stopped_at = time.time()
    cluster.stop_node(1)
    down_at = time.time()
    time.sleep(args.down_seconds)
    starting = threading.Thread(target=cluster.start_node, args=(1,), daemon=True)
    starting.start()
    launched_at = time.time()
    while not port_open(node.amqp_port):
        if not starting.is_alive() and not port_open(node.amqp_port):
            raise RuntimeError("the broker did not come back")
        time.sleep(0.02)
    back_at = time.time()
    cpu0, rss0 = broker_usage(cluster)
    missed_at = publish_history(url, images, args.missed, attempts=200) if args.missed else back_at
    peak = [rss0]
    ready_at = wait_all_ready(workers, cluster, peak, timeout=900)
    all_ready = max(ready_at.values())
    cpu1, _ = broker_usage(cluster)
    starting.join(timeout=300)
    connections_after = [w.metric("puller_worker_broker_connections_total") for w in workers]
    logs = [storm_log(w.log_path, stopped_at) for w in workers]
    serving = sorted(log["serving"] - back_at for log in logs if log["serving"] is not None)
    caught_up = sorted(log["caught_up"] - back_at for log in logs if log["caught_up"] is not None)
    ready = sorted(t - back_at for t in ready_at.values())
    failed_attempts = [log["failed_attempts"] for log in logs]
    # Lockstep: how many workers opened their connection within the same 100 ms.
    bins = Counter(int(s * 10) for s in serving)
    return {
        "broker_stop_s": down_at - stopped_at,
        "broker_down_s": back_at - down_at,
        "broker_boot_s": back_at - launched_at,
        "missed_published_after_back_s": missed_at - back_at,
        "first_serving_after_back_s": serving[0] if serving else None,
        "all_serving_after_back_s": serving[-1] if serving else None,
        "serving_p50_s": statistics.median(serving) if serving else None,
        "caught_up_p50_s": statistics.median(caught_up) if caught_up else None,
        "caught_up_p99_s": percentile(caught_up, 0.99) if caught_up else None,
        "ready_p50_s": statistics.median(ready),
        "ready_p99_s": percentile(ready, 0.99),
        "all_ready_after_back_s": all_ready - back_at,
        "most_connecting_in_100ms": max(bins.values()) if bins else 0,
        "failed_attempts_per_worker": dict(sorted(Counter(failed_attempts).items())),
        "connections_opened": sum(
            a - b for a, b in zip(connections_after, connections_before, strict=True)
        ),
        "replay_entries_p50": statistics.median(
            [log["replay_entries"] for log in logs if log["replay_entries"] is not None] or [0]
        ),
        "broker_cpu_s_until_all_ready": cpu1 - cpu0,
        "broker_cpu_percent_until_all_ready": 100 * (cpu1 - cpu0) / max(all_ready - back_at, 1e-3),
        "broker_rss_mb_before": rss0,
        "broker_rss_mb_peak": max(peak),
        "load_average": os.getloadavg(),
        "backoff_attempt_times_s": attempt_schedule(logs, stopped_at),
    }


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_all_ready(
    workers: Sequence[WorkerProcess], cluster: BrokerCluster, peak: list[float], timeout: float
) -> dict[str, float]:
    """Sweeps the workers' ``/ready`` until each has said 200 once: node -> when (Unix time)."""
    ready: dict[str, float] = {}
    deadline = time.monotonic() + timeout

    def check(worker: WorkerProcess) -> None:
        try:
            status, _ = worker.health("/ready")
        except OSError:
            return
        if status == 200:
            ready.setdefault(worker.node, time.time())

    with ThreadPoolExecutor(max_workers=16) as pool:
        while len(ready) < len(workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ready)} of {len(workers)} workers ready")
            list(pool.map(check, [w for w in workers if w.node not in ready]))
            peak.append(broker_usage(cluster)[1])
            time.sleep(POLL_PAUSE)
    return ready


def storm_log(path: Path, since: float) -> dict[str, Any]:
    """From a worker's JSON log, after ``since``: failed connection attempts (their times),
    when it was serving again, when it had caught up, and how many history entries its
    replay spanned."""
    attempts: list[float] = []
    serving = caught_up = None
    replay: int | None = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            at = datetime.fromisoformat(entry["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError):
            continue
        if at < since:
            continue
        event = entry.get("event")
        if event == "cannot serve yet":
            attempts.append(at)
        elif event == "serving" and serving is None:
            serving = at
        elif event == "catching up" and replay is None:
            start, end = entry.get("history_from"), entry.get("history_end")
            if isinstance(start, int) and isinstance(end, int):
                replay = end - start
        elif event == "caught up" and serving is not None and caught_up is None:
            caught_up = at
    return {
        "failed_attempts": len(attempts),
        "attempt_times": attempts,
        "serving": serving,
        "caught_up": caught_up,
        "replay_entries": replay,
    }


def attempt_schedule(logs: Sequence[dict[str, Any]], since: float) -> list[dict[str, float]]:
    """Per attempt number (1 = the first failed one), when the workers made it, seconds after
    the broker was asked to stop: earliest, latest (the spread shows lockstep)."""
    schedule = []
    longest = max((len(log["attempt_times"]) for log in logs), default=0)
    for k in range(longest):
        times = [log["attempt_times"][k] - since for log in logs if len(log["attempt_times"]) > k]
        schedule.append(
            {"attempt": k + 1, "workers": len(times), "first_s": min(times), "last_s": max(times)}
        )
    return schedule


# -- the table ------------------------------------------------------------------------------------


def report(by_n: dict[str, Any]) -> None:
    def row(title: str, value: Callable[[dict[str, Any]], object]) -> list[object]:
        return [title, *[value(figures) for figures in by_n.values()]]

    rows = [
        row("cold join, all ready s", lambda f: f["cold_join_s"]),
        row("pull request body B", lambda f: f["sizes"]["pull_request"]),
        row("result body B (p50)", lambda f: f["sizes"]["result_p50"]),
        row("presence body B (p50)", lambda f: f["sizes"]["presence_p50"]),
        row("idle broker in B/s", lambda f: f["idle"]["recv_bytes_per_s"]),
        row("idle broker CPU %", lambda f: f["idle"]["broker_cpu_percent"]),
        row("per request: broker in B", lambda f: f["per_request"]["broker_recv_bytes"]),
        row("per request: broker out B", lambda f: f["per_request"]["broker_send_bytes"]),
        row("per request: broker CPU ms", lambda f: f["per_request"]["broker_cpu_ms"]),
        row("per request: publisher CPU ms", lambda f: f["per_request"]["bench_process_cpu_ms"]),
        row("storm: broker down s", lambda f: f["storm"]["broker_down_s"]),
        row("storm: first serving s", lambda f: f["storm"]["first_serving_after_back_s"]),
        row("storm: all serving s", lambda f: f["storm"]["all_serving_after_back_s"]),
        row("storm: ready p50 s", lambda f: f["storm"]["ready_p50_s"]),
        row("storm: ready p99 s", lambda f: f["storm"]["ready_p99_s"]),
        row("storm: all ready s", lambda f: f["storm"]["all_ready_after_back_s"]),
        row("storm: most connecting in 100 ms", lambda f: f["storm"]["most_connecting_in_100ms"]),
        row("storm: broker CPU %", lambda f: f["storm"]["broker_cpu_percent_until_all_ready"]),
        row("storm: broker RSS peak MB", lambda f: f["storm"]["broker_rss_mb_peak"]),
    ]
    print_table(
        "reconnect storm and per-request costs (storm times: seconds after the broker is back)",
        ["", *[f"N = {n}" for n in by_n]],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main())
