"""Scale: what N nodes cost RabbitMQ and the publisher, counted, at N = 100, 300, 1,000.

N simulated nodes (``bench/scale_nodes.py``: the worker's own broker, catch-up, ledger,
presence and pull-service code over a store that holds every image; ``--per-process`` nodes
per process, served in turns by one thread) against a RabbitMQ node of the bench's own
(``localcluster.broker_cluster.BrokerNode``: fresh name, ports and files; never the
machine's brokers, since the storm stops and starts it). Counts, which a noisy machine does
not change; the few CPU figures come from ``/proc`` (the broker's ``beam.smp``, this
process for the publisher). For each N, in order:

1. *join*: one request in the history, then every node starts with no saved place; each
   finds the history's end, replays up to it and sweeps once (what came while it connected).
2. *idle*: ``--idle-seconds`` with nothing published: history entries and bytes written
   (scaled to an hour: nothing periodic but presence runs while idle), presence
   announcements per second (the presence stream's offsets), the broker's CPU.
3. *broadcast*: ``--broadcasts`` ``Publisher.pull(expect=N)`` in a row, every node answering
   ``present`` at once: the publisher's CPU per 1,000 answers, the reply queue's depth
   (sampled with ``rabbitmqctl list_queues`` while answers come: a lower bound), then the
   checkpoint each node makes after a live request (``--checkpoint-seconds``, 30 in the
   worker: the bench compresses time): history entries written and deliveries per node.
4. *storm*: the broker stopped (``rabbitmqctl stop``), down ``--down-seconds``, started
   again (or, ``--storm drop``, every connection closed by ``rabbitmqctl``); ``--missed``
   requests go into the history only (the nodes missed them); the
   nodes, which kept trying with the daemon's jittered backoff while the bench held them
   back (or, ``--release together``, made no attempt), then reconnect and catch up.
   History deliveries per node (mean, max; the sweep included), entries the storm wrote
   into the history, how each connection found the end, the broker's CPU-seconds from the
   release until every node caught up and swept, and whether every node replayed every
   missed request.

``--design`` (``scale_nodes.DESIGNS``): ``tail``, the nodes read the history's end over the
stream protocol on the broker's stream port (``PULLER_STREAM_PORT``), as a deployment does;
``fallback``, they get no stream port and find the end with a marker each connection.
Figures go to ``bench/results/scale.json``, merged with earlier runs of other N (same
design), with the fitted model (see bench/README.md); the earlier design's figures
(``markers``) stay there, with the commit they were measured on.

    .venv/bin/python -m bench.scale [--nodes 100,300] [--per-process 150] [--missed 50]
        [--idle-seconds 60] [--broadcasts 2] [--checkpoint-seconds 5] [--down-seconds 5]
        [--release backoff|together] [--reconnect-spread 1] [--design tail|fallback]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import pika
import pika.exceptions

from bench.common import RESULTS, print_table, save
from bench.scale_nodes import DESIGNS, FleetSpec, NodeSettings
from contract import CONTENT_TYPE, PullRequest, Status, parse_reference, stream_tail
from contract import topology as topo
from contract.connection import declare
from localcluster.broker_cluster import BrokerNode, processes_with, rabbitmqctl, short_host
from localcluster.processes import free_port
from publisher import Publisher
from worker.catch_up.replay import SWEEP_DELAY

MEASURED_BEFORE = "markers"
"""The design measured before catch-up read the history's end over the stream protocol
(figures kept in ``scale.json``; its code is gone, see :data:`MARKERS_MEASURED_ON`)."""
MARKERS_MEASURED_ON = (
    "b301ce4 (main before the stream-protocol tail read) with the bench and a history-"
    "deliveries hook of its own; the broker had no stream plugin and RabbitMQ's defaults"
)
PROJECT = Path(__file__).resolve().parent.parent
TEN_THOUSAND = 10_000


# -- the bench's own broker ---------------------------------------------------------------------


class OwnBroker:
    """A RabbitMQ node of the bench's own, with what the bench reads from it."""

    def __init__(self, root: Path) -> None:
        self.node = BrokerNode(
            index=1,
            name=f"puller-scale-{secrets.token_hex(3)}@{short_host()}",
            amqp_port=free_port(),
            dist_port=free_port(),
            directory=root / "broker",
        )
        self.url = f"amqp://guest:guest@127.0.0.1:{self.node.amqp_port}/%2F"

    def start(self) -> None:
        root = self.node.directory.parent
        root.chmod(0o755)
        # The project's settings for thousands of nodes and the stream plugin on a port of
        # its own (localcluster.broker_cluster); warnings only in the broker's log.
        self.node.prepare()
        config = self.node.directory / "rabbitmq.conf"
        config.write_text(config.read_text().replace("level = info", "level = warning"))
        self.node.launch()
        self.node.wait_booted(240)

    def stop(self) -> None:
        self.node.halt()

    def restart(self, down_seconds: float) -> None:
        self.node.halt()
        time.sleep(down_seconds)
        self.node.launch()
        self.node.wait_booted(240)

    def cpu_seconds(self) -> float:
        """User + system seconds of the node's Erlang VM (all its threads)."""
        marker = f"RABBITMQ_NODENAME={self.node.name}"
        pids = [pid for pid, cmd in processes_with(marker).items() if "beam.smp" in cmd]
        if len(pids) != 1:
            raise RuntimeError(f"expected one beam.smp for {self.node.name}, found {pids}")
        fields = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stream_tail(self, stream: str) -> int:
        """The offset of the stream's last entry (-1: empty), read over the stream protocol
        as a worker reads it (``rabbitmq-streams stream_status`` took seconds after a storm)."""
        reading = stream_tail.read_tail(
            stream_tail.Endpoint("127.0.0.1", self.node.stream_port),
            stream_tail.Login("guest", "guest", "/"),
            stream,
        )
        return -1 if reading.offset is None else reading.offset

    def stream_bytes(self, stream: str) -> int:
        """Bytes of the stream's segment files on the node's disk."""
        # The directory is named after the vhost and queue, dots as underscores.
        name = stream.replace(".", "_")
        pattern = str(self.node.directory / "mnesia" / "*" / "stream" / f"__{name}_*")
        directories = glob.glob(pattern, recursive=True)
        if not directories:
            raise RuntimeError(f"no directory of stream {stream} under {self.node.directory}")
        return sum(
            os.path.getsize(path)
            for directory in directories
            for path in glob.glob(os.path.join(directory, "*.segment"))
        )

    def reply_depth(self) -> int:
        """Messages now in publishers' reply queues (ready and unacknowledged)."""
        rows = json.loads(
            _json_part(
                rabbitmqctl(
                    self.node.name,
                    "list_queues",
                    "-p",
                    "/",
                    "name",
                    "messages",
                    "--formatter",
                    "json",
                )
            )
        )
        return sum(
            int(row["messages"])
            for row in rows
            if str(row["name"]).startswith(topo.REPLY_QUEUE_PREFIX)
        )

    def publish_history_only(
        self, count: int, timeout: float, declare_first: bool = False
    ) -> tuple[set[str], int]:
        """``count`` pull requests into the history only (no node gets them live). Each is
        published ``mandatory`` and again until the stream takes it: for a moment after a
        restart RabbitMQ confirms a publish to the history yet routes it nowhere (seen
        here), until the stream's writer is back. Returns the requests' ids, and how many
        publishes came back unroutable."""
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        deadline = time.monotonic() + timeout
        try:
            channel = connection.channel()
            # As a worker declares them; only on a fresh broker (just after a restart a
            # stream's declaration is refused for a moment, its replica not back yet).
            for item in topo.shared_declarations() if declare_first else ():
                declare(channel, item)
            channel.confirm_delivery()
            ids, unroutable = set(), 0
            for index in range(count):
                request = PullRequest.new(parse_reference(f"registry.example/scale/missed:{index}"))
                while True:
                    try:
                        channel.basic_publish(
                            topo.HISTORY.name,
                            "",
                            request.encode(),
                            pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
                            mandatory=True,
                        )
                        break
                    except pika.exceptions.UnroutableError:
                        unroutable += 1
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
                ids.add(request.request_id)
            return ids, unroutable
        finally:
            connection.close()


