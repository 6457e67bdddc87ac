"""waitress, configured for puller and stricter about where a request ends.

The one module that imports waitress. waitress documents ``serve``/``create_server`` and
their settings; the parser, channel and server classes subclassed here are not documented,
so each override is exercised by ``tests/unit/test_http_server.py`` (a waitress release
that changes them fails there) and the dependency is held below the next major version.

waitress 3.0 answers 400 and closes the connection for a duplicate or signed Content-Length,
a NUL or bare CR/LF inside a header line, or an unknown transfer coding. It serves, and keeps
the connection open for more, in the cases below, which a proxy in front may frame
differently (request smuggling); each is answered 400 here, and the connection closed:

- Content-Length with Transfer-Encoding (waitress reads the chunks and serves what follows
  the last one as a request of its own);
- Transfer-Encoding in a request that is not HTTP/1.1 (waitress ignores it there);
- ``chunked`` twice; a header continued on the next line (obs-fold, which waitress joins);
- a request line that is not method, target and version (waitress serves ``GET /x`` as
  HTTP/0.9, and ``GET HTTP/1.1`` as a request for ``HTTP/1.1``);
- ``Content_Length`` or ``Transfer_Encoding`` (waitress drops such a header unread);
- a header block whose lines end in a bare LF or CR (waitress waits for a CRLF CRLF).

Added besides:

- a deadline for a whole request, first byte to last (waitress's ``channel_timeout``
  counts silence only, so a client trickling a byte every few seconds would hold its
  connection for ever): such a client gets 408 at its first byte after it;
- a bound on the bytes held by requests not yet handled, across all connections (each
  request's first few kilobytes aside, so small requests never meet it): past it, the
  request that would grow gets 503 (waitress holds up to a whole body per connection);
- accepting a burst of connections in one turn of the I/O loop (waitress accepts one a
  turn, and a turn costs time in proportion to the connections open);
- at the limit of connections, closing the oldest idle one to make room for each new one
  (waitress stops accepting: the kubelet's probe would wait behind an attacker's
  connections, and the pod be restarted);
- a rest after each turn of the I/O loop when thousands of connections are open, so that
  their waking it now and then costs at most a third of a core;
- JSON for waitress's own error answers (400, 408, 413, 431, 501, 503), as for every other;
- a connection that opens with a TLS handshake closed at once, unanswered: nothing a TLS
  client sends is a request, and it would wait for its handshake's answer until the idle
  timeout (a Docker Engine tries HTTPS first, even on an insecure registry);
- an answer written at most :data:`SEND_CHUNK` at a time (waitress reads as much as the
  socket's send buffer, megabytes on loopback, for each write);
- the open-file limit: a server holds no more connections than it leaves files for.

Its users: ``serving.http`` (the gateway, the worker's health port) and the blob cache.
"""

from __future__ import annotations

import json
import math
import resource
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import structlog
from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.utilities import Error

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

log = structlog.get_logger("serving.http")

ACCEPT_BATCH = 256
"""Connections accepted in one turn of the I/O loop at most."""
LOOP_TICK = 1
"""Seconds the I/O loop waits for events at most; also how often it looks for idle
connections to close."""
CROWDED = 1000
"""Connections past which each turn of the I/O loop is followed by a rest (see ``REST``)."""
REST = 2
"""With more than ``CROWDED`` connections, a turn of the I/O loop is followed by a rest
this many times its CPU time: the loop then spends at most a third of a core, however
many connections wake it up."""
BACKLOG = 1024
"""Connections the kernel queues before they are accepted (capped at ``somaxconn``)."""
SEND_CHUNK = 256 * 1024
"""Bytes of an answer read (from its buffer or file) for one write to a socket at most."""
RESERVED_DESCRIPTORS = 64
"""Open files kept for everything but connections (broker, engine, logs, files read)."""
TLS_HANDSHAKE = 0x16
"""The first byte of a TLS ClientHello (a handshake record); never the first of a request
(a method is letters)."""

