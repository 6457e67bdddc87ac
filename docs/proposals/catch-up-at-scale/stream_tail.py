"""A minimal, synchronous RabbitMQ stream-protocol client (plugin rabbitmq_stream, 3.10):
just enough to learn where a stream ends, and to try the server-side consumer offsets.

Frames (PROTOCOL.adoc of rabbitmq_stream): uint32 size, then uint16 key, uint16 version,
then the command's fields; responses have key | 0x8000, a correlation id and a uint16
response code (1 = OK). Strings are int16 length + UTF-8.

    client = StreamClient("127.0.0.1", 5552, "guest", "guest", vhost)
    tail = client.tail("puller.history.stream")   # highest user offset, or None if empty
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

PEER_PROPERTIES, SASL_HANDSHAKE, SASL_AUTHENTICATE, TUNE, OPEN = 0x11, 0x12, 0x13, 0x14, 0x15
SUBSCRIBE, DELIVER, CREDIT, STORE_OFFSET, QUERY_OFFSET, UNSUBSCRIBE = 7, 8, 9, 10, 11, 12
METADATA, CLOSE, HEARTBEAT = 0x0F, 0x16, 0x17
OFFSET_FIRST, OFFSET_LAST, OFFSET_NEXT, OFFSET_AT = 1, 2, 3, 4
OK = 1


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


class StreamProtocolError(Exception):
    pass


@dataclass(frozen=True)
class Chunk:
    """A Deliver frame's osiris chunk header (the entries are not parsed)."""

    chunk_type: int
    num_entries: int
    num_records: int
    timestamp_ms: int
    first_offset: int

    @property
    def last_offset(self) -> int:
        return self.first_offset + self.num_entries - 1