def _json_part(output: str) -> str:
    start = min(i for i in (output.find("["), output.find("{")) if i >= 0)
    return output[start:]


# -- the simulated nodes ---------------------------------------------------------------------------


class Fleet:
    """The simulated nodes, ``per_process`` to a process (see ``bench/scale_nodes.py``)."""

    def __init__(self, count: int, per_process: int, settings: NodeSettings, logs: Path) -> None:
        names = [f"scale-{index:05d}" for index in range(count)]
        self.count = count
        self.processes: list[subprocess.Popen[str]] = []
        self._logs: list[IO[bytes]] = []
        processes = math.ceil(count / per_process)
        for index in range(processes):
            spec = FleetSpec(names[index::processes], settings)
            log = (logs / f"nodes-{index}.log").open("wb")
            self._logs.append(log)
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.scale_nodes", spec.encode()],
                    cwd=PROJECT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            )

    def command(self, **command: object) -> list[Any]:
        """Sends ``command`` to every process at once; their answers, in order."""
        line = json.dumps(command) + "\n"
        for process in self.processes:
            commands = _pipe(process.stdin)
            commands.write(line)
            commands.flush()
        answers = []
        for process in self.processes:
            answer = _pipe(process.stdout).readline()
            if not answer:
                raise RuntimeError(f"a node process ended (exit {process.poll()}); see its log")
            answers.append(json.loads(answer))
        return answers

    def reports(self, replayed: bool = False) -> list[dict[str, Any]]:
        return [node for part in self.command(do="status", replayed=replayed) for node in part]

    def wait(self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float) -> None:
        """Until every node's report meets ``condition``; raises after ``timeout`` seconds
        (saying how many did not), or at once if a node process ended."""
        deadline = time.monotonic() + timeout
        while True:
            lagging = [node for node in self.reports() if not condition(node)]
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"waited {timeout:.0f} s for {what}: {len(lagging)} nodes did not "
                    f"(one: {json.dumps(lagging[0])})"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    commands = _pipe(process.stdin)
                    commands.write(json.dumps({"do": "stop"}) + "\n")
                    commands.flush()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()


