"""A slow uplink on loopback: a TCP proxy whose connections, all together, share one rate.

cyber-dojo's short-lived servers often reach their registry over a slow link that every
node shares. :class:`Uplink` stands for that link in tests and benchmarks: it forwards
``127.0.0.1:port`` to a target (a registry), and every byte it forwards, either way and
over all connections, takes tokens from one bucket refilled at ``rate`` bytes a second.
It counts what crossed, so a benchmark can say how many times an image went over it.

Beside it, the two pull-through caches a worker can pull through (``PULLER_PULL_THROUGH_CACHES``,
see :mod:`worker.stores.pull_through`): Debian's ``docker-registry`` in proxy mode
(:class:`ProxyRegistry`) and puller's own blob cache (:class:`BlobCacheProcess`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from localcluster.cluster import installed_command
from localcluster.processes import LocalService, free_port, start_daemon, wait_until

CHUNK = 64 * 1024


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; :meth:`take` blocks until its
    tokens are there. Shared by every thread that calls it: together they never go faster
    than ``rate`` (beyond the first ``burst``)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(CHUNK, rate / 20))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, amount: int, closed: threading.Event | None = None) -> None:
        """Waits until ``amount`` tokens can be taken, and takes them. A request larger than
        the bucket goes into debt, so the next callers wait for it instead."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= min(amount, self.burst):
                    self._tokens -= amount
                    return
                wait = (min(amount, self.burst) - self._tokens) / self.rate
            if closed is not None and closed.wait(wait):
                return
            if closed is None:
                time.sleep(wait)


class Uplink:
    """Forwards connections on ``127.0.0.1:port`` to ``target`` (``host``, ``port``), at
    most ``rate`` bytes a second for all of them together, both directions counted.

    ``bytes_down``: target to clients (what a pull downloads); ``bytes_up``: the other way.
    """

    def __init__(self, target: tuple[str, int], rate: float, port: int = 0) -> None:
        self.target = target
        self.bucket = TokenBucket(rate)
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = threading.Event()
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self._accepter = threading.Thread(target=self._accept, name="uplink-accept", daemon=True)
        self._accepter.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def bytes_total(self) -> int:
        with self._lock:
            return self.bytes_down + self.bytes_up

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_down = 0
            self.bytes_up = 0
            self.connections = 0

    def close(self) -> None:
        """Stops listening and cuts every connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept; close alone does not
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._accepter.join(timeout=5)

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._sockets.update((client, upstream))
                self.connections += 1
            for source, sink, down in ((upstream, client, True), (client, upstream, False)):
                threading.Thread(
                    target=self._pump,
                    args=(pair, source, sink, down),
                    name="uplink-pump",
                    daemon=True,
                ).start()

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket, down: bool) -> None:
        try:
            while not self._closed.is_set():
                data = source.recv(CHUNK)
                if not data:
                    break
                self.bucket.take(len(data), self._closed)
                # Counted before it is sent: a client that has its last byte may look at
                # once, and must not find it uncounted.
                with self._lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)  # half-close: the other direction may go on
            if pair.one_ended():
                with self._lock:
                    self._sockets.difference_update(pair.sockets)
                pair.close()


class _Pair:
    """A client's connection and its connection to the target; closed once both directions
    have ended."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self._ended = 0
        self._lock = threading.Lock()

    def one_ended(self) -> bool:
        """Counts a direction that ended; true for the second."""
        with self._lock:
            self._ended += 1
            return self._ended == 2

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


@dataclass
class ProxyRegistry(LocalService):
    """Debian's ``docker-registry`` in proxy mode (a pull-through cache) for one upstream,
    ``remote_url``, on 127.0.0.1 (plain HTTP: engines trust 127.0.0.0/8 registries)."""

    root: Path
    remote_url: str
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 30.0) -> None:
        self.port = self.port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "version": 0.1,
                    "log": {"level": "warn"},
                    "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
                    "http": {"addr": self.address},
                    "proxy": {"remoteurl": self.remote_url},
                }
            )
        )
        log_path = self.root / "registry.log"
        self.process = start_daemon(["docker-registry", "serve", str(config)], log_path)
        wait_until(self._answers, "docker-registry (proxy)", timeout, self.process, log_path)

    def _answers(self) -> bool:
        return requests.get(f"{self.url}/v2/", timeout=2).status_code == 200


@dataclass
class BlobCacheProcess(LocalService):
    """puller's own pull-through blob cache (``puller-blob-cache``, see docs/blob-cache.md)
    for one upstream, ``remote_url``, on 127.0.0.1, keeping blobs in ``data_dir`` (default
    ``root/data``). ``extra_args``: more flags (``--max-bytes``, ``--idle-timeout``...).
    ``command``: the program to run (default: the installed ``puller-blob-cache``)."""

    root: Path
    remote_url: str
    port: int = 0
    extra_args: tuple[str, ...] = ()
    data_dir: Path | None = None
    command: list[str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.root / "blob-cache.log"

    def start(self, timeout: float = 30.0) -> None:
        self.port = self.port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        data = self.data_dir or self.root / "data"
        argv = self.command or installed_command("puller-blob-cache", "blob_cache.main")
        argv = [*argv]
        argv += ["--upstream", self.remote_url, "--listen", self.address, "--dir", str(data)]
        argv += [*self.extra_args, "--log-format", "json"]
        self.process = start_daemon(argv, self.log_path)
        wait_until(self._answers, "blob cache", timeout, self.process, self.log_path)

    def _answers(self) -> bool:
        return requests.get(f"{self.url}/alive", timeout=2).status_code == 200
