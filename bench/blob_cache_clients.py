"""Clients that ask ``puller-blob-cache`` for a blob and stop reading it, up to its
``--max-connections``, with the cache inside a cgroup v1 memory group (its pod's limit):
what the cache then holds in memory, and whether it still answers ``/alive``.

    .venv/bin/python -m bench.blob_cache_clients [--max-connections 512] [--clients N]
        [--limit-mib 512] [--size-mb 16] [--bin DIR] [--settle-seconds 3]

Two rounds, one cache each: ``kept`` (a blob the cache keeps, sent from its file) and
``fetched`` (a blob the cache is fetching, over a 8 MB/s uplink, which every client follows
as it is written: each is given up to the output buffer before its thread waits). Each
client's receive buffer is 4 KiB and it never reads. Printed per round: memory with the
cache idle, then with the clients holding their connections (resident, and as the memory
group counts it, page cache of the blob included), per client, the cache's open files, the
time ``/alive`` took, and OOM kills. ``--bin``: a directory holding ``puller-blob-cache``
(another version, in a virtualenv of its own); by default this checkout's, with its runtime
dependencies only. Needs root (cgroups) and an open-file limit above twice the clients.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from bench.common import print_table, runtime_command, save
from localcluster.cgroup import MIB, MemoryGroup
from localcluster.registry import Registry
from localcluster.uplink import BlobCacheProcess, Uplink
from serving.program import raise_open_file_limit

UPLINK_RATE = 8_000_000
"""Bytes a second from the registry to the cache: the fetched blob is still arriving when
the clients ask for it."""


@dataclass
class Round:
    kind: str
    clients: int
    rss_idle_mb: float
    group_idle_mb: float
    rss_open_mb: float
    group_open_mb: float
    group_peak_mb: float
    open_files: int
    alive_seconds: float | None
    """``None``: not answered within 10 s."""
    oom_kills: int

    @property
    def per_client_kib(self) -> str:
        rss = (self.rss_open_mb - self.rss_idle_mb) * 1e6 / 1024 / self.clients
        group = (self.group_open_mb - self.group_idle_mb) * 1e6 / 1024 / self.clients
        return f"{rss:.0f} / {group:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--clients", type=int, help="default: --max-connections")
    parser.add_argument("--limit-mib", type=int, default=512, help="the memory group's limit")
    parser.add_argument("--size-mb", type=float, default=16.0)
    parser.add_argument("--bin", type=Path, help="where puller-blob-cache is")
    parser.add_argument(
        "--settle-seconds", type=float, default=3.0, help="memory steady this long: measured"
    )
    args = parser.parse_args(argv)
    clients = args.clients or args.max_connections
    if raise_open_file_limit() < 2 * clients + 100:
        print("the open-file limit is below twice the clients", file=sys.stderr)
        return 2
    program = (
        [str(args.bin / "puller-blob-cache")] if args.bin else runtime_command("puller-blob-cache")
    )
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-blob-cache-clients-") as scratch:
        root = Path(scratch)
        registry = Registry(root / "registry")
        registry.start()
        try:
            with Uplink(("127.0.0.1", registry.port), UPLINK_RATE) as link:
                for kind in ("kept", "fetched"):
                    blob = os.urandom(int(args.size_mb * 1_000_000))
                    digest = registry.push_blob("bench/clients", blob)
                    with MemoryGroup(args.limit_mib * MIB) as group:
                        cache = BlobCacheProcess(
                            root / kind,
                            link.url,
                            extra_args=("--max-connections", str(args.max_connections)),
                            command=group.command(program),
                        )
                        cache.start()
                        try:
                            rounds.append(
                                measure(kind, cache, group, digest, clients, args.settle_seconds)
                            )
                        finally:
                            cache.remove()
        finally:
            registry.remove()
    print_table(
        f"{clients} clients that stop reading a {args.size_mb:g} MB blob, puller-blob-cache "
        f"--max-connections {args.max_connections} in {args.limit_mib} MiB",
        [
            "blob",
            "clients",
            "RSS idle MB",
            "group idle MB",
            "RSS open MB",
            "group open MB",
            "group peak MB",
            "per client KiB (RSS / group)",
            "open files",
            "/alive s",
            "OOM kills",
        ],
        [
            [
                r.kind,
                r.clients,
                r.rss_idle_mb,
                r.group_idle_mb,
                r.rss_open_mb,
                r.group_open_mb,
                r.group_peak_mb,
                r.per_client_kib,
                r.open_files,
                "unanswered" if r.alive_seconds is None else round(r.alive_seconds, 3),
                r.oom_kills,
            ]
            for r in rounds
        ],
    )
    saved = {"args": {**vars(args), "bin": str(args.bin)}, "rounds": [asdict(r) for r in rounds]}
    print(f"\nfigures saved to {save('blob_cache_clients', saved)}")
    return 0


def measure(
    kind: str,
    cache: BlobCacheProcess,
    group: MemoryGroup,
    digest: str,
    clients: int,
    settle_seconds: float,
) -> Round:
    if cache.process is None:
        raise RuntimeError("the cache is not running")
    pid = cache.process.pid
    path = f"/v2/bench/clients/blobs/{digest}"
    url = f"{cache.url}{path}"
    if kind == "kept":
        requests.get(url, timeout=120).raise_for_status()  # fetched once, kept from now on
    rss_idle, group_idle = _rss_mb(pid), group.usage_bytes / 1e6
    readers = []
    try:
        for _ in range(clients):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", cache.port))
            reader.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            readers.append(reader)
        _settle(group, settle_seconds)
        alive = _alive_seconds(cache.url)
        return Round(
            kind=kind,
            clients=clients,
            rss_idle_mb=round(rss_idle, 1),
            group_idle_mb=round(group_idle, 1),
            rss_open_mb=round(_rss_mb(pid), 1),
            group_open_mb=round(group.usage_bytes / 1e6, 1),
            group_peak_mb=round(group.max_usage_bytes / 1e6, 1),
            open_files=len(os.listdir(f"/proc/{pid}/fd")),
            alive_seconds=alive,
            oom_kills=group.oom_kills,
        )
    finally:
        for reader in readers:
            reader.close()


def _settle(group: MemoryGroup, quiet: float = 3.0, longest: float = 60.0) -> None:
    """Until the group's memory has grown by less than 1 MB in ``quiet`` seconds."""
    began = time.monotonic()
    last, since = group.usage_bytes, time.monotonic()
    while time.monotonic() - began < longest:
        time.sleep(0.5)
        now = group.usage_bytes
        if now - last > 1_000_000:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def _alive_seconds(base: str) -> float | None:
    started = time.monotonic()
    try:
        requests.get(f"{base}/alive", timeout=10).raise_for_status()
    except requests.RequestException:
        return None
    return time.monotonic() - started


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
