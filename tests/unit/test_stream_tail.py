"""The stream-protocol tail read against a scripted server: the bytes it sends (the layout of
the plugin's PROTOCOL.adoc), the tail it works out, and what it does when the server lies,
stalls or cuts a frame short: a clear :class:`StreamUnavailable`, in bounded time."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import BrokerUnavailable
from contract import topology as topo
from contract.stream_tail import (
    CLOSE,
    DELIVER,
    METADATA,
    NO_OFFSET,
    OFFSET_FIRST,
    OFFSET_LAST,
    OK,
    OPEN,
    PEER_PROPERTIES,
    QUERY_OFFSET,
    RESPONSE,
    SASL_AUTHENTICATE,
    SASL_HANDSHAKE,
    SUBSCRIBE,
    TUNE,
    Endpoint,
    Login,
    StreamUnavailable,
    read_tail,
)
from worker.broker import WorkerBroker

STREAM = "puller.history.stream"
LOGIN = Login("worker", "s3cret", "/pulls")


def string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def frame(key: int, fields: bytes, version: int = 1) -> bytes:
    return struct.pack(">IHH", len(fields) + 4, key, version) + fields


def response(key: int, correlation: int, code: int = OK, rest: bytes = b"") -> bytes:
    return frame(key | RESPONSE, struct.pack(">IH", correlation, code) + rest)


def chunk(first: int, entries: int, magic: int = 0x50) -> bytes:
    """An osiris chunk header (and a little data) as a Deliver carries it."""
    header = struct.pack(">BBHIqQQ", magic, 0, entries, entries, 0, 1, first)
    return header + struct.pack(">iIII", 0, 8, 0, 0) + b"x" * 8


def deliver(subscription: int, first: int, entries: int) -> bytes:
    return frame(DELIVER, bytes([subscription]) + chunk(first, entries))


@dataclass
class Broker:
    """A scripted stream port: answers the way RabbitMQ 3.10 does, with a chunk for each
    offset type in ``chunks``; ``override`` replaces the answer to one request key."""

    chunks: dict[int, tuple[int, int]] = field(default_factory=dict)
    leader: Endpoint | None = None
    override: dict[int, Callable[[int, bytes], bytes]] = field(default_factory=dict)
    received: list[bytes] = field(default_factory=list)
    subscriptions: dict[int, int] = field(default_factory=dict)

    def answer(self, key: int, correlation: int, fields: bytes, me: Endpoint) -> bytes:
        if key in self.override:
            return self.override[key](correlation, fields)
        if key == METADATA:
            return self.metadata(correlation, self.leader or me)
        if key == SUBSCRIBE:
            return self.subscribe(correlation, fields)
        rest = {
            PEER_PROPERTIES: struct.pack(">i", 0),
            OPEN: struct.pack(">i", 0),
            SASL_HANDSHAKE: struct.pack(">i", 1) + string("PLAIN"),
            CLOSE: b"",
        }
        if key == QUERY_OFFSET:
            return response(key, correlation, NO_OFFSET, struct.pack(">Q", 0))
        tune = frame(TUNE, struct.pack(">II", 1048576, 60)) if key == SASL_AUTHENTICATE else b""
        return response(key, correlation, rest=rest.get(key, b"")) + tune

    def metadata(self, correlation: int, leader: Endpoint) -> bytes:
        brokers = struct.pack(">iH", 1, 7) + string(leader.host) + struct.pack(">I", leader.port)
        streams = struct.pack(">i", 1) + string(STREAM) + struct.pack(">HHi", OK, 7, 0)
        return frame(METADATA | RESPONSE, struct.pack(">I", correlation) + brokers + streams)

    def subscribe(self, correlation: int, fields: bytes) -> bytes:
        subscription = fields[0]
        (length,) = struct.unpack_from(">h", fields, 1)
        (offset_type,) = struct.unpack_from(">H", fields, 3 + length)
        self.subscriptions[subscription] = offset_type
        found = self.chunks.get(offset_type)
        return response(SUBSCRIBE, correlation) + (deliver(subscription, *found) if found else b"")


class Server:
    """Serves connections on 127.0.0.1 with a :class:`Broker`'s answers, or with ``raw``
    bytes to the first request, then a close (hostile answers)."""

    def __init__(self, broker: Broker | None = None, raw: bytes | None = None) -> None:
        self.broker = broker or Broker()
        self.raw = raw
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.at = Endpoint("127.0.0.1", self.listener.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(connection,), daemon=True).start()

    def _talk(self, connection: socket.socket) -> None:
        with connection:
            buffer = b""
            try:
                while True:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffer += data
                    while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4]):
                        size = int.from_bytes(buffer[:4])
                        whole, buffer = buffer[: 4 + size], buffer[4 + size :]
                        self.broker.received.append(whole)
                        if self.raw is not None:
                            connection.sendall(self.raw)
                            return  # and closed
                        key = int.from_bytes(whole[4:6])
                        if key == TUNE:
                            continue
                        correlation = int.from_bytes(whole[8:12])
                        connection.sendall(
                            self.broker.answer(key, correlation, whole[12:], self.at)
                        )
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(broker: Broker | None = None, raw: bytes | None = None) -> Server:
        made.append(Server(broker, raw))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_the_frames_sent_follow_the_protocols_layout(servers: Callable[..., Server]) -> None:
    server = servers(Broker(chunks={OFFSET_LAST: (40, 3)}))
    read_tail(server.at, LOGIN, STREAM)
    secret = b"\0worker\0s3cret"
    assert server.broker.received == [
        frame(PEER_PROPERTIES, struct.pack(">Ii", 1, 0)),
        frame(SASL_HANDSHAKE, struct.pack(">I", 2)),
        frame(
            SASL_AUTHENTICATE,
            struct.pack(">I", 3) + string("PLAIN") + struct.pack(">i", len(secret)) + secret,
        ),
        frame(TUNE, struct.pack(">II", 1048576, 0)),  # the server's frame max, no heartbeat
        frame(OPEN, struct.pack(">I", 4) + string("/pulls")),
        frame(METADATA, struct.pack(">Ii", 5, 1) + string(STREAM)),
        frame(SUBSCRIBE, struct.pack(">IB", 6, 0) + string(STREAM) + struct.pack(">HHi", 2, 1, 0)),
        frame(QUERY_OFFSET, struct.pack(">I", 7) + string("puller-fence") + string(STREAM)),
        frame(CLOSE, struct.pack(">IH", 8, OK) + string("tail read")),
    ]


def test_the_tail_is_the_last_chunks_first_offset_plus_its_entries_minus_one(
    servers: Callable[..., Server],
) -> None:
    server = servers(Broker(chunks={OFFSET_LAST: (1000, 25)}))
    reading = read_tail(server.at, LOGIN, STREAM)
    assert (reading.offset, reading.read_at, reading.leader_missed) == (1024, server.at, None)


def test_an_empty_stream_has_no_tail(servers: Callable[..., Server]) -> None:
    server = servers(Broker())
    assert read_tail(server.at, LOGIN, STREAM).offset is None
    assert server.broker.subscriptions == {0: OFFSET_LAST, 1: OFFSET_FIRST}


def test_a_last_chunk_not_committed_yet_is_waited_for(servers: Callable[..., Server]) -> None:
    """Nothing at ``last`` before the fence, but a chunk at ``first``: the stream is not
    empty, and the read waits for the last chunk's delivery."""
    broker = Broker(chunks={OFFSET_FIRST: (0, 5)})

    def late(correlation: int, _fields: bytes) -> bytes:
        """The chunk at ``last`` commits after the second fence."""
        answer = response(QUERY_OFFSET, correlation, NO_OFFSET, struct.pack(">Q", 0))
        return answer + (deliver(0, 90, 2) if 1 in broker.subscriptions else b"")

    broker.override[QUERY_OFFSET] = late
    server = servers(broker)
    assert read_tail(server.at, LOGIN, STREAM).offset == 91