class StreamClient:
    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        vhost: str,
        timeout: float = 10.0,
        heartbeat: int | None = None,
    ) -> None:
        self._socket = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        self._correlation = 0
        self.frames_in = 0
        self.bytes_in = 0
        self._request(PEER_PROPERTIES, struct.pack(">i", 0))
        self._request(SASL_HANDSHAKE, b"")
        self._request(SASL_AUTHENTICATE, _string("PLAIN") + _bytes(f"\0{user}\0{password}"))
        key, body = self._read_frame()  # the server's Tune
        if key != TUNE:
            raise StreamProtocolError(f"expected tune, got {key:#x}")
        frame_max, server_heartbeat = struct.unpack(">II", body[:8])
        # The server's frame max; its heartbeat, or ours (0: none) if given.
        chosen = server_heartbeat if heartbeat is None else heartbeat
        self._send(TUNE, struct.pack(">II", frame_max, chosen))
        self._request(OPEN, _string(vhost))

    # -- commands ------------------------------------------------------------------------------

    def tail(self, stream: str, subscription: int = 0) -> Chunk | None:
        """The stream's last user chunk as of now (None: the stream is empty). Subscribes at
        "last" with credit 1; the server sends the chunks it has in the same step as the
        subscribe response, so a request sent after the subscribe (the fence) is answered
        after the chunk: no waiting, no timing."""
        body = struct.pack(">B", subscription) + _string(stream)
        body += struct.pack(">HH", OFFSET_LAST, 1) + struct.pack(">i", 0)
        self._request(SUBSCRIBE, body)
        fence = self._send_request(QUERY_OFFSET, _string("puller-fence") + _string(stream))
        chunk: Chunk | None = None
        while True:
            key, payload = self._read_frame()
            if key == DELIVER and chunk is None:
                chunk = _chunk(payload[1:])
            elif key == QUERY_OFFSET | 0x8000 and struct.unpack(">I", payload[:4])[0] == fence:
                break
        self._request(UNSUBSCRIBE, struct.pack(">B", subscription))
        return chunk

    def subscribe(self, stream: str, subscription: int, offset: int | None, credit: int) -> None:
        spec = struct.pack(">HH", OFFSET_FIRST, credit)
        if offset is not None:
            spec = struct.pack(">HQH", OFFSET_AT, offset, credit)
        body = struct.pack(">B", subscription) + _string(stream) + spec + struct.pack(">i", 0)
        self._request(SUBSCRIBE, body)

    def next_chunk(self) -> Chunk:
        while True:
            key, payload = self._read_frame()
            if key == DELIVER:
                return _chunk(payload[1:])

    def metadata(self, stream: str) -> tuple[dict[int, tuple[str, int]], int | None, list[int]]:
        """Brokers (reference -> advertised host, port), the stream's leader and replicas."""
        _code, payload = self._request_raw(METADATA, struct.pack(">i", 1) + _string(stream))
        at = 0
        (count,) = struct.unpack_from(">i", payload, at)
        at += 4
        brokers = {}
        for _ in range(count):
            (ref,) = struct.unpack_from(">H", payload, at)
            at += 2
            host, at = _read_string(payload, at)
            (port,) = struct.unpack_from(">I", payload, at)
            at += 4
            brokers[ref] = (host, port)
        (_streams,) = struct.unpack_from(">i", payload, at)
        at += 4
        _name, at = _read_string(payload, at)
        code, leader, replica_count = struct.unpack_from(">HHi", payload, at)
        at += 8
        replicas = list(struct.unpack_from(f">{replica_count}H", payload, at))
        return brokers, (leader if code == OK else None), replicas

    def store_offset(self, reference: str, stream: str, offset: int) -> None:
        self._send(STORE_OFFSET, _string(reference) + _string(stream) + struct.pack(">Q", offset))

    def query_offset(self, reference: str, stream: str) -> int | None:
        code, payload = self._request(
            QUERY_OFFSET, _string(reference) + _string(stream), allow={OK, 0x13}
        )
        return struct.unpack(">Q", payload[:8])[0] if code == OK else None

    def close(self) -> None:
        try:
            self._request(CLOSE, struct.pack(">H", OK) + _string("bye"))
        finally:
            self._socket.close()

    # -- frames --------------------------------------------------------------------------------

    def _send(self, key: int, body: bytes) -> None:
        frame = struct.pack(">HH", key, 1) + body
        self._socket.sendall(struct.pack(">I", len(frame)) + frame)

    def _send_request(self, key: int, body: bytes) -> int:
        self._correlation += 1
        self._send(key, struct.pack(">I", self._correlation) + body)
        return self._correlation

    def _request(self, key: int, body: bytes, allow: set[int] | None = None) -> tuple[int, bytes]:
        correlation = self._send_request(key, body)
        while True:
            got, payload = self._read_frame()
            if got == key | 0x8000 and struct.unpack(">I", payload[:4])[0] == correlation:
                code = struct.unpack(">H", payload[4:6])[0]
                if code not in (allow or {OK}):
                    raise StreamProtocolError(f"command {key:#x} answered {code:#x}")
                return code, payload[6:]
            if got == TUNE:
                continue

    def _request_raw(self, key: int, body: bytes) -> tuple[int, bytes]:
        """For responses without a response code right after the correlation id."""
        correlation = self._send_request(key, body)
        while True:
            got, payload = self._read_frame()
            if got == key | 0x8000 and struct.unpack(">I", payload[:4])[0] == correlation:
                return OK, payload[4:]

    def _read_frame(self) -> tuple[int, bytes]:
        while True:
            if len(self._buffer) >= 4:
                (size,) = struct.unpack(">I", self._buffer[:4])
                if len(self._buffer) >= 4 + size:
                    frame, self._buffer = self._buffer[4 : 4 + size], self._buffer[4 + size :]
                    key, _version = struct.unpack(">HH", frame[:4])
                    self.frames_in += 1
                    self.bytes_in += 4 + size
                    if key == HEARTBEAT:
                        continue
                    return key, frame[4:]
            data = self._socket.recv(65536)
            if not data:
                raise StreamProtocolError("connection closed by the broker")
            self._buffer += data


def _bytes(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">i", len(data)) + data


def _read_string(payload: bytes, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">h", payload, at)
    return payload[at + 2 : at + 2 + length].decode(), at + 2 + length


def _chunk(osiris: bytes) -> Chunk:
    # MagicVersion int8, ChunkType int8, NumEntries uint16, NumRecords uint32, Timestamp int64,
    # Epoch uint64, ChunkFirstOffset uint64, ...
    _magic, kind, entries, records, timestamp, _epoch, first = struct.unpack(
        ">bbHIqQQ", osiris[:32]
    )
    return Chunk(kind, entries, records, timestamp, first)
