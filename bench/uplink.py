"""K nodes, one slow uplink: how long until every node has the image, and how many bytes
crossed the uplink, pulling directly (as without a cache) and through a pull-through cache.

The registry sits behind :class:`localcluster.uplink.Uplink` (one rate for all connections
together, bytes counted both ways). Each node is a real Docker Engine with a real
``puller-worker``; the image is asked for once with ``Publisher.pull``. Three ways, in the
same run, each from empty engines and an empty cache:

- ``direct``: no cache (``PULLER_PULL_THROUGH_CACHES`` unset);
- ``registry-proxy``: Debian's ``docker-registry`` in proxy mode;
- ``blob-cache``: puller's own cache (``puller-blob-cache``, docs/blob-cache.md).

    .venv/bin/python -m bench.uplink [--nodes 1,3,5] [--size-mb 200] [--rate-mb 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import docker
import requests

from bench.common import BenchEnvironment, bench_environment, print_table, save, stop_all
from contract import parse_reference
from localcluster.registry import MANIFEST_V2
from localcluster.uplink import BlobCacheProcess, ProxyRegistry, Uplink
from publisher import Publisher

LAYERS = 4
MODES = ("direct", "registry-proxy", "blob-cache")


class Cache(Protocol):
    @property
    def address(self) -> str: ...

    def start(self, timeout: float = 30.0) -> None: ...

    def remove(self) -> None: ...


@dataclass
class Figure:
    seconds: float
    uplink_bytes: int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,3,5")
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--rate-mb", type=float, default=20.0, help="uplink, MB/s")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    sizes = [int(k) for k in args.nodes.split(",")]
    modes = args.modes.split(",")
    layer = int(args.size_mb * 1_000_000 / LAYERS)
    figures: dict[str, dict[int, Figure]] = {mode: {} for mode in modes}
    with bench_environment() as environment:
        environment.registry.push_sized("bench/big", "1", [layer] * LAYERS)
        digest = environment.registry.manifest_digest("bench/big", "1")
        image_bytes = _image_bytes(environment, digest)
        with Uplink(("127.0.0.1", environment.registry.port), args.rate_mb * 1_000_000) as link:
            environment.add_engines(max(sizes))
            for k in sizes:  # the ways interleaved for each K, so drift hits them alike
                for mode in modes:
                    # A tag of its own: new workers replay the history's earlier requests.
                    tag = f"{mode}-{k}"
                    _tag(environment, digest, tag)
                    image = f"{link.address}/bench/big:{tag}"
                    figures[mode][k] = measure(environment, link, image, digest, mode, k)
                    f = figures[mode][k]
                    print(f"{mode} K={k}: {f.seconds:.2f} s, {f.uplink_bytes:,} bytes", flush=True)
    base = figures["direct"][1].seconds if 1 in figures.get("direct", {}) else None
    rows = []
    for mode in modes:
        for k, f in figures[mode].items():
            rows.append(
                [
                    mode,
                    k,
                    f.seconds,
                    f"{f.uplink_bytes / 1e6:.1f}",
                    f.uplink_bytes / image_bytes,
                    "-" if base is None else f"{f.seconds / base:.2f}",
                ]
            )
    print_table(
        f"{image_bytes / 1e6:.0f} MB image ({LAYERS} random layers) onto K engines over a "
        f"{args.rate_mb:g} MB/s uplink (goal at K=5: uplink <= 1.1x image, time <= 1.3x "
        "direct K=1)",
        ["way", "K", "seconds", "uplink MB", "x image", "x direct K=1"],
        rows,
    )
    saved = {
        "size_mb": args.size_mb,
        "rate_mb": args.rate_mb,
        "image_bytes": image_bytes,
        "runs": {m: {str(k): vars(f) for k, f in by_k.items()} for m, by_k in figures.items()},
    }
    print(f"\nfigures saved to {save('uplink', saved)}")
    return 0


def measure(
    environment: BenchEnvironment, link: Uplink, image: str, digest: str, mode: str, k: int
) -> Figure:
    """One pull of ``image`` onto the first ``k`` engines, the ``mode`` way, from empty
    engines and an empty cache; checks each engine has it under its name and digest."""
    engines = environment.engines[:k]
    clients = [engine.client(timeout=600) for engine in engines]
    for client in clients:
        _remove_all_images(client)
    cache = _cache(environment, link, mode, k)
    env: dict[str, Any] = {}
    if cache is not None:
        env["PULLER_PULL_THROUGH_CACHES"] = f"{link.address}={cache.address}"
    workers = environment.start_workers(k, prefix=f"{mode}-k{k}", **env)
    try:
        # Caught up now: the history's earlier requests (the same image under other tags)
        # were replayed. Empty the engines and the cache again before measuring.
        for client in clients:
            _remove_all_images(client)
        if cache is not None:
            cache.remove()
            cache.start()  # the same port, an empty directory
        with Publisher(environment.amqp_url) as publisher:
            link.reset_counters()
            started = time.perf_counter()
            report = publisher.pull(image, expect=k, timeout=900)
            seconds = time.perf_counter() - started
            crossed = link.bytes_total
        if not report.ok:
            raise RuntimeError(f"{mode} K={k} failed: {report}")
        asked = parse_reference(image)
        for client in clients:
            repo_digests = client.api.inspect_image(image)["RepoDigests"]
            if f"{asked.repository}@{digest}" not in repo_digests:
                raise RuntimeError(f"{mode} K={k}: unexpected repo digests {repo_digests}")
        return Figure(round(seconds, 2), crossed)
    finally:
        stop_all([w.process for w in workers])
        for client in clients:
            client.close()
        if cache is not None:
            cache.remove()


def _cache(environment: BenchEnvironment, link: Uplink, mode: str, k: int) -> Cache | None:
    root = environment.root / f"cache-{mode}-{k}"
    makers: dict[str, Callable[[], Cache]] = {
        "registry-proxy": lambda: ProxyRegistry(root, link.url),
        "blob-cache": lambda: BlobCacheProcess(root, link.url),
    }
    if mode == "direct":
        return None
    cache = makers[mode]()
    cache.start()
    return cache


def _remove_all_images(client: docker.DockerClient) -> None:
    for found in client.images.list(all=True):
        with contextlib.suppress(docker.errors.NotFound):
            client.images.remove(found.id, force=True)


def _tag(environment: BenchEnvironment, digest: str, tag: str) -> None:
    """Gives the image (its manifest ``digest``) another tag in the registry."""
    url = f"{environment.registry.url}/v2/bench/big/manifests"
    manifest = requests.get(f"{url}/{digest}", headers={"Accept": MANIFEST_V2}, timeout=30)
    manifest.raise_for_status()
    put = requests.put(
        f"{url}/{tag}", data=manifest.content, headers={"Content-Type": MANIFEST_V2}, timeout=30
    )
    put.raise_for_status()


def _image_bytes(environment: BenchEnvironment, digest: str) -> int:
    """The compressed size of the image's manifest, config and layers, as pulled."""
    url = f"{environment.registry.url}/v2/bench/big/manifests/{digest}"
    manifest = requests.get(
        url,
        headers={"Accept": MANIFEST_V2},
        timeout=30,
    )
    manifest.raise_for_status()
    body = json.loads(manifest.content)
    blobs = [body["config"], *body["layers"]]
    return len(manifest.content) + sum(int(blob["size"]) for blob in blobs)


if __name__ == "__main__":
    sys.exit(main())
