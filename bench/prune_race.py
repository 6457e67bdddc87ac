"""A prune racing pulls: how often a node answers ``present`` or ``pulled`` for an image it
then removes. Baseline (the worker of another revision, ``--baseline``) and this tree's
worker in the same run, on the same real parts.

    .venv/bin/python -m bench.prune_race [--rounds 100] [--nodes 3] [--images 4]
                                         [--baseline 3ddced4]

Each round: ``--images`` fresh images are pulled onto every node and left unused for
``--unused-for`` seconds; then ``puller prune --unused-for`` that long and a pull of every
one of those images go out together (the pulls half the time at once, half the time once a
node has begun removing). A node that answered ``present`` or ``pulled`` and does not hold
the image once both are over lost it: the goal is none.
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.common import bench_environment, print_table, save, stop_all
from localcluster.prune_race import RoundResult, race_round
from publisher import Publisher

BASELINE = "3ddced4"
"""The last commit before a node's answers and its prunes were ordered (issue 24, break 7)."""


def worker_from(revision: str, target: Path) -> list[str]:
    """A command running the worker of ``revision`` (this repository's), from its own source."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", revision, "worker", "contract", "serving"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return [
        sys.executable,
        "-c",
        f"import sys, runpy; sys.path.insert(0, {str(target)!r}); "
        "runpy.run_module('worker.main', run_name='__main__')",
    ]


def measure(command: list[str] | None, args: argparse.Namespace) -> dict[str, object]:
    """Every round against workers run by ``command`` (this tree's when ``None``)."""
    chooser = random.Random(args.seed)  # noqa: S311 - the order of the interleavings
    rounds: list[RoundResult] = []
    with bench_environment() as environment:
        engines = environment.add_engines(args.nodes)
        workers = environment.start_workers(args.nodes, prefix="race", command=command)
        try:
            with Publisher(environment.amqp_url) as publisher:
                for number in range(args.rounds):
                    result = race_round(
                        publisher,
                        environment.registry,
                        {w.node: e for w, e in zip(workers, engines, strict=True)},
                        args.images,
                        args.unused_for,
                        after_first_removal=chooser.random() < 0.5,
                    )
                    rounds.append(result)
                    if result.lost:
                        print(f"  round {number + 1}: lost {list(result.lost)}", flush=True)
        finally:
            stop_all([w.process for w in workers])
    return {
        "rounds": len(rounds),
        "rounds_with_a_loss": sum(1 for r in rounds if r.lost),
        "answers_lost": sum(len(r.lost) for r in rounds),
        "answers": sum(r.answered for r in rounds),
        "pulled_again": sum(r.pulled_again for r in rounds),
        "removed": sum(r.removed for r in rounds),
        "kept_in_use": sum(r.kept_in_use for r in rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--unused-for", type=float, default=1.0)
    parser.add_argument("--baseline", default=BASELINE, help="a revision; '' for none")
    parser.add_argument("--seed", type=int, default=24)
    args = parser.parse_args(argv)
    figures: dict[str, dict[str, object]] = {}
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="pb-race-") as source:
            print(f"baseline: the worker of {args.baseline}", flush=True)
            figures[f"baseline {args.baseline}"] = measure(
                worker_from(args.baseline, Path(source)), args
            )
    print("this tree's worker", flush=True)
    figures["this tree"] = measure(None, args)
    header = ["worker", *next(iter(figures.values())).keys()]
    print_table(
        f"prune --unused-for {args.unused_for:g}s racing pulls of {args.images} images on "
        f"{args.nodes} nodes (goal: 0 answers lost)",
        header,
        [[name, *row.values()] for name, row in figures.items()],
    )
    print(f"\nfigures saved to {save('prune_race', figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
