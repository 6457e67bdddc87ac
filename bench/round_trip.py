"""Broadcast round trip: how fast a publisher learns that N nodes have an image already there.

puller (``Publisher.pull(image, expect=N)`` against N real ``puller-worker`` processes,
sharing a few Docker Engines) against the floor (bare pika: N consumers on exclusive
queues bound to a fanout exchange, each replying at once) and the peer (Celery's
``app.control.ping(limit=N)`` against N solo Celery workers). Each system's rounds
run back to back in one run; ratios are puller's p50 over each baseline's p50. Beside the
times: the CPU each node's process spent per round (user and system, from
``/proc/PID/stat``; the median over the N processes), which is what N processes on a few
cores pay for each broadcast.

    .venv/bin/python -m bench.round_trip [--nodes 10,50,100] [--rounds 200] [--engines 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import matplotlib
import pika

from bench.celery_peer import app
from bench.common import (
    RESULTS,
    BenchEnvironment,
    bench_environment,
    print_table,
    save,
    stop_all,
    summary_ms,
)
from publisher import Publisher

matplotlib.use("Agg")  # before pyplot: no display here
import matplotlib.pyplot as plt

SYSTEMS = ("floor", "puller", "celery")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="10,50,100")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.nodes.split(",")]
    figures: dict[str, dict[str, dict[str, float]]] = {}
    with bench_environment() as environment:
        environment.add_engines(args.engines)
        image = environment.registry.push_files("bench/present", "1", {"f": b"x"})
        for engine in environment.engines:
            client = engine.client()
            client.images.pull(image)
            client.close()
        for n in sizes:
            figures[str(n)] = {
                "floor": measure_floor(environment, n, args.rounds),
                "puller": measure_puller(environment, image, n, args.rounds),
                "celery": measure_celery(environment, n, args.rounds),
            }
            report(n, figures[str(n)])
    rows: list[list[object]] = []
    for size, by_system in figures.items():
        p = by_system["puller"]["p50"]
        rows.append(
            [
                size,
                by_system["floor"]["p50"],
                p,
                by_system["celery"]["p50"],
                p / by_system["floor"]["p50"],
                p / by_system["celery"]["p50"],
                by_system["floor"]["node_cpu_us"],
                by_system["puller"]["node_cpu_us"],
                by_system["celery"]["node_cpu_us"],
            ]
        )
    print_table(
        "summary: p50 ms, and puller's ratio (goal: <= 1.5x floor, <= 0.5x celery); "
        "CPU of one node's process per round, us",
        [
            "N",
            "floor",
            "puller",
            "celery",
            "puller/floor",
            "puller/celery",
            "floor CPU",
            "puller CPU",
            "celery CPU",
        ],
        rows,
    )
    saved = save("round_trip", {"rounds": args.rounds, "engines": args.engines, "p_ms": figures})
    print(f"\nfigures saved to {saved}")
    if not args.no_plot:
        print(f"plot saved to {plot(figures)}")
    return 0


def report(n: int, by_system: dict[str, dict[str, float]]) -> None:
    rows = [
        [
            system,
            s["p50"],
            s["p90"],
            s["p99"],
            s["node_cpu_us"],
            s.get("caller_cpu_us", 0.0),
            s.get("broker_cpu_us", 0.0),
        ]
        for system, s in by_system.items()
    ]
    print_table(
        f"N = {n}: round trip, ms; CPU per round, us: one node's process, the publishing "
        "process, RabbitMQ",
        ["system", "p50", "p90", "p99", "node CPU us", "caller CPU us", "broker CPU us"],
        rows,
    )


def timed_rounds(rounds: int, one_round: Callable[[], object], pids: list[int]) -> dict[str, float]:
    """The rounds' times (ms); ``node_cpu_us``: the median, over the processes ``pids`` (one
    per node), of the CPU each spent per round; ``caller_cpu_us``: this process's (the
    publishing side's) per round; ``broker_cpu_us``: RabbitMQ's per round (0 when the
    machine does not run exactly one)."""
    for _ in range(min(10, rounds)):  # warm up: connections, caches, JIT-less Python paths
        one_round()
    samples = []
    broker = broker_pid()
    cpu_before = [cpu_seconds(pid) for pid in pids]
    broker_before = cpu_seconds(broker) if broker else 0.0
    caller_before = time.process_time()
    for _ in range(rounds):
        started = time.perf_counter()
        one_round()
        samples.append(time.perf_counter() - started)
    caller = time.process_time() - caller_before
    spent = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    return {
        **summary_ms(samples),
        "node_cpu_us": 1e6 * statistics.median(spent) / rounds if spent else 0.0,
        "caller_cpu_us": 1e6 * caller / rounds,
        "broker_cpu_us": 1e6 * (cpu_seconds(broker) - broker_before) / rounds if broker else 0.0,
    }


def broker_pid() -> int | None:
    """RabbitMQ's Erlang VM, if exactly one runs here."""
    found = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True, check=False)
    pids = found.stdout.split()
    return int(pids[0]) if len(pids) == 1 else None


