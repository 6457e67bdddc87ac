"""Many slow HTTP clients at once, from one thread: non-blocking sockets opened in bulk, each
holding a request it has begun and never finishes (a slowloris attack), and timed probes
of the server meanwhile."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from localcluster.cgroup import MIB, MemoryGroup

PARTIAL_REQUEST = b"GET /alive HTTP/1.1\r\nHost: slow\r\nX-Slow: "
"""A request's head, cut off: the server waits for the rest."""
BEGUN = {
    "trickle": PARTIAL_REQUEST,
    # as much of a head as a server takes without counting it (4 KB)
    "4 KB head": PARTIAL_REQUEST + b"h" * (4000 - len(PARTIAL_REQUEST)),
    # a body of 64 KB announced, 60 KB of it sent
    "60 KB body": b"POST /alive HTTP/1.1\r\nHost: slow\r\nContent-Length: 65536\r\n\r\n"
    + b"b" * 60_000,
}
"""What each slow connection sends before it stops, by name."""


class SlowClientsFailed(RuntimeError):
    """The slow connections could not all be opened (the server refused or died)."""


class SlowClients:
    """``count`` connections to ``127.0.0.1:port``, each with a request begun: ``begun``."""

    def __init__(self, port: int, count: int, begun: bytes = PARTIAL_REQUEST) -> None:
        self.port = port
        self.count = count
        self.begun = begun
        self.sockets: list[socket.socket] = []

    def open(self, timeout: float = 120.0) -> float:
        """Connects them all (connections the server's backlog holds count as connected),
        sends each its partial request; returns the seconds it took."""
        started = time.monotonic()
        selector = selectors.DefaultSelector()
        try:
            for _ in range(self.count):
                client = socket.socket()
                client.setblocking(False)
                self.sockets.append(client)
                code = client.connect_ex(("127.0.0.1", self.port))
                if code not in (0, errno.EINPROGRESS):
                    raise SlowClientsFailed(f"connect: {errno.errorcode.get(code, code)}")
                selector.register(client, selectors.EVENT_WRITE)
            pending = len(self.sockets)
            while pending:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise SlowClientsFailed(f"{pending} of {self.count} not connected in time")
                for key, _ in selector.select(remaining):
                    connected = cast(socket.socket, key.fileobj)
                    selector.unregister(connected)
                    pending -= 1
                    code = connected.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise SlowClientsFailed(f"connect: {errno.errorcode.get(code, code)}")
                    connected.setblocking(True)
                    connected.settimeout(10)
                    with contextlib.suppress(OSError):  # refused: the server answered
                        connected.sendall(self.begun)
                    connected.setblocking(False)
        finally:
            selector.close()
        return time.monotonic() - started

    def trickle(self) -> int:
        """One more byte of the head on each connection; returns how many took it."""
        sent = 0
        for client in self.sockets:
            try:
                sent += client.send(b"x")
            except OSError:
                continue
        return sent

    def trickle_steadily(self, period: float, stop: threading.Event) -> None:
        """One byte on each connection every ``period`` seconds, spread evenly, until
        ``stop`` is set."""
        gap = period / max(1, len(self.sockets))
        due = time.monotonic()
        index = 0
        while not stop.is_set():
            with contextlib.suppress(OSError):
                self.sockets[index % len(self.sockets)].send(b"x")
            index += 1
            due += gap
            if (wait := due - time.monotonic()) > 0:
                stop.wait(wait)

    def still_open(self) -> int:
        """Connections the server has neither answered nor closed."""
        waiting = 0
        for client in self.sockets:
            try:
                client.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                waiting += 1
            except OSError:
                continue
        return waiting

    def close(self) -> None:
        """Closes them all at once."""
        for client in self.sockets:
            client.close()
        self.sockets.clear()


@dataclass(frozen=True)
class Probe:
    path: str
    status: int | None
    """``None``: no answer within the timeout, or the connection failed."""
    seconds: float


