"""Footprint: one worker's resident memory idle and during a pull, and its CPU when idle,
against a bare pika consumer (the floor) measured in the same run.

    .venv/bin/python -m bench.footprint [--idle-seconds 10] [--size-mb 100] [--bin DIR]

``--bin``: a directory holding ``puller-worker`` (another version, in a virtualenv of its
own); by default this checkout's, with its runtime dependencies only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.common import (
    bench_environment,
    print_table,
    runtime_worker_command,
    save,
    stop_all,
)
from publisher import Publisher

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def idle_cpu_percent(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--bin", type=Path, help="where puller-worker is")
    args = parser.parse_args(argv)
    command = [str(args.bin / "puller-worker")] if args.bin else runtime_worker_command()
    with bench_environment() as environment:
        environment.add_engines(1)
        layer = int(args.size_mb * 1_000_000 / 4)
        image = environment.registry.push_sized("bench/footprint", "1", [layer] * 4)
        floor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.floor_consumer",
                environment.amqp_url,
                f"bench.footprint.{uuid.uuid4().hex[:6]}",
            ],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        # The worker as it runs in its image: runtime dependencies only.
        [worker] = environment.start_workers(1, prefix="f", command=command)
        try:
            if floor.stdout is None or worker.process is None:
                raise RuntimeError("the processes to measure did not start")
            floor.stdout.readline()  # "consuming"
            pid = worker.process.pid
            time.sleep(2)  # settle after start
            idle_rss, floor_rss = rss_mb(pid), rss_mb(floor.pid)
            results: dict[str, float] = {}

            def floor_cpu() -> None:
                results["floor"] = idle_cpu_percent(floor.pid, args.idle_seconds)

            sampler = threading.Thread(target=floor_cpu)
            sampler.start()
            worker_cpu = idle_cpu_percent(pid, args.idle_seconds)
            sampler.join()
            peak = idle_rss
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_mb(pid))
                    time.sleep(0.05)

            watcher = threading.Thread(target=sample)
            watcher.start()
            with Publisher(environment.amqp_url) as publisher:
                report = publisher.pull(image, expect=1, timeout=600)
            done.set()
            watcher.join()
            if not report.ok:
                raise RuntimeError(f"the pull failed: {report}")
        finally:
            stop_all([worker.process, floor])
    rows = [
        ["worker idle RSS, MB", idle_rss, floor_rss, idle_rss / floor_rss],
        [
            f"worker RSS during a {args.size_mb:g} MB pull (peak), MB",
            peak,
            floor_rss,
            peak / floor_rss,
        ],
        [f"idle CPU over {args.idle_seconds:g} s, %", worker_cpu, results["floor"], ""],
    ]
    print_table(
        "footprint (goal: < 40 MB idle, near zero CPU idle)",
        ["", "puller-worker", "bare pika consumer", "ratio"],
        rows,
    )
    figures = {
        "idle_rss_mb": idle_rss,
        "pull_peak_rss_mb": peak,
        "idle_cpu_percent": worker_cpu,
        "floor_rss_mb": floor_rss,
        "floor_idle_cpu_percent": results["floor"],
    }
    print(f"\nfigures saved to {save('footprint', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
