"""Pull onto K nodes: how fast an image of about 100 MB lands on every node.

puller (publish once, wait for all K) against the floor (the same pull started on all K
engines at once through the Engine API, as ``docker pull`` does) and the naive way (one
node after another). Before every measured pull the image is removed from every engine,
so each one downloads it whole from the local registry.

    .venv/bin/python -m bench.pull_onto_nodes [--nodes 3,5] [--size-mb 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable

import docker

from bench.common import BenchEnvironment, bench_environment, print_table, save, stop_all
from localcluster.engines import NodeEngine
from publisher import Publisher

LAYERS = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,5")
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(k) for k in args.nodes.split(",")]
    layer = int(args.size_mb * 1_000_000 / LAYERS)
    figures: dict[str, dict[str, float]] = {}
    with bench_environment() as environment:
        image = environment.registry.push_sized("bench/big", "1", [layer] * LAYERS)
        environment.add_engines(max(sizes))
        for k in sizes:
            engines = environment.engines[:k]
            figures[str(k)] = measure(environment, engines, image, args.repeats)
    rows = [
        [k, f["floor"], f["puller"], f["naive"], f["puller"] / f["floor"], f["naive"] / f["floor"]]
        for k, f in figures.items()
    ]
    print_table(
        f"pull of {args.size_mb:g} MB ({LAYERS} layers) onto K nodes: median of "
        f"{args.repeats}, seconds (goal: puller <= 1.1x floor)",
        ["K", "floor", "puller", "naive", "puller/floor", "naive/floor"],
        rows,
    )
    print(f"\nfigures saved to {save('pull_onto_nodes', {'size_mb': args.size_mb, 's': figures})}")
    return 0


def measure(
    environment: BenchEnvironment, engines: list[NodeEngine], image: str, repeats: int
) -> dict[str, float]:
    clients = [engine.client(timeout=600) for engine in engines]
    # worker i runs against engine i: the first K engines, one worker each
    workers = environment.start_workers(len(engines), prefix=f"k{len(engines)}")
    try:
        with Publisher(environment.amqp_url) as publisher:

            def by_puller() -> None:
                report = publisher.pull(image, expect=len(engines), timeout=600)
                if not report.ok:
                    raise RuntimeError(f"puller failed: {report}")

            def at_once() -> None:
                threads = [threading.Thread(target=c.images.pull, args=(image,)) for c in clients]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

            def one_by_one() -> None:
                for client in clients:
                    client.images.pull(image)

            methods: dict[str, Callable[[], None]] = {
                "floor": at_once,
                "puller": by_puller,
                "naive": one_by_one,
            }
            samples: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(repeats):  # interleaved, so drift hits every method alike
                for name, method in methods.items():
                    remove_everywhere(clients, image)
                    started = time.perf_counter()
                    method()
                    samples[name].append(time.perf_counter() - started)
            return {name: statistics.median(times) for name, times in samples.items()}
    finally:
        stop_all([w.process for w in workers])
        for client in clients:
            client.close()


def remove_everywhere(clients: list[docker.DockerClient], image: str) -> None:
    for client in clients:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(image, force=True)


if __name__ == "__main__":
    sys.exit(main())