def probe(port: int, path: str, timeout: float = 30.0) -> Probe:
    """``GET path`` on a new connection, as a kubelet probe makes it, timed."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        status: int | None = response.status
    except (OSError, http.client.HTTPException):
        status = None
    finally:
        connection.close()
    return Probe(path, status, time.monotonic() - started)


def connections_held(pid: int, port: int) -> int:
    """Connections to ``port`` the process has accepted (those in the kernel's backlog
    are not yet its own). Raises ``OSError`` once the process is gone."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "01" and int(local.rpartition(":")[2], 16) == port and inode in inodes:
            held += 1
    return held


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float | None:
    """The process's resident memory; ``None`` once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None  # a zombie: its memory is freed


@dataclass
class Siege:
    """What ``count`` slow clients did to the server process ``pid`` (see :func:`siege`)."""

    count: int
    opened_seconds: float = 0.0
    accepted_seconds: float | None = None
    """From the first connection until the server had taken every one (holding it, or
    answered and closed it); ``None``: it never did."""
    rss_idle: float | None = None
    rss_open: float | None = None
    rss_after: float | None = None
    group_idle: float | None = None
    group_open: float | None = None
    group_peak: float | None = None
    oom_kills: int = 0
    held_at_end: int = 0
    """Slow connections the server still held (neither answered nor closed) before they
    were closed: all of them, or the test proved nothing."""
    while_open: list[Probe] = field(default_factory=list)
    after_trickle: list[Probe] = field(default_factory=list)
    while_trickling: list[Probe] = field(default_factory=list)
    trickling_cpu: float | None = None
    """The server's CPU while every connection sent a byte a period, % of one core."""
    after_close: list[Probe] = field(default_factory=list)
    error: str = ""

    @property
    def probes(self) -> list[Probe]:
        return self.while_open + self.after_trickle + self.while_trickling + self.after_close

    @property
    def slowest(self) -> float:
        return max((p.seconds for p in self.probes), default=0.0)

    @property
    def unanswered(self) -> list[Probe]:
        return [p for p in self.probes if p.status != 200]

    def per_connection_kib(self, idle: float | None, loaded: float | None) -> float | None:
        if idle is None or loaded is None:
            return None
        return (loaded - idle) * 1024 / self.count


def siege(
    port: int,
    pid: int,
    count: int,
    paths: Sequence[str],
    group: MemoryGroup | None = None,
    rounds: int = 3,
    begun: bytes = PARTIAL_REQUEST,
    trickle_for: float = 0.0,
    trickle_period: float = 20.0,
) -> Siege:
    """Opens ``count`` slow connections to the server (process ``pid``) at once, waits until
    it holds them all, then probes each of ``paths`` ``rounds`` times; sends one more byte
    on every connection and probes again; closes them all at once and probes at once and
    for ``rounds`` more rounds. Memory is read from ``/proc`` and from ``group``. Each
    connection sends ``begun`` first (see :data:`BEGUN`). With ``trickle_for``, every
    connection then sends a byte each ``trickle_period`` seconds for that long, while the
    server's CPU is measured and it is probed twice a second."""
    report = Siege(count)
    report.rss_idle = rss_mib(pid)
    report.group_idle = group.usage_bytes / MIB if group else None
    clients = SlowClients(port, count, begun)
    try:
        started = time.monotonic()
        report.opened_seconds = clients.open()
        report.accepted_seconds = _until_taken(clients, pid, started)
        report.rss_open = rss_mib(pid)
        report.group_open = group.usage_bytes / MIB if group else None
        report.while_open = _rounds(port, paths, rounds)
        clients.trickle()
        report.after_trickle = _rounds(port, paths, 1)
        if trickle_for:
            stop = threading.Event()
            trickler = threading.Thread(
                target=clients.trickle_steadily, args=(trickle_period, stop)
            )
            began, cpu_before = time.monotonic(), cpu_seconds(pid)
            trickler.start()
            try:
                while time.monotonic() - began < trickle_for:
                    report.while_trickling += _rounds(port, paths, 1)
                    stop.wait(0.5)
            finally:
                stop.set()
                trickler.join()
            report.trickling_cpu = (
                100 * (cpu_seconds(pid) - cpu_before) / (time.monotonic() - began)
            )
        report.held_at_end = clients.still_open()
    except (SlowClientsFailed, OSError) as error:
        report.error = f"{type(error).__name__}: {error}"
    finally:
        clients.close()
    report.after_close = _rounds(port, paths, rounds + 1)
    report.rss_after = rss_mib(pid)
    if group is not None:
        report.group_peak = group.max_usage_bytes / MIB
        report.oom_kills = group.oom_kills
    return report


def _until_taken(
    clients: SlowClients, pid: int, started: float, timeout: float = 60.0
) -> float | None:
    """Waits until the server holds every connection it has not answered (those in its
    backlog are waiting, but not yet its own)."""
    while True:
        try:
            if connections_held(pid, clients.port) >= clients.still_open():
                return time.monotonic() - started
        except OSError:
            return None  # the process is gone
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.05)


def _rounds(port: int, paths: Sequence[str], rounds: int) -> list[Probe]:
    return [probe(port, path) for _ in range(rounds) for path in paths]
