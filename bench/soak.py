"""Churn soak: for a few minutes, at random, workers are killed (SIGKILL) and restarted, Docker
Engines restarted, broker nodes stopped and started, nodes added and removed, while a
session-like load requests distinct small images; then every engine is asked, through its own
API, which images it holds.

    .venv/bin/python -m bench.soak [--seed N] [--minutes 3] [--nodes 10] [--images 200]

Runs on a fresh 3-node RabbitMQ cluster (never this machine's own broker; see
localcluster/broker_cluster.py), with a registry, engines and workers of its own. Prints the
seed (the same seed replays the same schedule of faults), the timeline of faults as they
happened, and the result: the (request, node) pairs where a node there at the end lacks the
image (goal: 0), and the convergence time from publish to "on every node there at the end"
(p50, p99). Exits 1 when a pair is missing, a request could not be published or a fault could
not be applied (a target that did not come back). See localcluster/churn.py for the rules.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import print_table, save
from localcluster.broker_cluster import BrokerCluster
from localcluster.churn import SoakConfig, SoakResult, new_seed, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="replay a schedule (default: new)")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the churn lasts")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--window", type=float, default=180.0, help="seconds to wait for convergence after"
    )
    parser.add_argument("--mean-gap", type=float, default=4.0, help="mean seconds between faults")
    args = parser.parse_args(argv)
    seed = new_seed() if args.seed is None else args.seed
    print(
        f"seed {seed}  (replay: python -m bench.soak --seed {seed} --minutes {args.minutes:g}"
        f" --nodes {args.nodes} --images {args.images})"
    )
    sys.stdout.flush()
    config = SoakConfig(
        seed=seed,
        nodes=args.nodes,
        images=args.images,
        churn_seconds=args.minutes * 60,
        convergence_window=args.window,
        mean_gap=args.mean_gap,
    )
    root = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
    root.chmod(0o711)  # the broker nodes run as the rabbitmq user, who must pass through
    began = time.monotonic()
    result = None
    try:
        with BrokerCluster(root / "brokers") as brokers:
            print(f"3 broker nodes up in {brokers.timings['start']:.1f}s")
            result = run_soak(config, brokers, root / "nodes", echo=_echo)
    finally:
        if result is None or result.kept is None:  # a failed run keeps the nodes' logs
            shutil.rmtree(root, ignore_errors=True)
    print_table(
        f"schedule of seed {seed} ({len(result.schedule)} faults)",
        ["planned t s", "fault"],
        [[fault.at, fault.describe()] for fault in result.schedule],
    )
    print(f"\nresult ({time.monotonic() - began:.0f}s in all)")
    print(result.report())
    path = save("soak", _figures(result))
    print(f"\nfigures saved to {path}")
    failed = result.missing or result.unpublished or result.errors
    return 1 if failed else 0


def _echo(line: str) -> None:
    print(line)
    sys.stdout.flush()


def _figures(result: SoakResult) -> dict[str, object]:
    return {
        "seed": result.seed,
        "final_nodes": result.final_nodes,
        "added": result.added,
        "removed": result.removed,
        "requests": len(result.requests),
        "pairs": result.pairs,
        "missing": [{"image": image, "node": node} for image, node in result.missing],
        "convergence_p50_s": result.percentile(0.50),
        "convergence_p99_s": result.percentile(0.99),
        "churn_seconds": result.churn_seconds,
        "converged_after_s": result.converged_after,
        "publish_failures": result.publish_failures,
        "history_resent": result.history_resent,
        "history_unrouted": result.history_unrouted,
        "errors": result.errors,
        "schedule": [{**asdict(fault), "kind": fault.kind.value} for fault in result.schedule],
        "timeline": [asdict(entry) for entry in result.timeline],
    }


if __name__ == "__main__":
    sys.exit(main())
