"""Where a stream ends, read over RabbitMQ's stream protocol (plugin ``rabbitmq_stream``): the
only module of the project that speaks that protocol.

One read, one connection (RabbitMQ 3.10 keeps a segment file open per unsubscribe until the
connection closes): PLAIN login, tune, open the vhost, ask the stream's leader
(``Metadata``) and read there, or on the node first connected to when the leader cannot be
reached. On the leader: ``Subscribe`` at ``last`` with credit 1, then ``QueryOffset`` as a
fence. RabbitMQ sends the chunks it has while it handles the subscribe, before it reads the
fence, so a ``Deliver`` before the fence's answer carries the last committed chunk: the tail
is its first offset plus its entry count, minus one. No chunk there: the stream is empty, or
its last chunk is not committed yet (a second subscription at ``first`` tells which). The
design and its measurements: docs/proposals/catch-up-at-scale.md.

Frames (the plugin's PROTOCOL.adoc): ``uint32`` size, ``uint16`` key, ``uint16`` version,
then the fields, big-endian; a response's key is the request's with ``0x8000`` set, then
its correlation id and a ``uint16`` code (1: OK). Strings: ``int16`` length and UTF-8.
Every wait is bounded; whatever the peer sends, the read ends in a result or in
:class:`StreamUnavailable`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from contract import BrokerUnavailable

DELIVER, SUBSCRIBE, QUERY_OFFSET, METADATA = 0x08, 0x07, 0x0B, 0x0F
PEER_PROPERTIES, SASL_HANDSHAKE, SASL_AUTHENTICATE = 0x11, 0x12, 0x13
TUNE, OPEN, CLOSE, HEARTBEAT = 0x14, 0x15, 0x16, 0x17
RESPONSE = 0x8000
OFFSET_FIRST, OFFSET_LAST = 1, 2
OK, NO_OFFSET = 0x01, 0x13
CODES = {
    0x02: "the stream does not exist",
    0x06: "the stream is not available (no leader)",
    0x07: "PLAIN login is not offered",
    0x08: "the user name or password is wrong",
    0x0C: "the user may not open this vhost",
    0x0E: "a frame was too large",
    0x10: "access refused (the user may not read the stream)",
}
FENCE = "puller-fence"
"""The reference the fence asks about; nothing stores an offset under it."""
KEPT = 64 * 1024
"""Bytes of a frame kept; the rest of a larger one (a big chunk) is read and dropped."""
CHUNK_HEADER = struct.Struct(">BBHIqQQ")
"""An osiris chunk's start: magic and version, type, entries, records, timestamp, epoch,
first offset."""
COMMIT_WAIT = 5.0
"""How long a stream whose last chunk is not committed yet may take to commit it."""


class StreamUnavailable(BrokerUnavailable):
    """The stream port could not be reached, refused, or answered what this client does not
    read."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Login:
    """Who reads, and how: ``tls`` wraps each socket, checking the certificate against the
    host connected to."""

    user: str
    password: str = field(repr=False)
    vhost: str
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True)
class TailReading:
    offset: int | None
    """The stream's last offset (``None``: the stream holds nothing)."""
    read_at: Endpoint
    leader_missed: str | None = None
    """Why the leader could not be read (then ``read_at`` is the node first connected to,
    whose copy may lag behind the leader's); ``None`` when it was."""


def read_tail(
    at: Endpoint, login: Login, stream: str, timeout: float = 10.0, commit_wait: float = COMMIT_WAIT
) -> TailReading:
    """The last offset of ``stream``, read on its leader; raises :class:`StreamUnavailable`.
    Takes at most about ``timeout`` seconds (plus ``commit_wait`` in the rare case that the
    last chunk is not committed yet)."""
    deadline = time.monotonic() + timeout
    with _connected(at, login, deadline) as first:
        leader = first.leader(stream)
        if leader == at:
            return TailReading(first.tail(stream, commit_wait), at)
        try:
            # Half the time left: the node first connected to must still have time to answer.
            half = time.monotonic() + (deadline - time.monotonic()) / 2
            with _connected(leader, login, half) as there:
                return TailReading(there.tail(stream, commit_wait), leader)
        except StreamUnavailable as error:
            missed = f"the leader at {leader} (from Metadata): {error}"
        return TailReading(first.tail(stream, commit_wait), at, leader_missed=missed)