ErrorDocument = Callable[[int, str], object]
"""What an error answer's JSON body is, from its status and message."""


def status_line(code: int) -> str:
    """``200 OK``: a status code and its reason phrase (``Unknown`` where HTTP names none)."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


def error_field(status: int, message: str) -> object:
    """``{"error": message}``: the body of puller's own error answers."""
    return {"error": message}


_FRAMING_HEADERS = (b"content-length", b"transfer-encoding")


def framing_problem(header_block: bytes) -> str | None:
    """What makes a request's head (request line and header lines, CRLF between them) frame
    its body in a way a proxy could read differently; ``None`` when nothing does."""
    request_line, *lines = header_block.split(b"\r\n")
    names: list[bytes] = []
    codings: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            return "a header line continued on the next (obs-fold): send each on one line"
        name, _, value = line.partition(b":")
        lowered = name.lower()
        if b"_" in lowered and lowered.replace(b"_", b"-") in _FRAMING_HEADERS:
            return f"a header named {name.decode('latin-1')!r}: framing headers use '-'"
        names.append(lowered)
        if lowered == b"transfer-encoding":
            codings += [c.strip(b" \t").lower() for c in value.split(b",") if c.strip(b" \t")]
    version = request_line.split(b" ")[-1]
    problems = {
        "a request line is a method, a target and HTTP/1.1 or HTTP/1.0, one space apart": (
            request_line.count(b" ") != 2 or version not in (b"HTTP/1.1", b"HTTP/1.0")
        ),
        "both Content-Length and Transfer-Encoding: send one of them": (
            b"transfer-encoding" in names and b"content-length" in names
        ),
        "Transfer-Encoding in a request that is not HTTP/1.1": (
            b"transfer-encoding" in names and version != b"HTTP/1.1"
        ),
        "Transfer-Encoding: chunked applied more than once": codings.count(b"chunked") > 1,
    }
    return next((problem for problem, found in problems.items() if found), None)


def bare_line_end(head: bytes) -> bool:
    """Whether the start of a request (its head, or the part of it that arrived so far)
    ends a line with a LF or CR alone. A CR last may yet be followed by its LF."""
    end = head.find(b"\r\n\r\n")
    pending = head[:end] if end >= 0 else head.removesuffix(b"\r")
    left = pending.replace(b"\r\n", b"")
    return b"\n" in left or b"\r" in left