def _pipe(pipe: IO[str] | None) -> IO[str]:
    if pipe is None:
        raise RuntimeError("a node process was started without its pipes")
    return pipe


def deliveries(report: dict[str, Any]) -> int:
    return int(sum(report["deliveries"].values()))


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 1), "max": max(values)}


# -- one run -------------------------------------------------------------------------------------


def run_once(args: argparse.Namespace, count: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="puller-scale-", dir="/tmp"))
    state = Path(tempfile.mkdtemp(prefix="puller-scale-", dir="/dev/shm"))
    broker = OwnBroker(root)
    fleet: Fleet | None = None
    figures: dict[str, Any] = {"design": args.design, "nodes": count}
    clock = time.monotonic()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.monotonic()
        figures.setdefault("phase_seconds", {})[phase] = round(now - clock, 1)
        print(f"N = {count}: {phase} took {now - clock:.0f} s", file=sys.stderr, flush=True)
        clock = now

    try:
        broker.start()
        lap("broker_start")
        settings = NodeSettings(
            amqp_url=broker.url,
            design=args.design,
            state_root=str(state),
            presence_interval=args.presence_seconds,
            checkpoint_interval=args.checkpoint_seconds,
            sweep_delay=args.sweep_seconds,
            reconnect_spread=args.reconnect_spread,
            stream_port=broker.node.stream_port if args.design == "tail" else None,
        )
        # One request in the history first: a connection's sweep ends at an entry it reads
        # (on an empty history it waits for the first one).
        broker.publish_history_only(1, args.timeout, declare_first=True)
        began = time.monotonic()
        fleet = Fleet(count, args.per_process, settings, root)
        figures["processes"] = len(fleet.processes)
        fleet.wait(
            lambda n: n["caught_up"] and n["sweeps"] >= 1, f"{count} nodes to join", args.timeout
        )
        joined = fleet.reports()
        figures["join"] = {
            "seconds": round(time.monotonic() - began, 1),
            "deliveries_per_node": spread([deliveries(n) for n in joined]),
            "history_entries": broker.stream_tail(topo.HISTORY_STREAM_NAME) + 1,
        }
        lap("join")
        figures["idle"] = idle_phase(broker, fleet, args.idle_seconds, count)
        lap("idle")
        figures["broadcast"] = broadcast_phase(broker, fleet, args, count)
        lap("broadcast")
        figures["storm"] = storm_phase(broker, fleet, args, count)
        lap("storm")
    except BaseException:
        kept = root.with_name(root.name + "-failed")
        print(
            f"N = {count} failed: the broker's files and node logs kept in {kept}", file=sys.stderr
        )
        raise
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)
        if sys.exc_info()[0] is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            root.rename(root.with_name(root.name + "-failed"))
    return figures