def test_a_last_chunk_that_never_commits_ends_the_read(servers: Callable[..., Server]) -> None:
    server = servers(Broker(chunks={OFFSET_FIRST: (0, 5)}))
    began = time.monotonic()
    with pytest.raises(StreamUnavailable, match=r"not committed within 0\.3 s"):
        read_tail(server.at, LOGIN, STREAM, commit_wait=0.3)
    assert time.monotonic() - began < 5


def test_the_tail_is_read_on_the_leader(servers: Callable[..., Server]) -> None:
    leader = servers(Broker(chunks={OFFSET_LAST: (500, 1)}))
    replica = servers(Broker(chunks={OFFSET_LAST: (400, 1)}, leader=leader.at))
    reading = read_tail(replica.at, LOGIN, STREAM)
    assert (reading.offset, reading.read_at, reading.leader_missed) == (500, leader.at, None)
    assert replica.broker.subscriptions == {}  # nothing read on the replica


def test_a_leader_out_of_reach_falls_back_to_the_node_connected_to(
    servers: Callable[..., Server],
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        closed = Endpoint("127.0.0.1", taken.getsockname()[1])
    replica = servers(Broker(chunks={OFFSET_LAST: (400, 1)}, leader=closed))
    reading = read_tail(replica.at, LOGIN, STREAM)
    assert (reading.offset, reading.read_at) == (400, replica.at)
    assert reading.leader_missed is not None and str(closed) in reading.leader_missed


def test_an_advertised_host_that_does_not_resolve_falls_back(
    servers: Callable[..., Server],
) -> None:
    replica = servers(Broker(chunks={OFFSET_LAST: (7, 1)}, leader=Endpoint("no-such.invalid", 1)))
    assert read_tail(replica.at, LOGIN, STREAM).offset == 7


@pytest.mark.parametrize(
    ("key", "code", "says"),
    [
        (SASL_AUTHENTICATE, 0x08, "the user name or password is wrong"),
        (OPEN, 0x0C, "the user may not open this vhost"),
        (SUBSCRIBE, 0x10, "access refused"),
        (SUBSCRIBE, 0x02, "the stream does not exist"),
        (SUBSCRIBE, 0x77, "code 0x0077"),
    ],
)
def test_a_refusal_says_what_was_refused(
    servers: Callable[..., Server], key: int, code: int, says: str
) -> None:
    server = servers(Broker(override={key: lambda c, _f: response(key, c, code)}))
    with pytest.raises(StreamUnavailable, match=says) as raised:
        read_tail(server.at, LOGIN, STREAM)
    assert isinstance(raised.value, BrokerUnavailable)
    assert "s3cret" not in str(raised.value)


def test_no_plain_login_is_a_clear_error(servers: Callable[..., Server]) -> None:
    only_external = struct.pack(">i", 1) + string("EXTERNAL")
    server = servers(
        Broker(
            override={SASL_HANDSHAKE: lambda c, _f: response(SASL_HANDSHAKE, c, OK, only_external)}
        )
    )
    with pytest.raises(StreamUnavailable, match="PLAIN login is not offered"):
        read_tail(server.at, LOGIN, STREAM)


def test_metadata_without_a_leader_is_a_clear_error(servers: Callable[..., Server]) -> None:
    def no_leader(correlation: int, _fields: bytes) -> bytes:
        streams = struct.pack(">i", 1) + string(STREAM) + struct.pack(">HHi", 0x06, 0xFFFF, 0)
        body = struct.pack(">Ii", correlation, 0) + streams
        return frame(METADATA | RESPONSE, body)

    server = servers(Broker(override={METADATA: no_leader}))
    with pytest.raises(StreamUnavailable, match="no leader"):
        read_tail(server.at, LOGIN, STREAM)


def test_a_close_from_the_broker_says_why(servers: Callable[..., Server]) -> None:
    def closing(correlation: int, _fields: bytes) -> bytes:
        return frame(CLOSE, struct.pack(">IH", 1, 0x0F) + string("internal error"))

    server = servers(Broker(override={SUBSCRIBE: closing}))
    with pytest.raises(StreamUnavailable, match="closed the connection: internal error"):
        read_tail(server.at, LOGIN, STREAM)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"\x00\x00", "closed the connection"),  # cut in the size
        (struct.pack(">I", 2) + b"\x00\x00", "a frame of 2 bytes"),
        (struct.pack(">I", 10) + b"\x80\x11\x00\x01\x00", "closed the connection"),
        (frame(PEER_PROPERTIES | RESPONSE, b"\x00\x00"), "a short response"),
        (struct.pack(">I", 2**32 - 1) + b"\x80\x11\x00\x01", "closed the connection"),
        (frame(DELIVER, b"\x00" + b"\x50" * 8), "a short deliver frame"),
        (frame(DELIVER, b"\x00" + chunk(1, 1, magic=0x12)), "holds no chunk"),
    ],
)
def test_hostile_frames_end_in_a_clear_error(
    servers: Callable[..., Server], raw: bytes, says: str
) -> None:
    server = servers(raw=raw)
    with pytest.raises(StreamUnavailable, match=says):
        read_tail(server.at, LOGIN, STREAM, timeout=3)


