"""The session path: what ``Publisher.request()`` costs the session service.

Latency of one fire-and-forget request (published and confirmed by the broker, with 3
workers bound), p50/p99, and sustained requests per second on one connection; against
the floor, a bare pika publish with confirms and ``mandatory`` to the same exchange.

    .venv/bin/python -m bench.session_path [--requests 5000] [--workers 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import pika

from bench.common import bench_environment, print_table, save, stop_all, summary_ms
from contract import PullRequest, parse_reference
from publisher import Publisher

FLOOR_EXCHANGE = "bench.session.floor"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    with bench_environment() as environment:
        environment.add_engines(1)
        image = environment.registry.push_files("bench/session", "1", {"f": b"s"})
        workers = environment.start_workers(args.workers, prefix="s")
        try:
            with Publisher(environment.amqp_url) as publisher:
                publisher.pull(image, expect=args.workers, timeout=60)  # warm: present everywhere
                puller = timed(args.requests, lambda: publisher.request(image))
            # The floor: the same confirmed, mandatory publish of a request-sized body, by bare
            # pika, to a fanout exchange with as many queues bound (and nobody consuming).
            connection = pika.BlockingConnection(pika.URLParameters(environment.amqp_url))
            channel = connection.channel()
            channel.exchange_declare(FLOOR_EXCHANGE, exchange_type="fanout", auto_delete=True)
            for _ in range(args.workers):
                queue = channel.queue_declare("", exclusive=True).method.queue
                channel.queue_bind(queue, FLOOR_EXCHANGE)
            channel.confirm_delivery()
            body = PullRequest.new(parse_reference(image)).encode()
            floor = timed(
                args.requests,
                lambda: channel.basic_publish(FLOOR_EXCHANGE, "", body, mandatory=True),
            )
            connection.close()
        finally:
            stop_all([w.process for w in workers])
    rows: list[list[object]] = []
    for name, (samples, rate) in (("floor", floor), ("puller", puller)):
        s = summary_ms(samples)
        rows.append([name, s["p50"], s["p90"], s["p99"], rate])
    ratios = [float(p) / float(f) for p, f in zip(rows[1][1:], rows[0][1:], strict=True)]  # type: ignore[arg-type]
    rows.append(["puller/floor", *ratios])
    print_table(
        f"request(): {args.requests} requests, {args.workers} workers bound "
        "(goal: p99 < 2 ms on loopback)",
        ["", "p50 ms", "p90 ms", "p99 ms", "requests/s"],
        rows,
    )
    print(f"\nfigures saved to {save('session_path', {'rows': rows})}")
    return 0


def timed(count: int, request: Callable[[], object]) -> tuple[list[float], float]:
    for _ in range(min(100, count)):
        request()
    samples = []
    started = time.perf_counter()
    for _ in range(count):
        begun = time.perf_counter()
        request()
        samples.append(time.perf_counter() - begun)
    return samples, count / (time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