def idle_phase(broker: OwnBroker, fleet: Fleet, seconds: float, count: int) -> dict[str, Any]:
    history, presence = topo.HISTORY_STREAM_NAME, topo.PRESENCE_STREAM.name
    tail, size = broker.stream_tail(history), broker.stream_bytes(history)
    presence_tail, cpu = broker.stream_tail(presence), broker.cpu_seconds()
    desired = broker.stream_tail(topo.DESIRED_STREAM.name)
    announced = sum(n["announcements"] for n in fleet.reports())
    began = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - began
    cpu = broker.cpu_seconds() - cpu
    announced = sum(n["announcements"] for n in fleet.reports()) - announced
    written = broker.stream_tail(history) - tail
    grown = broker.stream_bytes(history) - size
    presence_written = broker.stream_tail(presence) - presence_tail
    desired = broker.stream_tail(topo.DESIRED_STREAM.name) - desired
    hour = 3600 / elapsed
    return {
        "seconds": round(elapsed, 1),
        "history_entries_per_hour": round(written * hour),
        "history_bytes_per_hour": round(grown * hour),
        "desired_state_entries_per_hour": round(desired * hour),
        "presence_messages_per_second": round(presence_written / elapsed, 2),
        "presence_announcements_per_second": round(announced / elapsed, 2),
        "broker_cpu_per_second": round(cpu / elapsed, 3),
        "per_node_broker_cpu_ms_per_second": round(1000 * cpu / elapsed / count, 3),
    }


def broadcast_phase(
    broker: OwnBroker, fleet: Fleet, args: argparse.Namespace, count: int
) -> dict[str, Any]:
    rounds = []
    with Publisher(broker.url, connect_timeout=30) as publisher:
        if not publisher.connect(30):
            raise RuntimeError(f"the publisher cannot connect: {publisher.connection_problem}")
        for index in range(args.broadcasts):
            rounds.append(one_broadcast(broker, fleet, publisher, index, count, args))
    timed = [r for r in rounds if "publisher_cpu_s" in r]
    return {
        "rounds": rounds,
        "answers_per_round": min(r["answers"] for r in rounds),
        "publisher_cpu_s_per_1000_answers": round(
            1000 * sum(r["publisher_cpu_s"] for r in timed) / sum(r["answers"] for r in timed), 3
        ),
        "answers_per_second": round(
            sum(r["answers"] for r in rounds) / max(0.001, sum(r["seconds"] for r in rounds))
        ),
        "reply_queue_depth_max_sampled": max(
            (r["reply_queue_depth_max"] for r in rounds if "reply_queue_depth_max" in r),
            default=None,
        ),
        "history_entries_per_request": statistics.mean(r["history_entries"] for r in rounds),
        "history_bytes_per_request": round(statistics.mean(r["history_bytes"] for r in rounds)),
        "checkpoint_deliveries_per_node": spread(
            [d for r in rounds for d in r["checkpoint_deliveries"]]
        ),
    }