def test_a_silent_broker_ends_the_read_in_time() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        at = Endpoint("127.0.0.1", silent.getsockname()[1])
        began = time.monotonic()
        with pytest.raises(StreamUnavailable, match="no answer in time"):
            read_tail(at, LOGIN, STREAM, timeout=0.5)
        assert time.monotonic() - began < 3


def test_a_closed_port_is_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        at = Endpoint("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(StreamUnavailable, match=f"cannot connect to the stream port {at}"):
        read_tail(at, LOGIN, STREAM)


def test_a_big_chunk_is_read_past_not_kept(servers: Callable[..., Server]) -> None:
    big = frame(DELIVER, b"\x00" + chunk(10, 3) + b"y" * 3_000_000)

    def subscribed(correlation: int, _fields: bytes) -> bytes:
        return response(SUBSCRIBE, correlation) + big

    server = servers(Broker(override={SUBSCRIBE: subscribed}))
    assert read_tail(server.at, LOGIN, STREAM).offset == 12


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(min_size=1, max_size=200))
def test_any_answer_ends_in_a_result_or_a_clear_error(
    servers: Callable[..., Server], garbage: bytes
) -> None:
    server = servers(raw=garbage)
    with contextlib.suppress(StreamUnavailable):
        read_tail(server.at, LOGIN, STREAM, timeout=1)


