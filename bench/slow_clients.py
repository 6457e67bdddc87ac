"""Slow clients against both HTTP servers, each inside its Kubernetes memory limit:
thousands of connections that begin a request and never finish it, then all close at once.

    .venv/bin/python -m bench.slow_clients [--gateway 5000] [--worker 3000] [--bin DIR]
        [--begun trickle,"4 KB head","60 KB body"] [--trickle-seconds 15]

``puller-http`` runs in a cgroup v1 memory group of 256 MiB and ``puller-worker`` in one of
128 MiB (their limits in deploy/kubernetes/), connected to a vhost of the machine's
RabbitMQ. Printed per server: memory idle and with the connections open (resident, and as
the memory group counts it, kernel memory included), per slow connection, the slowest
answer to ``/alive`` and a real call while they are open, while each sends a byte every
20 s (and the server's CPU then), and once they have all closed. ``--begun``: what each
connection sends before it stops (a few bytes of a head; 4 KB of a head; 60 KB of a body).
``--bin``: a directory holding ``puller-http`` and ``puller-worker`` (another version, in a
virtualenv of its own); by default this checkout's, with its runtime dependencies only.
Needs root (cgroups) and an open-file limit above the connection counts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bench.common import bench_environment, print_table, runtime_command, save
from localcluster.cgroup import MIB, MemoryGroup
from localcluster.cluster import GatewayProcess, WorkerProcess
from localcluster.processes import ServiceFailed
from localcluster.slow_clients import BEGUN, Siege, siege
from serving.program import raise_open_file_limit

GATEWAY_LIMIT_MIB = 256
WORKER_LIMIT_MIB = 128


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", type=int, default=5000, help="slow connections")
    parser.add_argument("--worker", type=int, default=3000, help="slow connections")
    parser.add_argument("--bin", type=Path, help="where puller-http and puller-worker are")
    parser.add_argument(
        "--begun",
        default="trickle",
        help=f"what each connection sends before it stops, comma-separated: {', '.join(BEGUN)}",
    )
    parser.add_argument(
        "--trickle-seconds",
        type=float,
        default=15.0,
        help="then every connection sends a byte every 20 s, for this long (0: not)",
    )
    args = parser.parse_args(argv)
    kinds = args.begun.split(",")
    if raise_open_file_limit() < max(args.gateway, args.worker) + 100:
        print("the open-file limit is below the connection counts", file=sys.stderr)
        return 2

    def command(program: str) -> list[str]:
        return [str(args.bin / program)] if args.bin else runtime_command(program)

    results: list[tuple[str, str, Siege]] = []
    with bench_environment() as environment:
        [engine] = environment.add_engines(1)
        for kind in kinds:
            begun = BEGUN[kind]
            with MemoryGroup(GATEWAY_LIMIT_MIB * MIB) as group:
                gateway = GatewayProcess(
                    environment.amqp_url,
                    environment.root / "gateway.log",
                    command=group.command(command("puller-http")),
                )
                try:
                    gateway.start()
                    report = siege(
                        gateway.port,
                        _pid(gateway.process),
                        args.gateway,
                        ["/alive", "/nodes"],
                        group,
                        begun=begun,
                        trickle_for=args.trickle_seconds,
                    )
                    results.append(("puller-http", kind, report))
                finally:
                    gateway.stop()
            with MemoryGroup(WORKER_LIMIT_MIB * MIB) as group:
                worker = WorkerProcess(
                    node="slow-clients",
                    docker_host=engine.docker_host,
                    amqp_url=environment.amqp_url,
                    log_path=environment.root / "worker.log",
                    command=group.command(command("puller-worker")),
                )
                try:
                    worker.start()
                    report = siege(
                        worker.health_port,
                        _pid(worker.process),
                        args.worker,
                        ["/alive", "/ready"],
                        group,
                        begun=begun,
                        trickle_for=args.trickle_seconds,
                    )
                    results.append(("puller-worker", kind, report))
                except ServiceFailed as error:
                    print(f"puller-worker did not start: {error}", file=sys.stderr)
                    return 1
                finally:
                    worker.stop()
    rows = [_row(name, kind, report) for name, kind, report in results]
    print_table(
        "slow clients: connections that begin a request and never end it, inside the "
        f"manifests' memory limits ({GATEWAY_LIMIT_MIB} / {WORKER_LIMIT_MIB} MiB); "
        "goal: every answer within 1 s, no OOM kill",
        [
            "server",
            "each sends",
            "connections",
            "taken after s",
            "held at end",
            "RSS idle MB",
            "RSS open MB",
            "group idle MB",
            "group open MB",
            "group peak MB",
            "per connection KiB (RSS / group)",
            "slowest answer s",
            "unanswered",
            "OOM kills",
            "CPU % trickling",
        ],
        rows,
    )
    for name, kind, report in results:
        if report.error:
            print(f"{name}, {kind}: {report.error}")
    save(
        "slow_clients",
        {
            "bin": str(args.bin or "this checkout"),
            "rows": rows,
            "probes": {
                f"{name}, {kind}": [(p.path, p.status, round(p.seconds, 4)) for p in report.probes]
                for name, kind, report in results
            },
        },
    )
    return 0


def _row(name: str, kind: str, report: Siege) -> list[object]:
    rss = report.per_connection_kib(report.rss_idle, report.rss_open)
    group = report.per_connection_kib(report.group_idle, report.group_open)
    return [
        name,
        kind,
        report.count,
        "never" if report.accepted_seconds is None else report.accepted_seconds,
        report.held_at_end,
        report.rss_idle or "-",
        report.rss_open or "gone",
        report.group_idle or "-",
        report.group_open or "-",
        report.group_peak or "-",
        f"{_figure(rss)} / {_figure(group)}",
        report.slowest,
        len(report.unanswered),
        report.oom_kills,
        "-" if report.trickling_cpu is None else report.trickling_cpu,
    ]


def _pid(process: subprocess.Popen[bytes] | None) -> int:
    if process is None:
        raise RuntimeError("the server did not start")
    return process.pid


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    os.environ.setdefault("PULLER_LOG_FORMAT", "json")
    sys.exit(main())