def one_broadcast(
    broker: OwnBroker,
    fleet: Fleet,
    publisher: Publisher,
    index: int,
    count: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One ``pull(expect=N)``, then every node's checkpoint. Even rounds measure the
    publisher's CPU, odd rounds sample the reply queue's depth (the sampler's ``rabbitmqctl``
    calls would count as the publisher's CPU)."""
    before = {n["name"]: n for n in fleet.reports()}
    tail = broker.stream_tail(topo.HISTORY_STREAM_NAME)
    size = broker.stream_bytes(topo.HISTORY_STREAM_NAME)
    sampling = index % 2 == 1
    depths: list[int] = []
    answered = threading.Event()

    def sample() -> None:
        while not answered.is_set():
            with contextlib.suppress(Exception):
                depths.append(broker.reply_depth())

    sampler = threading.Thread(target=sample, daemon=True)
    if sampling:
        sampler.start()
    cpu, began = time.process_time(), time.monotonic()
    report = publisher.pull(
        f"registry.example/scale/broadcast:{index}-{secrets.token_hex(2)}",
        expect=count,
        timeout=args.timeout,
    )
    cpu, seconds = time.process_time() - cpu, time.monotonic() - began
    answered.set()
    if sampling:
        sampler.join()
    present = sum(1 for row in report.nodes if row.status is Status.PRESENT)
    # Each node saves its place once idle, fed live, and the interval has passed.
    fleet.wait(
        lambda n: (
            (n["history_offset"] or -1) > (before[n["name"]]["history_offset"] or -1)
            and n["phase"] == "caught up"
        ),
        "every node's checkpoint",
        args.timeout,
    )
    after = fleet.reports()
    return {
        "answers": present,
        "seconds": round(seconds, 3),
        **(
            {"reply_queue_depth_max": max(depths, default=0), "reply_queue_samples": len(depths)}
            if sampling
            else {"publisher_cpu_s": round(cpu, 3)}
        ),
        "history_entries": broker.stream_tail(topo.HISTORY_STREAM_NAME) - tail,
        "history_bytes": broker.stream_bytes(topo.HISTORY_STREAM_NAME) - size,
        "checkpoint_deliveries": [deliveries(n) - deliveries(before[n["name"]]) for n in after],
    }


def storm_phase(
    broker: OwnBroker, fleet: Fleet, args: argparse.Namespace, count: int
) -> dict[str, Any]:
    fleet.command(do="gate", gate="refuse" if args.release == "backoff" else "hold")
    fleet.command(do="forget")
    if args.storm == "restart":
        broker.node.halt()
    else:
        rabbitmqctl(broker.node.name, "close_all_connections", "the scale bench's storm")
    fleet.wait(lambda n: not n["serving"], "every node to lose its connection", args.timeout)
    time.sleep(args.down_seconds)
    if args.storm == "restart":
        broker.node.launch()
        broker.node.wait_booted(240)
    missed, unroutable = broker.publish_history_only(args.missed, args.timeout)
    tail = broker.stream_tail(topo.HISTORY_STREAM_NAME)
    desired = broker.stream_tail(topo.DESIRED_STREAM.name)
    before = {n["name"]: n for n in fleet.reports()}
    cpu, began = broker.cpu_seconds(), time.monotonic()
    fleet.command(do="gate", gate="open")
    # Caught up to the end, and the connection's sweep (what came while it connected) done.
    fleet.wait(
        lambda n: (
            n["caught_up"]
            and (n["history_offset"] or -1) >= tail
            and n["sweeps"] > before[n["name"]]["sweeps"]
        ),
        f"{count} nodes to catch up after the storm",
        args.timeout,
    )
    cpu, seconds = broker.cpu_seconds() - cpu, time.monotonic() - began
    after = fleet.reports(replayed=True)
    per_node = [deliveries(n) - deliveries(before[n["name"]]) for n in after]
    readings = sorted({r for n in after for r in n["deliveries"]})
    by_reading = {
        reading: round(
            statistics.mean(
                n["deliveries"].get(reading, 0) - before[n["name"]]["deliveries"].get(reading, 0)
                for n in after
            ),
            1,
        )
        for reading in readings
    }
    return {
        "missed": args.missed,
        "missed_publishes_unroutable": unroutable,
        "seconds": round(seconds, 1),
        "deliveries_per_node": spread(per_node),
        "deliveries_over_missed_per_node": spread([d - args.missed for d in per_node]),
        "deliveries_total": sum(per_node),
        "deliveries_per_node_mean_by_reading": by_reading,
        "history_entries_written": broker.stream_tail(topo.HISTORY_STREAM_NAME) - tail,
        "desired_state_entries_written": broker.stream_tail(topo.DESIRED_STREAM.name) - desired,
        "keepers": sum(1 for n in after if n["keeper"]),
        "broker_cpu_s": round(cpu, 2),
        "tail_reads": dict(
            sum(
                (
                    Counter(
                        {
                            k: v - before[n["name"]]["tail_reads"].get(k, 0)
                            for k, v in n["tail_reads"].items()
                        }
                    )
                    for n in after
                ),
                Counter(),
            )
        ),
        "nodes_with_a_gap": sum(1 for n in after if n["gaps"] > before[n["name"]]["gaps"]),
        "connections_per_node": spread(
            [n["connections"] - before[n["name"]]["connections"] for n in after]
        ),
        "connect_attempts_per_node": spread(
            [n["attempts"] - before[n["name"]]["attempts"] for n in after]
        ),
        "missed_replayed_per_node": spread([len(missed & set(n["replayed"])) for n in after]),
        "nodes_that_replayed_every_missed_request": sum(
            1 for n in after if missed <= set(n["replayed"])
        ),
    }


# -- the model -------------------------------------------------------------------------------------


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = b + a·x``: (b, a)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 2 or len(set(xs)) < 2:
        return (ys[0] if ys else 0.0), 0.0
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def fit_quadratic_through_zero(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = c1·x + c2·x²``: (c1, c2)."""
    if len(points) < 2:
        x, y = points[0]
        return y / x, 0.0
    s2 = sum(x**2 for x, _ in points)
    s3 = sum(x**3 for x, _ in points)
    s4 = sum(x**4 for x, _ in points)
    t1 = sum(x * y for x, y in points)
    t2 = sum(x**2 * y for x, y in points)
    det = s2 * s4 - s3 * s3
    return (t1 * s4 - t2 * s3) / det, (s2 * t2 - s3 * t1) / det


def model(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fits the storm's and the checkpoints' counts to N; extrapolates to 10,000."""
    storm = [(r["nodes"], r["storm"]) for r in runs]
    missed = storm[0][1]["missed"]
    mean_b, mean_a = fit_line([(n, s["deliveries_per_node"]["mean"]) for n, s in storm])
    max_b, max_a = fit_line([(n, s["deliveries_per_node"]["max"]) for n, s in storm])
    cpu_1, cpu_2 = fit_quadratic_through_zero([(n, s["broker_cpu_s"]) for n, s in storm])
    per_node_b, per_node_a = fit_line([(n, 1000 * s["broker_cpu_s"] / n) for n, s in storm])
    written_b, written_a = fit_line([(n, s["history_entries_written"]) for n, s in storm])
    request_b, request_a = fit_line(
        [(r["nodes"], r["broadcast"]["history_entries_per_request"]) for r in runs]
    )
    check_b, check_a = fit_line(
        [(r["nodes"], r["broadcast"]["checkpoint_deliveries_per_node"]["mean"]) for r in runs]
    )
    n = TEN_THOUSAND
    return {
        "nodes_fitted": [r["nodes"] for r in runs],
        "missed": missed,
        "storm_deliveries_per_node_mean": {"b": round(mean_b, 1), "a": round(mean_a, 3)},
        "storm_deliveries_per_node_max": {"b": round(max_b, 1), "a": round(max_a, 3)},
        "storm_broker_cpu_s": {"c1": round(cpu_1, 5), "c2": round(cpu_2, 8)},
        "storm_broker_cpu_ms_per_node": {"b": round(per_node_b, 2), "a": round(per_node_a, 5)},
        "checkpoint_deliveries_per_node_mean": {"b": round(check_b, 1), "a": round(check_a, 3)},
        "storm_history_entries_written": {"b": round(written_b, 1), "a": round(written_a, 3)},
        "history_entries_per_request": {"b": round(request_b, 1), "a": round(request_a, 3)},
        "at_10000": {
            "storm_deliveries_per_node_mean": round(mean_b + mean_a * n),
            "storm_deliveries_per_node_max": round(max_b + max_a * n),
            "storm_deliveries_total": round(n * (mean_b + mean_a * n)),
            "storm_history_entries_written": round(written_b + written_a * n),
            "storm_broker_cpu_s": round(cpu_1 * n + cpu_2 * n * n),
            "storm_broker_cpu_s_per_node_line": round(n * (per_node_b + per_node_a * n) / 1000),
            "checkpoint_deliveries_per_node_mean": round(check_b + check_a * n),
            "history_entries_per_request": round(request_b + request_a * n),
        },
    }


def merged(path: Path, design: str, new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """This design's runs: the new ones, and earlier ones (in ``path``) at other N."""
    earlier: list[dict[str, Any]] = []
    if path.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            earlier = list(json.loads(path.read_text())["designs"][design]["runs"])
    done = {r["nodes"] for r in new}
    return sorted([*(r for r in earlier if r["nodes"] not in done), *new], key=lambda r: r["nodes"])


def print_runs(runs: Sequence[dict[str, Any]]) -> None:
    print_table(
        "scale: counts per N (storm: connections lost, missed requests history-only)",
        [
            "N",
            "storm deliveries/node mean",
            "max",
            "storm entries written",
            "storm broker CPU s",
            "every missed seen",
            "idle history entries/h",
            "presence msg/s",
            "publisher CPU s/1000 answers",
            "reply depth (sampled)",
            "entries/request",
            "checkpoint deliveries/node",
        ],
        [
            (
                r["nodes"],
                r["storm"]["deliveries_per_node"]["mean"],
                r["storm"]["deliveries_per_node"]["max"],
                r["storm"]["history_entries_written"],
                r["storm"]["broker_cpu_s"],
                f"{r['storm']['nodes_that_replayed_every_missed_request']}/{r['nodes']}",
                r["idle"]["history_entries_per_hour"],
                r["idle"]["presence_messages_per_second"],
                r["broadcast"]["publisher_cpu_s_per_1000_answers"],
                r["broadcast"]["reply_queue_depth_max_sampled"],
                r["broadcast"]["history_entries_per_request"],
                r["broadcast"]["checkpoint_deliveries_per_node"]["mean"],
            )
            for r in runs
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="100,300", help="N values, comma-separated")
    parser.add_argument("--design", default="tail", choices=DESIGNS)
    parser.add_argument("--per-process", type=int, default=150)
    parser.add_argument("--missed", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--presence-seconds", type=float, default=5.0)
    parser.add_argument("--broadcasts", type=int, default=2)
    parser.add_argument("--checkpoint-seconds", type=float, default=5.0)
    parser.add_argument("--down-seconds", type=float, default=5.0)
    parser.add_argument(
        "--sweep-seconds",
        type=float,
        default=SWEEP_DELAY,
        help="how long after catching up a connection's sweep starts (the worker's: 5)",
    )
    parser.add_argument(
        "--storm",
        choices=("restart", "drop"),
        default="restart",
        help="the broker stopped and started again (restart), or every connection closed by "
        "rabbitmqctl close_all_connections (drop: seconds shorter, the same catch-up)",
    )
    parser.add_argument(
        "--reconnect-spread",
        type=float,
        default=1.0,
        help="PULLER_RECONNECT_SPREAD of the nodes (the worker's default: 1)",
    )
    parser.add_argument(
        "--release",
        choices=("backoff", "together"),
        default="backoff",
        help="in the storm, nodes retry with the daemon's backoff while the broker is away "
        "(backoff), or all try at once when it is back (together: shorter)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="for each wait")
    parser.add_argument(
        "--refit", action="store_true", help="run nothing: fit the saved runs again"
    )
    args = parser.parse_args()
    for count in () if args.refit else (int(n) for n in args.nodes.split(",")):
        figures = run_once(args, count)
        print(json.dumps(figures), flush=True)
        record(args, [figures])  # each N as it ends: a later one may fail
    record(args, [])


def record(args: argparse.Namespace, new: Sequence[dict[str, Any]]) -> None:
    """Merges ``new`` runs into ``scale.json`` and fits this design's model again."""
    path = RESULTS / "scale.json"
    runs = merged(path, args.design, new)
    if not new:
        print_runs(runs)
    document: dict[str, Any] = {"designs": {}}
    if path.exists():
        with contextlib.suppress(ValueError):
            document = json.loads(path.read_text())
    earlier = document.setdefault("designs", {}).get(MEASURED_BEFORE)
    if isinstance(earlier, dict):
        earlier.setdefault("measured_on", MARKERS_MEASURED_ON)
    settings = {k: v for k, v in vars(args).items() if k not in ("nodes", "refit")}
    if not new:
        settings = document["designs"][args.design]["settings"]
    document["designs"][args.design] = {
        "settings": settings,
        "runs": runs,
        "model": model(runs),
    }
    save("scale", document)
    if not new:
        print(json.dumps(document["designs"][args.design]["model"], indent=2))


if __name__ == "__main__":
    main()