def test_the_worker_reads_the_history_with_its_own_login(servers: Callable[..., Server]) -> None:
    server = servers(Broker(chunks={OFFSET_LAST: (70, 4)}))
    url = "amqp://worker:s3cret@127.0.0.1:5672/%2Fpulls"  # AMQP is not used here
    broker = WorkerBroker(url, "node-1", prefetch=1, heartbeat=30, stream_port=server.at.port)
    assert broker.read_tail() == 73
    sent = server.broker.received
    secret = b"\0worker\0s3cret"
    assert sent[2].endswith(string("PLAIN") + struct.pack(">i", len(secret)) + secret)
    assert sent[4].endswith(string("/pulls"))
    assert sent[6].endswith(string(topo.history_stream().name) + struct.pack(">HHi", 2, 1, 0))
    assert broker.tail_reads_off_leader == 0


def test_the_worker_counts_reads_off_the_leader(servers: Callable[..., Server]) -> None:
    replica = servers(Broker(chunks={OFFSET_LAST: (5, 1)}, leader=Endpoint("no-such.invalid", 1)))
    url = "amqp://worker:s3cret@127.0.0.1:5672/%2Fpulls"  # AMQP is not used here
    broker = WorkerBroker(url, "node-1", prefetch=1, heartbeat=30, stream_port=replica.at.port)
    assert broker.read_tail() == 5
    assert broker.tail_reads_off_leader == 1


def test_behind_a_mapped_amqp_port_the_worker_does_not_guess_the_stream_port(
    servers: Callable[..., Server],
) -> None:
    """A broker published on another port (a container, a proxy): 5552 on that host may be
    another broker's stream, whose end would hold catch-up back for good."""
    server = servers(Broker(chunks={OFFSET_LAST: (70, 4)}))
    mapped = "amqp://worker:s3cret@127.0.0.1:29905/%2F"
    with pytest.raises(BrokerUnavailable, match="set PULLER_STREAM_PORT"):
        WorkerBroker(mapped, "node-1", prefetch=1, heartbeat=30).read_tail()
    told = WorkerBroker(mapped, "node-1", prefetch=1, heartbeat=30, stream_port=server.at.port)
    assert told.read_tail() == 73
    assert server.broker.received  # the port it was told is the one it read