@contextlib.contextmanager
def _connected(at: Endpoint, login: Login, deadline: float) -> Iterator[_Connection]:
    """An open connection (logged in, vhost open), closed on the way out."""
    try:
        sock = socket.create_connection((at.host, at.port), timeout=_left(deadline, at))
    except OSError as error:
        raise StreamUnavailable(f"cannot connect to the stream port {at}: {_why(error)}") from None
    try:
        # Small frames, some back to back (tune, then open): not held for the peer's ack.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if login.tls is not None:
            try:
                sock = login.tls.wrap_socket(sock, server_hostname=at.host)
            except (OSError, ValueError) as error:
                raise StreamUnavailable(
                    f"TLS to the stream port {at} failed: {_why(error)}"
                ) from None
        connection = _Connection(sock, at, deadline)
        connection.open(login)
        yield connection
        connection.close()
    finally:
        sock.close()


class _Connection:
    """One stream-protocol connection: requests, and what came meanwhile."""

    def __init__(self, sock: socket.socket, at: Endpoint, deadline: float) -> None:
        self._socket = sock
        self._at = at
        self._deadline = deadline
        self._buffer = bytearray()
        self._correlation = 0
        self.chunks: dict[int, int] = {}
        """Subscription id -> the last offset of the first chunk delivered to it."""

    def open(self, login: Login) -> None:
        self.call(PEER_PROPERTIES, struct.pack(">i", 0))
        try:
            mechanisms = _strings(self.call(SASL_HANDSHAKE, b""))
        except (struct.error, UnicodeDecodeError):
            raise self._error("a malformed list of login mechanisms") from None
        if "PLAIN" not in mechanisms:
            raise self._error(f"PLAIN login is not offered (only {', '.join(mechanisms)})")
        secret = f"\0{login.user}\0{login.password}".encode()
        self.call(SASL_AUTHENTICATE, _string("PLAIN") + struct.pack(">i", len(secret)) + secret)
        key, _version, body = self._frame()
        while key == HEARTBEAT:
            key, _version, body = self._frame()
        if key != TUNE or len(body) < 8:
            raise self._error(f"expected the server's tune, got frame {key:#06x}")
        frame_max, _heartbeat = struct.unpack_from(">II", body)
        # Heartbeat 0: the connection lives for one read.
        self._send(TUNE, struct.pack(">II", frame_max, 0))
        self.call(OPEN, _string(login.vhost))

    def leader(self, stream: str) -> Endpoint:
        """The stream's leader's advertised address."""
        body = self.call(METADATA, struct.pack(">i", 1) + _string(stream), coded=False)
        try:
            (count,), at = struct.unpack_from(">i", body), 4
            brokers = {}
            for _ in range(count):
                (reference,), at = struct.unpack_from(">H", body, at), at + 2
                host, at = _string_at(body, at)
                (port,), at = struct.unpack_from(">I", body, at), at + 4
                brokers[reference] = Endpoint(host, port)
            name, at = _string_at(body, at + 4)  # one stream asked, one answered
            code, leader = struct.unpack_from(">HH", body, at)
        except (struct.error, UnicodeDecodeError):
            raise self._error("malformed metadata") from None
        if name != stream or code != OK:
            raise self._error(f"metadata for {stream!r}: {_meaning(code)}")
        if leader not in brokers:
            raise self._error(f"metadata names leader {leader}, not among its brokers")
        return brokers[leader]

    def tail(self, stream: str, commit_wait: float) -> int | None:
        fence = _string(FENCE) + _string(stream)
        self.call(SUBSCRIBE, _subscription(0, stream, OFFSET_LAST))
        self.call(QUERY_OFFSET, fence, allowed=(OK, NO_OFFSET))
        if 0 in self.chunks:
            return self.chunks[0]
        # Empty, or the last chunk is not committed yet: a committed chunk is read from first.
        self.call(SUBSCRIBE, _subscription(1, stream, OFFSET_FIRST))
        self.call(QUERY_OFFSET, fence, allowed=(OK, NO_OFFSET))
        if 1 not in self.chunks:
            return None
        self._deadline = time.monotonic() + commit_wait
        try:
            while 0 not in self.chunks:
                self._take(*self._frame())
        except StreamUnavailable:
            if time.monotonic() < self._deadline:
                raise
            raise self._error(
                f"the stream's last chunk was not committed within {commit_wait:g} s"
            ) from None
        return self.chunks[0]

    def close(self) -> None:
        """Closes politely, waiting briefly for the answer; the socket closes either way."""
        self._deadline = min(self._deadline, time.monotonic() + 1.0)
        with contextlib.suppress(StreamUnavailable):
            self.call(CLOSE, struct.pack(">H", OK) + _string("tail read"))

    # -- frames ------------------------------------------------------------------------------

    def call(
        self, key: int, body: bytes, *, coded: bool = True, allowed: tuple[int, ...] = (OK,)
    ) -> bytes:
        """Sends a request; returns its response's fields after the code (after the
        correlation id when ``coded`` is false)."""
        self._correlation += 1
        self._send(key, struct.pack(">I", self._correlation) + body)
        while True:
            got, version, answer = self._frame()
            if got != key | RESPONSE:
                self._take(got, version, answer)
                continue
            if len(answer) < (6 if coded else 4):
                raise self._error(f"a short response to {key:#06x}")
            if struct.unpack_from(">I", answer)[0] != self._correlation:
                continue  # an answer to an earlier request (a close's, say)
            if not coded:
                return answer[4:]
            (code,) = struct.unpack_from(">H", answer, 4)
            if code not in allowed:
                raise self._error(f"request {key:#06x} refused: {_meaning(code)}")
            return answer[6:]

    def _take(self, key: int, version: int, body: bytes) -> None:
        """A frame that is not the answer waited for."""
        if key == DELIVER:
            skip = 9 if version >= 2 else 1  # version 2 adds the committed chunk id
            if len(body) < skip + CHUNK_HEADER.size:
                raise self._error("a short deliver frame")
            subscription = body[0]
            magic, _type, entries, _records, _time, _epoch, first = CHUNK_HEADER.unpack_from(
                body, skip
            )
            if magic >> 4 != 5 or entries == 0:
                raise self._error("a deliver frame that holds no chunk")
            self.chunks.setdefault(subscription, first + entries - 1)
        elif key == CLOSE:
            try:
                reason, _ = _string_at(body, 6)
            except (struct.error, UnicodeDecodeError):
                reason = ""
            raise self._error(f"the broker closed the connection: {reason or 'no reason'}")
        # Others (heartbeat, metadata update, credit notice): nothing to do for one read.

    def _send(self, key: int, body: bytes) -> None:
        frame = struct.pack(">HH", key, 1) + body
        try:
            self._socket.settimeout(_left(self._deadline, self._at))
            self._socket.sendall(struct.pack(">I", len(frame)) + frame)
        except OSError as error:
            raise self._error(f"cannot send: {_why(error)}") from None

    def _frame(self) -> tuple[int, int, bytes]:
        """The next frame: key, version, and at most :data:`KEPT` bytes of its fields."""
        (size,) = struct.unpack(">I", self._read(4))
        if size < 4:
            raise self._error(f"a frame of {size} bytes")
        key, version = struct.unpack(">HH", self._read(4))
        body = self._read(min(size - 4, KEPT))
        left = size - 4 - len(body)
        while left > 0:
            left -= len(self._read(min(left, KEPT)))
        return key, version, body

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                self._socket.settimeout(_left(self._deadline, self._at))
                data = self._socket.recv(max(65536, count - len(self._buffer)))
            except OSError as error:
                raise self._error(f"cannot read: {_why(error)}") from None
            if not data:
                raise self._error("the broker closed the connection")
            self._buffer += data
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _error(self, what: str) -> StreamUnavailable:
        return StreamUnavailable(f"stream port {self._at}: {what}")


def _subscription(subscription: int, stream: str, offset: int) -> bytes:
    """Subscribe's fields: id, stream, offset type, credit 1, no properties."""
    return struct.pack(">B", subscription) + _string(stream) + struct.pack(">HHi", offset, 1, 0)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _string_at(body: bytes, at: int) -> tuple[str, int]:
    """The string at ``at``, and where what follows it starts."""
    (length,) = struct.unpack_from(">h", body, at)
    end = at + 2 + max(length, 0)
    if end > len(body):
        raise struct.error("a string runs past the frame's end")
    return body[at + 2 : end].decode(), end


def _strings(body: bytes) -> list[str]:
    """An array of strings (``int32`` count) at the start of ``body``."""
    (count,) = struct.unpack_from(">i", body)
    found, at = [], 4
    for _ in range(count):
        text, at = _string_at(body, at)
        found.append(text)
    return found


def _meaning(code: int) -> str:
    return CODES.get(code, f"code {code:#06x}")


def _left(deadline: float, at: Endpoint) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise StreamUnavailable(f"stream port {at}: no answer in time")
    return left


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__
