"""Head-of-line blocking: how long a healthy image takes to reach every node while a
registry is a black hole (accepts connections, never answers) and a flood of requests for
missing images is in progress; against the same pull on idle nodes, in the same run.

    .venv/bin/python -m bench.head_of_line [--nodes 3] [--flood 2000] [--repeats 3]

Three loads: a flood of ``--flood`` requests for 20 missing images (what a buggy caller
repeating itself sends), the same number of requests for all-different missing images (no
memory helps: each needs the registry), and neither (idle). The black hole holds two
requests in every case but idle.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

from bench.common import BenchEnvironment, bench_environment, print_table, save, stop_all
from localcluster.faults import BlackHole
from publisher import Publisher

STALL_TIMEOUT = 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with bench_environment() as environment:
        environment.add_engines(args.nodes)
        workers = environment.start_workers(
            args.nodes,
            prefix="hol",
            PULLER_STALL_TIMEOUT=str(STALL_TIMEOUT),
            # At the end the black hole's pulls are cancelled, not waited for (20 s by default).
            PULLER_SHUTDOWN_GRACE="1",
        )
        hole = BlackHole()
        try:
            with Publisher(environment.amqp_url) as publisher:
                rows = measure(environment, publisher, hole, args)
        finally:
            hole.close()
            stop_all([w.process for w in workers])
    idle = rows[0][1]
    table = [[load, seconds, queued, seconds / idle] for load, seconds, queued in rows]
    print_table(
        f"a healthy image onto {args.nodes} nodes, median of {args.repeats} "
        "(goal: within 2x of idle)",
        ["load", "seconds", "max queued s", "x idle"],
        table,
    )
    print(f"\nfigures saved to {save('head_of_line', {'rows': table})}")
    return 0


def measure(
    environment: BenchEnvironment, publisher: Publisher, hole: BlackHole, args: argparse.Namespace
) -> list[tuple[str, float, float]]:
    registry = environment.registry
    rows: list[tuple[str, float, float]] = []
    repeated = [f"{registry.address}/hol/missing-{n}:1" for n in range(20)]
    for load in ("idle", "black hole + repeated flood", "black hole + distinct flood"):
        seconds, queued = [], []
        for repeat in range(args.repeats):
            if load != "idle":
                for n in range(2):
                    publisher.request(f"{hole.address}/stuck/{repeat}-{n}:1")
                if "repeated" in load:
                    flood = [repeated[n % len(repeated)] for n in range(args.flood)]
                else:
                    tag = uuid.uuid4().hex[:6]
                    flood = [f"{registry.address}/hol/{tag}-{n}:1" for n in range(args.flood)]
                for image in flood:
                    publisher.request(image)
            healthy = registry.push_files(
                f"hol/healthy-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
            )
            started = time.perf_counter()
            report = publisher.pull(healthy, expect=args.nodes, timeout=600)
            seconds.append(time.perf_counter() - started)
            if not report.ok:
                raise RuntimeError(f"the healthy pull failed: {report}")
            queued.append(max(r.queued_seconds for r in report.nodes))
            time.sleep(1)  # let the flood drain before the next round
        rows.append((load, statistics.median(seconds), max(queued)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
