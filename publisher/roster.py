"""The roster: which nodes exist, learned from the workers' presence announcements.

A publisher follows the presence stream into a :class:`RosterBook` on its I/O thread
(:class:`RosterFollower`): each node's latest announcement, kept in memory and followed
live, so that a roster read costs what was announced since the last one, not the whole
window again. A read puts a marker into the stream and waits for it to come back: the book
then holds everything announced before the read. After a reconnection the reading starts
again from the window back. Anyone who may publish to ``puller.presence`` can flood the
stream; a read that cannot reach its marker in time answers from the book with a note
(:class:`Roster`), and the book never holds more than ``max_nodes``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import pika
import pika.channel
import pika.spec

from contract import (
    CONTENT_TYPE,
    BrokerUnavailable,
    InvalidMessage,
    NodePresence,
    NodeState,
    RosterMarker,
    decode_presence_stream,
)
from contract import topology as topo
from contract.connection import describe

log = logging.getLogger("puller.publisher.roster")

NodeInfo = NodePresence
"""A node in the roster is its latest announcement; ``last_seen`` is when it was sent."""

MAX_NODES = 10_000
"""Nodes a roster book holds at most: a flood of made-up names cannot grow it without end."""


@dataclass(frozen=True)
class Roster:
    """The live nodes, and whether they are all that was announced until the read began."""

    nodes: list[NodeInfo]
    complete: bool = True
    note: str | None = None
    """Why the roster may miss something (``complete`` is false), for the caller to show."""


@dataclass
class _Entry:
    presence: NodePresence
    seen: float
    """When it counts as seen (Unix time), for the roster's age limit."""


