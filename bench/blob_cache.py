"""K clients fetch one blob at once through a slow uplink, some of them reading slowly
(until the others are done): bytes across the uplink, seconds until the fast clients have
it, and the peak memory (RSS) of the cache process, with no cache (``direct``), with
Debian's ``docker-registry`` in proxy mode (``registry-proxy``) and with
``puller-blob-cache`` (``blob-cache``), in the same run. No Docker Engine: raw HTTP
clients, so K can be large.

    .venv/bin/python -m bench.blob_cache [--clients 20] [--slow 5] [--size-mb 100] [--rate-mb 50]
        [--modes direct,registry-proxy,blob-cache] [--bin DIR]

``--bin``: a directory holding ``puller-blob-cache`` (another version); by default this
checkout's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.common import print_table, save
from localcluster.registry import Registry
from localcluster.uplink import BlobCacheProcess, ProxyRegistry, Uplink

MODES = ("direct", "registry-proxy", "blob-cache")
SLOW_RATE = 1_000_000
"""Bytes a second a slow client reads."""


@dataclass
class Figure:
    fast_seconds: float
    uplink_bytes: int
    peak_rss_mb: float | None
    whole: int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--slow", type=int, default=5, help="of them, reading 1 MB/s")
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--rate-mb", type=float, default=50.0, help="uplink, MB/s")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--bin", type=Path, help="where puller-blob-cache is")
    args = parser.parse_args(argv)
    size = int(args.size_mb * 1_000_000)
    figures: dict[str, Figure] = {}
    with tempfile.TemporaryDirectory(prefix="bench-blob-cache-") as scratch:
        root = Path(scratch)
        registry = Registry(root / "registry")
        registry.start()
        try:
            with Uplink(("127.0.0.1", registry.port), args.rate_mb * 1_000_000) as link:
                for mode in args.modes.split(","):
                    blob = os.urandom(size)  # a new blob each way: nothing kept from before
                    digest = registry.push_blob("bench/blob", blob)
                    figures[mode] = measure(root / mode, link, mode, digest, blob, args)
                    f = figures[mode]
                    print(
                        f"{mode}: {f.fast_seconds:.2f} s, {f.uplink_bytes:,} bytes, "
                        f"peak RSS {f.peak_rss_mb} MB",
                        flush=True,
                    )
        finally:
            registry.remove()
    rows = [
        [
            mode,
            f.fast_seconds,
            f"{f.uplink_bytes / 1e6:.1f}",
            f"{f.uplink_bytes / size:.2f}",
            "-" if f.peak_rss_mb is None else f"{f.peak_rss_mb:.0f}",
            f"{f.whole}/{args.clients - args.slow}",
        ]
        for mode, f in figures.items()
    ]
    print_table(
        f"one {args.size_mb:g} MB blob to {args.clients} clients at once ({args.slow} reading "
        f"1 MB/s) over a {args.rate_mb:g} MB/s uplink",
        ["way", "fast clients done, s", "uplink MB", "x blob", "cache peak RSS MB", "fast whole"],
        rows,
    )
    saved = {
        "args": {**vars(args), "bin": str(args.bin)},
        "runs": {mode: vars(f) for mode, f in figures.items()},
    }
    print(f"\nfigures saved to {save('blob_cache', saved)}")
    return 0


def measure(
    root: Path, link: Uplink, mode: str, digest: str, blob: bytes, args: argparse.Namespace
) -> Figure:
    cache: BlobCacheProcess | ProxyRegistry | None = None
    if mode == "blob-cache":
        command = [str(args.bin / "puller-blob-cache")] if args.bin else None
        cache = BlobCacheProcess(root, link.url, command=command)
    elif mode == "registry-proxy":
        cache = ProxyRegistry(root, link.url)
    base = link.url
    if cache is not None:
        cache.start()
        base = f"http://{cache.address}"
    peak: list[float] = []
    watching = threading.Event()
    if cache is not None and cache.process is not None:
        pid = cache.process.pid
        threading.Thread(target=_watch_rss, args=(pid, peak, watching), daemon=True).start()
    expected = hashlib.sha256(blob).hexdigest()
    url = f"{base}/v2/bench/blob/blobs/{digest}"
    run = _Run(url, expected, time.perf_counter())
    try:
        link.reset_counters()
        slow = [threading.Thread(target=run.fetch, args=(True,)) for _ in range(args.slow)]
        fast = [
            threading.Thread(target=run.fetch, args=(False,))
            for _ in range(args.clients - args.slow)
        ]
        for client in slow + fast:
            client.start()
        for client in fast:
            client.join()
        run.fast_finished.set()
        for client in slow:
            client.join()
        crossed = link.bytes_total
    finally:
        watching.set()
        if cache is not None:
            cache.remove()
    return Figure(
        fast_seconds=round(max(run.fast_done, default=0.0), 2),
        uplink_bytes=crossed,
        peak_rss_mb=round(max(peak), 1) if peak else None,
        whole=sum(run.whole),
    )


class _Run:
    """The clients of one way: fast ones read as fast as they can; slow ones read 1 MB/s
    until the fast ones are done."""

    def __init__(self, url: str, expected: str, started: float) -> None:
        self.url = url
        self.expected = expected
        self.started = started
        self.fast_finished = threading.Event()
        self.whole: list[bool] = []
        self.fast_done: list[float] = []

    def fetch(self, slow: bool) -> None:
        hasher = hashlib.sha256()
        try:
            with requests.get(self.url, stream=True, timeout=600) as response:
                response.raise_for_status()
                for chunk in response.iter_content(64 * 1024):
                    hasher.update(chunk)
                    if slow:
                        if self.fast_finished.is_set():
                            return
                        time.sleep(len(chunk) / SLOW_RATE)
        except requests.RequestException as error:
            print(f"a client failed: {error}", file=sys.stderr)
            self.whole.append(False)
            return
        if not slow:
            self.whole.append(hasher.hexdigest() == self.expected)
            self.fast_done.append(time.perf_counter() - self.started)


def _watch_rss(pid: int, peak: list[float], done: threading.Event) -> None:
    """The process's peak resident memory (``VmHWM``), in MB, as it grows."""
    status = Path(f"/proc/{pid}/status")
    while not done.wait(0.2):
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak.append(int(line.split()[1]) / 1000)
        except OSError:
            return


if __name__ == "__main__":
    sys.exit(main())
