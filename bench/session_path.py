"""The session path: what ``Publisher.request()`` costs the session service.

Latency of one fire-and-forget request (published and confirmed by the broker), p50/p99,
and sustained requests per second on one connection, with 3 queues bound to the pulls
exchange and nobody consuming them (a real cluster's workers run on other machines);
against the floor, a bare pika publish with confirms and ``mandatory`` to a fanout
exchange with as many queues bound. A last row has 3 real workers on this machine
instead, answering every request: on 2 cores their answers compete with the publisher
and the broker for the CPU.

Two ways: back to back (each request as soon as the last returned; in the last row the
workers' answers to the earlier ones compete for the same cores and for the publisher's
I/O thread), and paced at ``--rate`` requests a second (a session service publishes one per session
created: far fewer than the back-to-back rate).

A third row, "stream alone": a bare pika confirmed publish of the same body into a stream
of its own. ``request()`` returns once its copy is in the history stream too (so that a
node that was away still gets it), and this is what that confirm alone costs. A fourth,
"N threads": ``--threads`` callers sharing one publisher, each calling ``request()`` back
to back (latency of each call; requests a second of all together).

    .venv/bin/python -m bench.session_path [--requests 5000] [--workers 3] [--rate 100]
        [--threads 8]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable

import pika

from bench.common import bench_environment, print_table, save, stop_all, summary_ms
from contract import PullRequest, parse_reference
from contract import topology as topo
from publisher import Publisher

FLOOR_EXCHANGE = "bench.session.floor"
STREAM_EXCHANGE = "bench.session.stream"
STREAM = "bench.session.stream"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    paced = max(200, args.requests // 5)

    def both(request: Callable[[], object]) -> tuple[Timing, Timing]:
        """``request`` back to back, then paced at ``--rate``."""
        return timed(args.requests, request), timed(paced, request, args.rate)

    with bench_environment() as environment:
        environment.add_engines(1)
        image = environment.registry.push_files("bench/session", "1", {"f": b"s"})
        workers = environment.start_workers(args.workers, prefix="s")
        try:
            with Publisher(environment.amqp_url) as publisher:
                publisher.pull(image, expect=args.workers, timeout=60)  # warm: present everywhere
                local, local_paced = both(lambda: publisher.request(image))
        finally:
            stop_all([w.process for w in workers])
        # From here on, as for the floor: as many queues bound as there were workers, and
        # nobody consuming (the workers of a real cluster run on other machines).
        connection = pika.BlockingConnection(pika.URLParameters(environment.amqp_url))
        channel = connection.channel()
        for _ in range(args.workers):
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, topo.PULLS.name)
        with Publisher(environment.amqp_url) as publisher:
            puller, puller_paced = both(lambda: publisher.request(image))
            threads = from_threads(args.threads, args.requests, lambda: publisher.request(image))
        # The floor: the same confirmed, mandatory publish of a request-sized body, by bare
        # pika, to a fanout exchange with as many queues bound (and nobody consuming).
        channel.exchange_declare(FLOOR_EXCHANGE, exchange_type="fanout", auto_delete=True)
        for _ in range(args.workers):
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, FLOOR_EXCHANGE)
        channel.confirm_delivery()
        body = PullRequest.new(parse_reference(image)).encode()
        floor, floor_paced = both(
            lambda: channel.basic_publish(FLOOR_EXCHANGE, "", body, mandatory=True)
        )
        channel.exchange_declare(STREAM_EXCHANGE, exchange_type="fanout", auto_delete=True)
        channel.queue_declare(STREAM, durable=True, arguments={"x-queue-type": "stream"})
        channel.queue_bind(STREAM, STREAM_EXCHANGE)
        persistent = pika.BasicProperties(delivery_mode=2)
        stream, stream_paced = both(
            lambda: channel.basic_publish(STREAM_EXCHANGE, "", body, persistent)
        )
        channel.queue_delete(STREAM)
        connection.close()
    names = [
        "floor",
        "puller",
        "stream alone",
        f"puller, {args.workers} workers here",
        f"puller, {args.threads} threads",
    ]
    tables = {}
    for title, runs in (
        (
            f"back to back, {args.requests} requests",
            [floor, puller, stream, local, threads],
        ),
        (
            f"paced, {args.rate:g} a second, {paced} requests",
            [floor_paced, puller_paced, stream_paced, local_paced],
        ),
    ):
        rows: list[list[object]] = []
        for name, (samples, rate) in zip(names, runs, strict=False):
            s = summary_ms(samples)
            rows.append([name, s["p50"], s["p90"], s["p99"], rate])
        ratios = [float(p) / float(f) for p, f in zip(rows[1][1:], rows[0][1:], strict=True)]  # type: ignore[arg-type]
        rows.append(["puller/floor", *ratios])
        print_table(
            f"request(): {title}; {args.workers} queues bound (goal: p99 <= 5 ms back to back)",
            ["", "p50 ms", "p90 ms", "p99 ms", "requests/s"],
            rows,
        )
        tables[title] = rows
    print(f"\nfigures saved to {save('session_path', tables)}")
    return 0


Timing = tuple[list[float], float]
"""Latencies in seconds, and requests a second."""


def timed(count: int, request: Callable[[], object], rate: float | None = None) -> Timing:
    """Latencies of ``count`` requests, and requests a second; with ``rate``, each request
    starts on a schedule of ``rate`` a second (none starts before the last returned)."""
    for _ in range(min(100, count)):
        request()
    samples = []
    started = time.perf_counter()
    for index in range(count):
        if rate:
            time.sleep(max(0.0, started + index / rate - time.perf_counter()))
        begun = time.perf_counter()
        request()
        samples.append(time.perf_counter() - begun)
    return samples, count / (time.perf_counter() - started)


def from_threads(threads: int, count: int, request: Callable[[], object]) -> Timing:
    """Latencies of ``count`` requests made by ``threads`` threads at once, each back to
    back, and requests a second of them all."""
    for _ in range(min(100, count)):
        request()
    per_thread = max(1, count // threads)
    samples: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def run(mine: list[float]) -> None:
        start.wait()
        for _ in range(per_thread):
            begun = time.perf_counter()
            request()
            mine.append(time.perf_counter() - begun)

    runners = [threading.Thread(target=run, args=(s,)) for s in samples]
    for runner in runners:
        runner.start()
    start.wait()
    started = time.perf_counter()
    for runner in runners:
        runner.join()
    took = time.perf_counter() - started
    return [s for mine in samples for s in mine], per_thread * threads / took


if __name__ == "__main__":
    sys.exit(main())