def cpu_seconds(pid: int) -> float:
    """User and system CPU of process ``pid`` so far, all its threads (``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_puller(
    environment: BenchEnvironment, image: str, n: int, rounds: int
) -> dict[str, float]:
    workers = environment.start_workers(n, prefix=f"n{n}")
    try:
        with Publisher(environment.amqp_url) as publisher:

            def one_round() -> None:
                report = publisher.pull(image, expect=n, timeout=30)
                if not report.ok:
                    raise RuntimeError(f"a puller round failed: {report}")

            return timed_rounds(rounds, one_round, [w.process.pid for w in workers if w.process])
    finally:
        stop_all([w.process for w in workers])


def measure_floor(environment: BenchEnvironment, n: int, rounds: int) -> dict[str, float]:
    exchange = f"bench.floor.{uuid.uuid4().hex[:6]}"
    consumers = _spawn(
        n,
        lambda _i: [sys.executable, "-m", "bench.floor_consumer", environment.amqp_url, exchange],
    )
    try:
        connection = pika.BlockingConnection(pika.URLParameters(environment.amqp_url))
        channel = connection.channel()
        channel.exchange_declare(exchange, exchange_type="fanout")
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        answers: dict[str, int] = {}

        def collect(_ch: object, _m: object, properties: pika.BasicProperties, _b: bytes) -> None:
            key = properties.correlation_id or ""
            answers[key] = answers.get(key, 0) + 1

        channel.basic_consume(reply_queue, collect, auto_ack=True)

        def one_round(wait: float = 30) -> bool:
            correlation_id = uuid.uuid4().hex
            channel.basic_publish(
                exchange,
                "",
                b"is it there?",
                pika.BasicProperties(reply_to=reply_queue, correlation_id=correlation_id),
            )
            deadline = time.monotonic() + wait
            while answers.get(correlation_id, 0) < n:
                if time.monotonic() > deadline:
                    return False
                connection.process_data_events(time_limit=0.01)
            del answers[correlation_id]
            return True

        deadline = time.monotonic() + 300
        while not one_round(wait=1.0):  # until every consumer has bound its queue
            if time.monotonic() > deadline:
                raise RuntimeError("the floor's consumers did not all come up")
        try:
            return timed_rounds(rounds, one_round, [c.pid for c in consumers])
        finally:
            connection.close()
    finally:
        stop_all(consumers)


def measure_celery(environment: BenchEnvironment, n: int, rounds: int) -> dict[str, float]:
    app.conf.broker_url = environment.amqp_url
    celery = str(Path(sys.executable).parent / "celery")
    tag = uuid.uuid4().hex[:6]
    workers = _spawn(
        n,
        lambda i: [
            celery,
            "-A",
            "bench.celery_peer",
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "-n",
            f"peer{i}-{tag}@bench",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            f"bench-{tag}-{i}",
            "--loglevel=WARNING",
        ],
        env_extra={"BENCH_AMQP_URL": environment.amqp_url},
    )
    try:
        deadline = time.monotonic() + 300
        while len(app.control.ping(timeout=1.0)) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the Celery workers did not all come up")

        def one_round() -> None:
            replies = app.control.ping(limit=n, timeout=30)
            if len(replies) < n:
                raise RuntimeError(f"only {len(replies)} of {n} Celery workers answered")

        return timed_rounds(rounds, one_round, [w.pid for w in workers])
    finally:
        # Killed: a peer has nothing to finish, and a warm (or cold) shutdown of Celery 5.7
        # then waits 10 s in its event loop before the process ends.
        for worker in workers:
            worker.kill()
        stop_all(workers)
        app.close()


def _spawn(
    n: int, command: Callable[[int], list[str]], env_extra: dict[str, str] | None = None
) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, **(env_extra or {})}
    return [
        subprocess.Popen(
            command(i),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        for i in range(n)
    ]


def plot(figures: dict[str, dict[str, dict[str, float]]]) -> Path:
    sizes = [int(n) for n in figures]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for system, style in zip(SYSTEMS, ("k--", "b-o", "r-s"), strict=True):
        p50 = [figures[str(n)][system]["p50"] for n in sizes]
        p90 = [figures[str(n)][system]["p90"] for n in sizes]
        axes.plot(sizes, p50, style, label=f"{system} p50")
        axes.fill_between(sizes, p50, p90, alpha=0.15, color=style[0])
    axes.set_xlabel("nodes (N)")
    axes.set_ylabel("round trip, ms (band: p50 to p90)")
    axes.set_title("Broadcast round trip, image already on every node")
    axes.grid(alpha=0.3)
    axes.legend()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "round_trip.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    sys.exit(main())