@dataclass
class RosterBook:
    """Each node's latest announcement and when it was seen; shared by the connection's
    thread (which adds) and callers (who read)."""

    max_nodes: int = MAX_NODES
    _latest: dict[str, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    turned_away: int = 0
    """Announcements of new nodes not kept because the book was full."""
    senders: Counter[str] = field(default_factory=Counter)
    """Messages read from the stream, by the AMQP ``user_id`` RabbitMQ vouched for ("" when
    none was given): who floods, if anyone does."""

    def add(self, presence: NodePresence, seen: float, horizon: float) -> None:
        """Records ``presence`` as its node's latest. A full book first forgets the nodes not
        seen since ``horizon`` (Unix time); still full, it turns a new node away."""
        with self._lock:
            if presence.node not in self._latest and len(self._latest) >= self.max_nodes:
                self._latest = {n: e for n, e in self._latest.items() if e.seen >= horizon}
                if len(self._latest) >= self.max_nodes:
                    self.turned_away += 1
                    return
            self._latest[presence.node] = _Entry(presence, seen)

    def roster(self, since: float, max_age: float = 0.0) -> list[NodeInfo]:
        """The nodes seen since ``since`` (Unix time) whose latest word is not "leaving". A
        node that declared a longer wait between its announcements than ``max_age`` (the age
        limit ``since`` was reckoned with) counts from that much earlier
        (:meth:`NodePresence.silent_after`)."""
        with self._lock:
            entries = sorted(self._latest.items())
        return [
            entry.presence
            for _, entry in entries
            if entry.seen >= since + max_age - entry.presence.silent_after(max_age)
            and entry.presence.state is NodeState.UP
        ]

    def announcements(self, since: float, max_age: float = 0.0) -> list[NodeInfo]:
        """Every node's latest announcement seen since ``since`` (Unix time), "leaving" ones
        included, by node name; ``max_age`` as in :meth:`roster`."""
        with self._lock:
            entries = sorted(self._latest.items())
        return [
            entry.presence
            for _, entry in entries
            if entry.seen >= since + max_age - entry.presence.silent_after(max_age)
        ]

    def count(self, user: str | None) -> None:
        with self._lock:
            self.senders[user or ""] += 1

    def busiest(self) -> tuple[str, int] | None:
        """The user that put the most messages into the stream since the book was made."""
        with self._lock:
            found = self.senders.most_common(1)
        return found[0] if found else None


STREAM_PREFETCH = 1000
ACK_EVERY = 200
"""Presence messages acknowledged together (a stream takes acks only as credit)."""
FLOOD_GRACE = 0.5
"""Seconds a read of a followed stream waits for its marker before it may call the stream
flooded and answer from what it has."""
FLOOD_GRACE_CATCHING_UP = 2.0
"""The same for the first read, which starts the window's reading."""
FLOOD_RATE = 2000.0
"""Messages a second read meanwhile that mean a flood: workers announce every few seconds,
so even a thousand nodes send a few hundred a second."""


@dataclass(frozen=True)
class PresenceSync:
    """How far a roster read got (see :meth:`RosterFollower.sync`)."""

    complete: bool
    """Everything announced before the read began is in the book."""
    read: int = 0
    """Messages read from the stream while waiting."""
    seconds: float = 0.0
    live: bool = False
    """The stream had been followed to its end before (the book is only this read behind)."""


class IoThread(Protocol):
    """What the follower needs of the publisher's connection."""

    @property
    def where(self) -> str: ...

    def run_connected(
        self,
        operation: Callable[[pika.SelectConnection], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        """Runs ``operation`` on the I/O thread with the ready connection."""

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` on the I/O thread."""


class RosterFollower:
    """Follows the presence stream into ``book``, the first time from ``since`` (Unix time).
    :meth:`sync` is called from any thread; the rest runs on the I/O thread."""

    def __init__(self, book: RosterBook, since: float, io: IoThread) -> None:
        self.book = book
        self._io = io
        self._window = max(1.0, time.time() - since)
        """Seconds back from now that a reading starts."""
        self._start = since
        """Unix time the current reading started from."""
        self._connection: pika.SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._consuming = False
        self.live = False
        """A marker of this reading came back: what comes now is new."""
        self.read = 0
        self.invalid = 0
        """Messages that broke the contract (ignored)."""
        self._unacked = 0
        self._waiting: dict[str, Future[None]] = {}
        """Markers sent and not back yet, with their readers."""
        self._unsent: list[str] = []
        """Markers to send once the consumer is on (sent before, they could be missed)."""

    def sync(self, timeout: float) -> PresenceSync:
        """Waits until everything announced before this call is in the book.

        A flooded stream can hold the marker back for longer than anyone waits: once the
        wait is past :data:`FLOOD_GRACE` with more than :data:`FLOOD_RATE` messages a second
        coming in, or past ``timeout``, this returns an incomplete sync (the book holds what
        was read so far). Raises :class:`BrokerUnavailable` when the broker cannot be
        reached, or nothing was read in ``timeout`` of a stream never read to its end.
        """
        marker_id = uuid.uuid4().hex
        reader: Future[None] = Future()
        live, read_before = self.live, self.read
        grace = FLOOD_GRACE if live else FLOOD_GRACE_CATCHING_UP
        started = time.monotonic()
        self._io.run_connected(
            lambda connection: self._ask(connection, marker_id, reader), reader.set_exception
        )
        while True:
            try:
                reader.result(timeout=0.05)
            except FutureTimeout:
                pass
            else:
                return PresenceSync(True, live=live)
            spent = time.monotonic() - started
            read = self.read - read_before
            flooded = spent >= grace and read >= FLOOD_RATE * spent
            if not flooded and spent < timeout:
                continue
            self._io.call_soon(lambda: self._forget(marker_id))
            if not flooded and not live and read == 0:
                raise BrokerUnavailable(
                    f"reading the presence stream at {self._io.where} took longer than {timeout:g}s"
                )
            return PresenceSync(False, read=read, seconds=spent, live=live)

    def stop(self) -> None:
        """Ends the reading (on the I/O thread)."""
        if self._channel is not None and self._channel.is_open:
            self._channel.close()

    # -- the I/O thread -------------------------------------------------------------------------

    def _forget(self, marker_id: str) -> None:
        self._waiting.pop(marker_id, None)

    def _ask(self, connection: pika.SelectConnection, marker_id: str, reader: Future[None]) -> None:
        self._waiting[marker_id] = reader
        if connection is not self._connection or self._channel is None:
            self._unsent.append(marker_id)
            self._follow(connection)
        elif not self._consuming:
            self._unsent.append(marker_id)
        else:
            self._send_marker(self._channel, marker_id)

    def _follow(self, connection: pika.SelectConnection) -> None:
        """Starts reading the stream on ``connection``: the first reading from where the
        first reader asked, a later one (after a reconnection, or a closed channel) from the
        window back."""
        if self._connection is not None:
            self._start = time.time() - self._window
        if self._channel is not None and self._channel.is_open:
            self._channel.close()  # on a connection given up on, still closing
        self._connection = connection
        self._consuming = self.live = False
        self._unacked = 0
        start = self._start

        def on_message(
            reading: pika.channel.Channel,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            current = self._channel
            if current is None or reading is not current:
                return
            self.read += 1
            self._unacked += 1
            if self._unacked >= ACK_EVERY and current.is_open:
                current.basic_ack(method.delivery_tag, multiple=True)
                self._unacked = 0
            self._take(properties, body)

        def on_consuming(_frame: object) -> None:
            if channel is not self._channel:
                return
            self._consuming = True
            for marker_id in self._unsent:
                self._send_marker(channel, marker_id)
            self._unsent.clear()

        def on_open(_channel: pika.channel.Channel) -> None:
            channel.add_on_cancel_callback(lambda _frame: self._on_cancelled(channel))
            channel.basic_qos(
                prefetch_count=STREAM_PREFETCH,
                callback=lambda _frame: channel.basic_consume(
                    topo.PRESENCE_STREAM.name,
                    on_message,
                    arguments={"x-stream-offset": datetime.fromtimestamp(start, UTC)},
                    callback=on_consuming,
                ),
            )

        channel = connection.channel(on_open_callback=on_open)
        self._channel = channel
        channel.add_on_close_callback(self._on_close)

    def _on_cancelled(self, channel: pika.channel.Channel) -> None:
        """RabbitMQ cancels the reading when the stream is deleted under it, and keeps the
        channel open: nothing would be read again. The publisher's connection starts afresh,
        which declares the stream again (and the reading starts again on the new one)."""
        connection = self._connection
        if channel is not self._channel or connection is None or not connection.is_open:
            return
        log.warning(
            "RabbitMQ cancelled the reading of %s (deleted?); reconnecting to declare it again",
            topo.PRESENCE_STREAM.name,
        )
        connection.close()

    def _on_close(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        """The reading's channel closed (with its connection, or refused): its readers fail."""
        if channel is not self._channel:
            return
        self._channel = None
        self._consuming = self.live = False
        waiting, self._waiting = self._waiting, {}
        self._unsent.clear()
        error = BrokerUnavailable(
            f"reading the presence stream at {self._io.where} failed: {describe(reason)}"
        )
        for reader in waiting.values():
            if not reader.done():
                reader.set_exception(error)

    def _send_marker(self, channel: pika.channel.Channel, marker_id: str) -> None:
        properties = pika.BasicProperties(content_type=CONTENT_TYPE, correlation_id=marker_id)
        channel.basic_publish(topo.PRESENCE.name, "", RosterMarker(marker_id).encode(), properties)

    def _take(self, properties: pika.BasicProperties, body: bytes) -> None:
        """One message of the stream: this follower's marker, or an announcement for the
        book (seen now once the reading is live; before that, when it says it was sent,
        within the reading's window)."""
        self.book.count(properties.user_id)
        reader = self._waiting.pop(properties.correlation_id or "", None)
        if reader is not None:
            self.live = True
            if not reader.done():
                reader.set_result(None)
            return
        try:
            message = decode_presence_stream(body)
        except InvalidMessage:
            self.invalid += 1
            return
        if isinstance(message, RosterMarker):
            return  # another reader's
        now = time.time()
        seen = now if self.live else min(now, max(message.last_seen, self._start))
        self.book.add(message, seen, horizon=now - self._window)
