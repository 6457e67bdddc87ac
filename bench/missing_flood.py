"""A flood of distinct missing images against a worker held to a pod's memory limit: its
resident memory as the requests are answered, whether the kernel kills it, and whether a
worker that then replays the same requests from the history survives them. Baseline (the
worker of another revision, ``--baseline``) and this tree's worker, in the same run.

    .venv/bin/python -m bench.missing_flood [--images 10000] [--limit-mib 128]
                                            [--baseline 3ddced4] [--no-replay]

Each worker runs alone, on a Docker Engine of its own, in a cgroup v1 memory group of
``--limit-mib`` (as the DaemonSet's 128 Mi limit). One publisher asks for ``--images``
images that the registry does not have, each a different name, as fast as it can publish;
the worker answers ``not_found`` for each. The goal: under half the limit throughout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import BenchEnvironment, bench_environment, print_table, save, stop_all
from bench.prune_race import worker_from
from localcluster.cluster import WorkerProcess, worker_command
from localcluster.memory_limit import MemoryGroup, resident_bytes
from publisher import Publisher

BASELINE = "3ddced4"
"""The last commit before the not-found memory and replays were bounded (issue 24, break 8)."""
MIB = 1024 * 1024
SAMPLE_EVERY = 1000
"""Answers between two samples of the worker's memory."""


def run_worker(
    environment: BenchEnvironment,
    name: str,
    command: list[str],
    group: MemoryGroup,
    engine_index: int,
) -> WorkerProcess:
    worker = WorkerProcess(
        node=name,
        docker_host=environment.engines[engine_index].docker_host,
        amqp_url=environment.amqp_url,
        log_path=environment.root / "workers" / f"{name}.log",
        command=group.command(command),
    )
    worker.start(timeout=120)
    return worker


def rss_mib(worker: WorkerProcess) -> float:
    assert worker.process is not None  # noqa: S101 - started
    return round(resident_bytes(worker.process.pid)[0] / MIB, 1)


def answered(worker: WorkerProcess) -> float:
    return worker.metric("puller_worker_answers_total")


def follow(
    worker: WorkerProcess, group: MemoryGroup, total: int, timeout: float
) -> dict[str, object]:
    """Samples the worker's memory every :data:`SAMPLE_EVERY` answers until ``total`` are
    answered, it is killed, or ``timeout`` seconds pass."""
    assert worker.process is not None  # noqa: S101 - started
    pid = worker.process.pid
    started = time.monotonic()
    samples: list[list[float]] = []
    peak = anonymous = 0
    done = 0.0
    next_sample = 0
    while time.monotonic() - started < timeout:
        if worker.process.poll() is not None:
            break
        try:
            done = answered(worker)
            rss, peak = resident_bytes(pid)
            anonymous = max(anonymous, group.anonymous_bytes)
        except (OSError, KeyError):  # it died between two looks
            continue
        if done >= next_sample:
            samples.append([done, round(rss / MIB, 1), round(time.monotonic() - started, 1)])
            next_sample = int(done // SAMPLE_EVERY + 1) * SAMPLE_EVERY
        if done >= total:
            break
        time.sleep(0.2)
    killed = worker.process.poll() is not None
    return {
        "answered": int(done),
        "samples (answered, rss MiB, s)": samples,
        "peak rss MiB": round(peak / MIB, 1),
        "group peak MiB": round(group.peak_bytes / MIB, 1),
        "group anonymous peak MiB": round(anonymous / MIB, 1),
        "killed for memory": killed and group.oom_kills > 0,
        "seconds": round(time.monotonic() - started, 1),
    }


def measure(command: list[str], args: argparse.Namespace) -> dict[str, object]:
    figures: dict[str, object] = {}
    with bench_environment() as environment:
        environment.add_engines(2)
        limit = args.limit_mib * MIB
        flood_group = MemoryGroup(limit).create()
        replay_group = MemoryGroup(limit).create()
        workers: list[WorkerProcess] = []
        try:
            worker = run_worker(environment, "flood", command, flood_group, 0)
            workers.append(worker)
            figures["rss before the flood MiB"] = rss_mib(worker)
            registry = environment.registry.address
            with Publisher(environment.amqp_url) as publisher:
                began = time.monotonic()
                for index in range(args.images):
                    publisher.request(f"{registry}/missing/m{index}-{uuid.uuid4().hex[:6]}:1")
                figures["published in s"] = round(time.monotonic() - began, 1)
            figures["live flood"] = follow(worker, flood_group, args.images, args.timeout)
            if not args.no_replay:
                # A node that joins now (or this one, restarted with no saved place) replays
                # every one of those requests from the history.
                replayer = run_worker(environment, "replay", command, replay_group, 1)
                workers.append(replayer)
                figures["rss when the replay starts MiB"] = rss_mib(replayer)
                figures["replay"] = follow(replayer, replay_group, args.images, args.timeout)
        finally:
            stop_all([w.process for w in workers])
            flood_group.remove()
            replay_group.remove()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--limit-mib", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=900.0, help="per phase, seconds")
    parser.add_argument("--baseline", default=BASELINE, help="a revision; '' for none")
    parser.add_argument("--no-replay", action="store_true")
    args = parser.parse_args(argv)
    figures: dict[str, dict[str, object]] = {}
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="pb-flood-") as source:
            print(f"baseline: the worker of {args.baseline}", flush=True)
            figures[f"baseline {args.baseline}"] = measure(
                worker_from(args.baseline, Path(source)), args
            )
    print("this tree's worker", flush=True)
    figures["this tree"] = measure(worker_command(), args)
    rows = []
    for name, row in figures.items():
        for phase, before in (
            ("live flood", "rss before the flood MiB"),
            ("replay", "rss when the replay starts MiB"),
        ):
            result = row.get(phase)
            if not isinstance(result, dict):
                continue
            samples = result["samples (answered, rss MiB, s)"]
            rows.append(
                [
                    name,
                    phase,
                    result["answered"],
                    row[before],
                    samples[-1][1] if samples else "-",
                    result["peak rss MiB"],
                    result["group peak MiB"],
                    result["group anonymous peak MiB"],
                    result["killed for memory"],
                    result["seconds"],
                ]
            )
    print_table(
        f"{args.images} distinct missing images, worker limited to {args.limit_mib} MiB "
        f"(goal: peak under {args.limit_mib // 2} MiB, never killed)",
        [
            "worker",
            "phase",
            "answered",
            "rss before MiB",
            "rss last MiB",
            "peak rss MiB",
            "group peak MiB",
            "group anon peak MiB",
            "killed",
            "seconds",
        ],
        rows,
    )
    print(f"\nfigures saved to {save('missing_flood', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