class JsonError(Error):
    """An error waitress answers by itself (the request never reached the application),
    written as JSON (``document``); waitress adds ``Connection: close`` and closes after
    it."""

    def __init__(
        self, code: int, reason: str, message: str, document: ErrorDocument = error_field
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.document = document

    # waitress writes the body as bytes; its type stubs say str.
    def to_response(  # type: ignore[override]
        self, ident: str | None = None
    ) -> tuple[str, Sequence[tuple[str, str]], bytes]:
        body = json.dumps(self.document(self.code, self.body)).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/json")], body


class HeldBytes:
    """The bytes of requests read and not yet handled, beyond each request's first
    ``allowance``, over all connections: at most ``limit``. Taken by the I/O thread,
    given back by whichever thread ends the request."""

    def __init__(self, limit: int, allowance: int) -> None:
        self.limit = limit
        self.allowance = allowance
        self.total = 0
        self._lock = threading.Lock()

    def take(self, amount: int) -> bool:
        with self._lock:
            if self.total + amount > self.limit:
                return False
            self.total += amount
            return True

    def give_back(self, amount: int) -> None:
        with self._lock:
            self.total -= amount


class _Holding:
    """What one request has taken from :class:`HeldBytes`; given back once, when the
    request is closed or, failing that, garbage."""

    def __init__(self, held: HeldBytes) -> None:
        self.held = held
        self.amount = 0

    def release(self) -> None:
        amount, self.amount = self.amount, 0
        if amount:
            self.held.give_back(amount)


class Settings(Adjustments):
    """waitress's settings, and what the classes below add to them."""

    request_timeout: float = 30.0
    """Seconds from a request's first byte to its last."""
    max_connections: int = 1000
    """Connections held at once (waitress's own ``connection_limit`` is set out of reach:
    it would stop accepting)."""
    held: HeldBytes = HeldBytes(limit=2**62, allowance=0)
    send_timeout: float | None = None
    """Seconds sent data may stay unacknowledged before the kernel cuts the connection."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.error_document: ErrorDocument = error_field
        """The JSON body of the errors answered before a request reaches the application."""


class StrictParser(HTTPRequestParser):
    """waitress's request parser, with the checks in this module's description."""

    def __init__(self, adj: Adjustments) -> None:
        super().__init__(adj)
        if not isinstance(adj, Settings):
            raise TypeError("StrictParser reads serving.wsgi_server.Settings")
        settings = adj
        self._document = settings.error_document
        self._started = time.monotonic()
        self._request_timeout = settings.request_timeout
        self._allowance = settings.held.allowance
        self._read = 0
        self._holding = _Holding(settings.held)
        weakref.finalize(self, self._holding.release)

    def received(self, data: bytes) -> int:
        if self.completed:
            return 0
        if time.monotonic() - self._started > self._request_timeout:
            message = f"a request must arrive whole within {self._request_timeout:g} s"
            return self._refuse(408, "Request Timeout", message, len(data))
        # What came before was checked but for a CR last: only its last bytes go again, in
        # case a line's end or the head's falls across the two (a LF first among them was
        # judged with its CR).
        tail = self.header_plus[-3:].removeprefix(b"\n")
        if not self.headers_finished and bare_line_end(tail + data):
            message = "a line of the request's head ends in a bare LF or CR: end lines with CRLF"
            return self._refuse(400, "Bad Request", message, len(data))
        held = self._holding.held
        taken = self._beyond_allowance(self._read + len(data)) - self._holding.amount
        if taken > 0 and not held.take(taken):
            message = (
                f"the server holds {held.limit} bytes of unfinished requests already; "
                "try again shortly"
            )
            return self._refuse(503, "Service Unavailable", message, len(data))
        self._holding.amount += max(0, taken)
        consumed = super().received(data)
        self._read += consumed
        unused = self._holding.amount - self._beyond_allowance(self._read)
        if unused > 0:  # what followed this request in ``data`` is the next one's
            self._holding.amount -= unused
            held.give_back(unused)
        if self.error is not None and not isinstance(self.error, JsonError):
            self.error = self._as_json(self.error)
        return consumed

    def close(self) -> None:
        super().close()
        self._holding.release()

    def _beyond_allowance(self, read: int) -> int:
        return max(0, read - self._allowance)

    def parse_header(self, header_plus: bytes) -> None:
        problem = framing_problem(header_plus)
        if problem is not None:
            raise ParsingError(problem)
        super().parse_header(header_plus)

    def _refuse(self, code: int, reason: str, message: str, consumed: int) -> int:
        """Ends the request with an error, all that came with it read: nothing after it is
        served."""
        if not self.headers_finished:
            # What waitress itself answers an unfinished head against (its 431 does this).
            super().parse_header(b"GET / HTTP/1.0\r\n")
        self.error = JsonError(code, reason, message, self._document)
        self.completed = True
        return consumed

    def _as_json(self, error: Error) -> JsonError:
        message = error.body
        if error.code == 413:
            largest = self.adj.max_request_body_size - 1
            message = f"a body of at most {largest} bytes, with a valid length"
        return JsonError(error.code, error.reason, message, self._document)


class StrictChannel(HTTPChannel):
    """waitress's connection, with :class:`StrictParser`; closed at once, unanswered, if it
    opens with a TLS handshake; an answer written at most :data:`SEND_CHUNK` at a time."""

    parser_class = StrictParser
    _first_read = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # waitress reads as much of an answer as the socket's send buffer when accepted
        # (4 MB on loopback) on every write, and keeps what the socket took.
        self.sendbuf_len = min(self.sendbuf_len, SEND_CHUNK)

    def received(self, data: bytes) -> bool:
        if self._first_read and data:
            self._first_read = False
            if data[0] == TLS_HANDSHAKE:
                self.handle_close()
                return False
        return bool(super().received(data))


class StrictServer(TcpWSGIServer):
    """waitress's server, accepting bursts, and making room at its limit of connections:
    waitress would stop accepting there, and a caller (the kubelet's probe) would wait in
    the kernel's backlog behind whoever holds the connections."""

    channel_class = StrictChannel

    def __init__(
        self,
        application: WSGIApplication,
        *,
        connections: dict[int, Any],
        dispatcher: ThreadedTaskDispatcher,
        adj: Settings,
    ) -> None:
        self.connections = connections
        self.max_connections = adj.max_connections
        self.send_timeout = adj.send_timeout
        # the map holds waitress's listening socket and wake-up pipe too
        self.limit = adj.max_connections + 2
        self.closed_to_make_room = 0
        super().__init__(application, map=connections, dispatcher=dispatcher, adj=adj)

    def bind_server_socket(self) -> None:
        if self.family == socket.AF_INET6 and self.socket is not None:
            # [::] takes IPv4 clients too, as a socket does unless told (waitress: v6 only)
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().bind_server_socket()

    def set_socket_options(self, conn: socket.socket) -> None:
        super().set_socket_options(conn)
        if self.send_timeout is not None:
            milliseconds = max(1, math.ceil(self.send_timeout * 1000))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)

    def handle_accept(self) -> None:
        # Called when a connection waits to be accepted; at the limit each needs room first.
        for turn in range(ACCEPT_BATCH):
            if len(self.connections) >= self.limit:
                if turn and not self._one_waits():
                    return
                if not self._make_room():
                    return  # every connection is being served: new ones wait in the backlog
            before = len(self.connections)
            super().handle_accept()
            if len(self.connections) == before:  # none was waiting, or accept failed
                return

    def _one_waits(self) -> bool:
        """Whether a connection waits in the kernel's backlog."""
        if self.socket is None:
            return False
        backlog = select.poll()
        backlog.register(self.socket, select.POLLIN)
        return bool(backlog.poll(0))

    def _make_room(self) -> bool:
        """Closes the oldest connection with nothing to serve or send (the map keeps the
        order they were accepted in); whether there was one."""
        idle = next(
            (
                c
                for c in self.connections.values()
                if isinstance(c, HTTPChannel) and not c.requests and not c.total_outbufs_len
            ),
            None,
        )
        if idle is None:
            return False
        idle.handle_close()
        if self.closed_to_make_room % 1000 == 0:
            log.warning(
                "at the limit of connections: the oldest idle ones are closed to make room",
                max_connections=self.max_connections,
                closed_so_far=self.closed_to_make_room,
            )
        self.closed_to_make_room += 1
        return True


def usable_connections(wanted: int, name: str, files_per_connection: int = 1) -> int:
    """``wanted``, or fewer if the open-file limit would run out first (waitress would then
    fail every accept, in a busy loop); ``files_per_connection``: the socket and the files
    a request may hold open."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - RESERVED_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or wanted * files_per_connection <= room:
        return wanted
    usable = max(1, room // files_per_connection)
    log.warning(
        "fewer connections than asked: the open-file limit is low",
        server=name,
        max_connections=usable,
        asked=wanted,
        open_file_limit=soft,
    )
    return usable


class WsgiServer:
    """``application`` on ``host:port`` (port 0: any free one): an I/O thread holds every
    connection, and a request reaches one of ``threads`` threads only once it has arrived
    whole. At most ``connection_limit`` connections are open: past it, the oldest one with
    nothing to serve is closed for each new one (if all are being served, new ones wait in
    the kernel's backlog)."""

    def __init__(
        self,
        application: WSGIApplication,
        *,
        host: str,
        port: int,
        name: str,
        threads: int,
        connection_limit: int,
        idle_timeout: float,
        request_timeout: float,
        max_header_bytes: int,
        max_body_bytes: int,
        max_held_bytes: int,
        held_allowance: int,
        send_timeout: float | None = None,
        output_buffer: int | None = None,
        error_document: ErrorDocument = error_field,
        ident: str = "puller",
    ) -> None:
        """``send_timeout``: seconds a client may leave what was sent to it unacknowledged
        before the kernel cuts the connection (``TCP_USER_TIMEOUT``; waitress's idle timeout
        spares a connection whose answer is being written). ``output_buffer``: bytes of an
        answer held for one connection before the thread writing it waits (``None``:
        waitress's 16 MiB, past 1 MiB in a temporary file; given, never a file)."""
        channel_timeout = max(1, math.ceil(idle_timeout))
        ipv6 = ":" in host  # IPv4, unless the host is an IPv6 address
        buffers = {}
        if output_buffer is not None:
            # Above what one buffer holds (the watermark and one more write): never a file.
            buffers = {"outbuf_high_watermark": output_buffer, "outbuf_overflow": 4 * output_buffer}
        settings = Settings(
            host=host or "0.0.0.0",
            port=port,
            ipv4=not ipv6,
            ipv6=ipv6,
            **buffers,
            threads=threads,
            connection_limit=2**31,  # see StrictServer: it makes room instead
            channel_timeout=channel_timeout,
            cleanup_interval=max(1, min(30, channel_timeout // 4)),
            max_request_header_size=max_header_bytes,
            max_request_body_size=max_body_bytes + 1,  # waitress refuses the limit itself
            asyncore_use_poll=True,  # select() stops at descriptor 1024
            asyncore_loop_timeout=LOOP_TICK,
            backlog=BACKLOG,
            ident=ident,
            log_socket_errors=False,  # a client that resets its connection is no news
        )
        settings.error_document = error_document
        settings.request_timeout = request_timeout
        settings.send_timeout = send_timeout
        settings.max_connections = connection_limit
        settings.held = self.held = HeldBytes(max_held_bytes, held_allowance)
        # waitress's dispatchers by file descriptor (its type stubs call them sockets)
        self._map: dict[int, Any] = {}
        self._dispatcher = ThreadedTaskDispatcher()
        try:
            self._server = StrictServer(
                application, connections=self._map, dispatcher=self._dispatcher, adj=settings
            )
        except BaseException:
            self._close_all()  # what was opened before the bind failed
            raise
        self._dispatcher.set_thread_count(threads)
        listening = self._server.socket
        if listening is None:
            raise RuntimeError("waitress made no listening socket")
        self.port: int = listening.getsockname()[1]
        self._stopping = threading.Event()
        self._closing = threading.Lock()  # the wake-up pipe is not written once closed
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 1.0) -> None:
        """Closes the listening socket and every connection; requests still running get
        ``grace`` seconds to end before their threads are left behind."""
        self._stopping.set()
        if self._thread.is_alive():
            with self._closing:
                if not self._closed:
                    self._server.pull_trigger()  # wakes the loop, which closes everything
            self._thread.join()
        else:
            self._close_all()
        self._dispatcher.shutdown(timeout=math.ceil(grace))

    def _loop(self) -> None:
        # waitress asks every connection what it waits for on each turn, so a turn costs
        # time in proportion to the connections open, and thousands of clients each
        # sending a byte now and then would keep the loop turning all the time. With a
        # rest after each turn, the next one takes many events at once.
        while not self._stopping.is_set():
            began = time.thread_time()
            wasyncore.loop(timeout=LOOP_TICK, use_poll=True, map=self._map, count=1)
            if len(self._map) > CROWDED:
                self._stopping.wait(REST * (time.thread_time() - began))
        self._close_all()

    def _close_all(self) -> None:
        with self._closing:
            self._closed = True
            for dispatcher in list(self._map.values()):
                dispatcher.close()
            self._map.clear()
