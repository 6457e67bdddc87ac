"""The publisher's AMQP connection, the one that collects answers.

The connection lives on a thread of its own (the I/O thread, running pika's select loop),
so that no caller ever holds it while waiting: a ``request()`` made while other threads
wait for answers is published at once. Callers hand work to the loop with
``add_callback_threadsafe`` and wait on a future of their own. A request is published
from the caller's own thread instead when the shortcut beside this connection is free
(:mod:`publisher.caller_connection`, connected with the same broker URL): no thread is
crossed.

Requests are published with publisher confirms and ``mandatory``: ``publish_request``
returns once RabbitMQ has taken both copies (live and history, confirmed together, not
one after the other), and a request that no worker queue is bound to receive comes back
as :class:`NoNodes` instead of vanishing. Replies arrive on an exclusive queue bound to
the reply exchange under its own name; the queue keeps its name across reconnections.

A lost connection is opened again in the background (capped backoff), and at once when
a caller needs it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop

from contract import (
    CONTENT_TYPE,
    REPLY_QUEUE_PREFIX,
    BrokerUnavailable,
    InvalidMessage,
    NoNodes,
    RosterMarker,
    decode_presence_stream,
)
from contract import topology as topo
from contract.connection import (
    ACCESS_REFUSED,
    NOT_FOUND,
    BrokerTls,
    broker_candidates,
    declare,
    describe,
    where,
)
from publisher.caller_connection import CallerConnection, Unconfirmed, request_frames
from publisher.roster import RosterBook

log = logging.getLogger("puller.publisher.broker")

STREAM_PREFETCH = 1000
ACK_EVERY = 200
"""Presence messages acknowledged together (a stream takes acks only as credit)."""
FLOOD_GRACE = 0.5
"""Seconds a roster read of a followed stream waits for its marker before it may call the
stream flooded and answer from what it has."""
FLOOD_GRACE_CATCHING_UP = 2.0
"""The same for the first read, which starts the window's reading."""
FLOOD_RATE = 2000.0
"""Messages a second read meanwhile that mean a flood: workers announce every few seconds,
so even a thousand nodes send a few hundred a second."""
CLOSE_WAIT = 1.0
"""Seconds :meth:`PublisherBroker.close` waits for the broker to answer before dropping the
socket."""
CONFIRM_GRACE = 5.0
"""Seconds, beyond the connect timeout, that a request waits for RabbitMQ's confirms."""
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 10.0

ReplyHandler = Callable[[str | None, bytes], None]
"""Receives ``(correlation_id, body)`` of each reply, on the I/O thread."""


class _Lost(BrokerUnavailable):
    """The connection went away while an operation was in flight."""


@dataclass
class _Ticket:
    """One request's publishes, waiting for RabbitMQ's confirms."""

    future: Future[None]
    unconfirmed: int
    returned: bool = False
    refused: bool = False

    @property
    def in_history(self) -> bool:
        return self.unconfirmed_at_start == 2

    unconfirmed_at_start: int = 0

    def __post_init__(self) -> None:
        self.unconfirmed_at_start = self.unconfirmed


@dataclass
class _Connection:
    """One connection's state, on the I/O thread."""

    connection: pika.SelectConnection
    channel: pika.channel.Channel | None = None
    published: int = 0
    """Publishes on ``channel`` so far: its next delivery tag is this plus one."""
    tickets: dict[int, _Ticket | None] = field(default_factory=dict)
    by_request: dict[str, _Ticket] = field(default_factory=dict)
    declaring: topo.Declaration | None = None
    """What is being declared, until RabbitMQ says it is done."""


@dataclass(frozen=True)
class PresenceSync:
    """How far a roster read got (see :meth:`PublisherBroker.sync_presence`)."""

    complete: bool
    """Everything announced before the read began is in the book."""
    read: int = 0
    """Messages read from the stream while waiting."""
    seconds: float = 0.0
    live: bool = False
    """The stream had been followed to its end before (the book is only this read behind)."""


@dataclass
class _Follower:
    """The presence stream, followed into a roster book (the I/O thread's)."""

    book: RosterBook
    window: float
    """Seconds back from now that a reading starts."""
    start: float
    """Unix time the current reading started from."""
    current: _Connection | None = None
    channel: pika.channel.Channel | None = None
    consuming: bool = False
    live: bool = False
    """A marker of this reading came back: what comes now is new."""
    read: int = 0
    invalid: int = 0
    unacked: int = 0
    waiting: dict[str, tuple[Callable[[], None], Callable[[BaseException], None]]] = field(
        default_factory=dict
    )
    """Markers sent and not back yet: how to tell their readers it is done, or failed."""
    unsent: list[str] = field(default_factory=list)
    """Markers to send once the consumer is on (sent before, they could be missed)."""


class PublisherBroker:
    """One connection on its own thread; every public method is safe from any thread."""

    def __init__(
        self,
        amqp_url: str,
        connect_timeout: float,
        on_reply: ReplyHandler,
        heartbeat: int = 60,
        tls: BrokerTls | None = None,
    ) -> None:
        self._candidates = broker_candidates(
            amqp_url,
            tls=tls,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            blocked_timeout=max(connect_timeout, 30.0),
        )
        self._at = 0
        """The broker in use or being tried: an index into ``_candidates``."""
        self._round_errors: list[str] = []
        """Why each broker tried since the last connection refused it."""
        self.user: str = getattr(self._parameters.credentials, "username", "")
        """Who this connection publishes as: the AMQP ``user_id`` on every request, which
        RabbitMQ checks against the connection's user, so workers can trust it."""
        self._may_not_configure = False
        self._retired: list[Any] = []
        """Connections given up on that may still be closing (the I/O thread's)."""
        self._connect_timeout = connect_timeout
        self._on_reply = on_reply
        self.reply_queue = f"{REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"
        self._caller = CallerConnection(self.reply_queue, self.user, connect_timeout)
        """The shortcut for publishing requests from the caller's thread."""
        self._through_loop = 0
        """Requests being published through the I/O thread now (a hint for callers)."""
        self._counting = threading.Lock()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: IOLoop | None = None
        self._current: _Connection | None = None
        self._ready: _Connection | None = None
        self._connecting = False
        self._closed = False
        self._reconnect_timer: object | None = None
        self._delay = RECONNECT_FIRST_DELAY
        self._failures = 0
        self._last_error = "not connected yet"
        self._epoch = 0
        self._follower: _Follower | None = None

    @property
    def _parameters(self) -> pika.URLParameters:
        return self._candidates[self._at]

    @property
    def where(self) -> str:
        """The broker in use, or being tried."""
        return where(self._parameters)

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._ready is not None

    @property
    def shortcut_open(self) -> bool:
        """Whether a request would now be published from the caller's own thread (see
        :mod:`publisher.caller_connection`) rather than through the I/O thread."""
        return self._ready is not None and self._caller.open

    @property
    def last_error(self) -> str:
        with self._lock:
            return self._last_error

    @property
    def epoch(self) -> int:
        """How many times the connection has become ready: a change means a reconnection,
        and that replies sent in between may be lost."""
        with self._lock:
            return self._epoch

    # -- what callers use (any thread) --------------------------------------------------------

    def publish_request(self, body: bytes, request_id: str, history: bool = True) -> int:
        """Publishes the request to the live workers and (unless ``history`` is false: a
        check or a prune) to the history, and waits for the broker's confirm of both (sent
        together). Returns the :attr:`epoch` the reply queue had when it was published.
        Raises :class:`NoNodes` when no worker queue was bound, :class:`BrokerUnavailable`
        otherwise."""
        # A confirm takes milliseconds; one that does not come (a clustered stream that lost
        # its majority never confirms; RabbitMQ gives up after 30 s) must not hold the caller.
        wait = self._connect_timeout + CONFIRM_GRACE
        started = time.monotonic()
        epoch = self._epoch
        if self._ready is not None and not self._through_loop:
            # The shortcut: published from this thread, no thread crossed. Not while other
            # callers publish through the I/O thread: there, requests are written and
            # confirmed together, which serves many threads better than one shortcut.
            try:
                confirmed = self._caller.publish(body, request_id, history, wait)
            except Unconfirmed:
                raise self._unconfirmed(wait) from None
            if confirmed is not None:
                error = self._refusal(confirmed.returned, confirmed.refused, history)
                if error is not None:
                    raise error
                return epoch
        spent = time.monotonic() - started  # on a shortcut whose connection closed
        if wait - spent < 1.0:
            raise self._unconfirmed(wait)  # no time left to publish it again and be sure
        future: Future[None] = Future()
        published_in: list[int] = []

        def publish(current: _Connection) -> None:
            published_in.append(self._epoch)  # on the I/O thread, which alone changes it
            self._publish(current, body, request_id, future, history)

        with self._counting:
            self._through_loop += 1
        try:
            self._run_connected(publish, future.set_exception)
            future.result(timeout=wait - spent)
        except FutureTimeout:
            raise self._unconfirmed(wait) from None
        finally:
            with self._counting:
                self._through_loop -= 1
        return published_in[0] if published_in else self.epoch

    def _unconfirmed(self, wait: float) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"RabbitMQ at {self.where} did not confirm the request within {wait:g}s (a "
            "RabbitMQ cluster that lost most of its nodes cannot store it); it may or may "
            "not have been published"
        )

    def sync_presence(self, book: RosterBook, since: float, timeout: float) -> PresenceSync:
        """Follows the presence stream into ``book`` (the first time from ``since``, a Unix
        time; live from then on, and again from the same window back after a reconnection)
        and waits until everything announced before this call is in it.

        "Before this call" is a marker this call puts into the stream: the book has it all
        once the marker comes back. A flooded stream can hold the marker back for longer
        than anyone waits: once the wait is past :data:`FLOOD_GRACE` with more than
        :data:`FLOOD_RATE` messages a second coming in, or past ``timeout``, this returns an
        incomplete sync (the book holds what was read so far) instead of waiting on. Raises
        :class:`BrokerUnavailable` when the broker cannot be reached, or it read nothing in
        ``timeout`` of a stream it had never reached the end of.
        """
        marker_id = uuid.uuid4().hex
        future: Future[None] = Future()
        before = self._follower
        live = before is not None and before.book is book and before.live
        read_before = before.read if before is not None and before.book is book else 0
        grace = FLOOD_GRACE if live else FLOOD_GRACE_CATCHING_UP
        started = time.monotonic()
        self._run_connected(
            lambda c: self._sync(c, book, since, marker_id, future), future.set_exception
        )
        while True:
            try:
                future.result(timeout=0.05)
            except FutureTimeout:
                pass
            else:
                return PresenceSync(True, live=live)
            spent = time.monotonic() - started
            follower = self._follower
            read = follower.read - read_before if follower is not None else 0
            flooded = spent >= grace and read >= FLOOD_RATE * spent
            if not flooded and spent < timeout:
                continue
            self._forget_marker(marker_id)
            if not flooded and not live and read == 0:
                raise BrokerUnavailable(
                    f"reading the presence stream at {self.where} took longer than {timeout:g}s"
                )
            return PresenceSync(False, read=read, seconds=spent, live=live)

    def _forget_marker(self, marker_id: str) -> None:
        loop = self._loop
        follower = self._follower
        if loop is not None and follower is not None:
            loop.add_callback_threadsafe(lambda: follower.waiting.pop(marker_id, None))

    def wait_connected(self, timeout: float) -> bool:
        """Asks for a connection now, and waits up to ``timeout`` for it."""
        try:
            self._wait_ready(time.monotonic() + timeout, fail_on_error=False)
        except BrokerUnavailable:
            return False
        return True

    def close(self) -> None:
        self._caller.close()
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.add_callback_threadsafe(self._shut_down)
        thread.join(timeout=10)

    # -- getting a connection -----------------------------------------------------------------

    def _run_connected(
        self,
        operation: Callable[[_Connection], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        """Runs ``operation`` on the I/O thread with a ready connection; waits at most the
        connect timeout per broker for one (failing at once when every broker was tried
        and failed; a broker that accepts the connection and says nothing takes the whole
        timeout before the next is tried). If the connection is gone by the time the loop
        runs it, ``on_lost`` gets the error."""
        deadline = time.monotonic() + self._connect_timeout * len(self._candidates)
        self._wait_ready(deadline, fail_on_error=True)
        loop = self._loop
        if loop is None:
            raise BrokerUnavailable(f"the publisher for {self.where} is closed")

        def run() -> None:
            current = self._ready
            if current is None or current.channel is None or not current.channel.is_open:
                on_lost(_Lost(f"lost the connection to RabbitMQ at {self.where}"))
                return
            operation(current)

        loop.add_callback_threadsafe(run)

    def _wait_ready(self, deadline: float, fail_on_error: bool) -> None:
        started = time.monotonic()
        with self._lock:
            if self._closed:
                raise BrokerUnavailable(f"the publisher for {self.where} is closed")
            self._start_locked()
            failures = self._failures
            while self._ready is None:
                if fail_on_error and self._failures > failures:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(min(remaining, 0.5))
            if self._ready is not None:
                return
            error = self._last_error
            if self._failures == failures:  # an attempt is still running
                error = f"no broker answered within {deadline - started:.0f}s"
        at = f" at {self.where}" if len(self._candidates) == 1 else ""
        raise BrokerUnavailable(
            f"cannot connect to RabbitMQ{at}: {error}. "
            "Check PULLER_AMQP_URL and that RabbitMQ is running."
        )

    def _start_locked(self) -> None:
        """Starts the I/O thread on first use, and asks for a connection now."""
        if self._thread is None:
            self._loop = IOLoop()
            self._thread = threading.Thread(
                target=self._run_loop, args=(self._loop,), name="puller-publisher-io", daemon=True
            )
            self._thread.start()
        if self._ready is None and not self._connecting and self._loop is not None:
            self._connecting = True
            self._loop.add_callback_threadsafe(self._connect_now)

    # -- the I/O thread -------------------------------------------------------------------------

    @staticmethod
    def _run_loop(loop: IOLoop) -> None:
        try:
            loop.start()
        finally:
            loop.close()  # its poller and its wake-up socket pair

    def _connect_now(self) -> None:
        loop = self._loop
        if loop is None or self._closed:
            return
        if self._reconnect_timer is not None:
            loop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        if self._current is not None:
            return  # an attempt is under way
        connection = pika.SelectConnection(
            self._parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=loop,
        )
        self._current = _Connection(connection)

    def _on_open(self, connection: Any) -> None:
        current = self._current
        if current is None or current.connection is not connection:
            return
        connection.channel(on_open_callback=lambda channel: self._on_channel(current, channel))

    def _on_channel(self, current: _Connection, channel: pika.channel.Channel) -> None:
        current.channel = channel
        channel.add_on_close_callback(lambda _ch, reason: self._on_channel_closed(current, reason))
        channel.add_on_return_callback(
            lambda _ch, _method, properties, _body: self._on_return(current, properties)
        )
        channel.confirm_delivery(
            lambda frame: self._on_confirm(current, frame),
            callback=lambda _frame: self._declare(current, self._declarations()),
        )

    def _declarations(self) -> list[tuple[topo.Declaration, bool]]:
        """What to declare, each with whether only to check that it exists: a user without
        configure rights on the shared topology (see ``puller broker-setup``) checks the
        exchanges and streams (bindings have no passive form: the administrator's)."""
        checking = self._may_not_configure
        shared = [
            (item, checking)
            for item in topo.publisher_shared()
            if not (checking and isinstance(item, topo.Binding))
        ]
        own = [(item, False) for item in topo.publisher_declarations(self.reply_queue)]
        return shared + own

    def _declare(self, current: _Connection, todo: list[tuple[topo.Declaration, bool]]) -> None:
        """Declares the topology one item after another, then consumes the reply queue."""
        channel = current.channel
        if channel is None:
            return
        if not todo:
            channel.basic_consume(
                self.reply_queue,
                lambda _ch, _method, properties, body: self._hand_over_reply(
                    properties.correlation_id, body
                ),
                auto_ack=True,
                callback=lambda _frame: self._became_ready(current),
            )
            return
        (item, passive), rest = todo[0], todo[1:]
        current.declaring = item

        def then(_frame: object) -> None:
            current.declaring = None
            self._declare(current, rest)

        if passive:
            declare(channel, item, callback=then, passive=True)
        else:
            declare(channel, item, callback=then)

    def _hand_over_reply(self, correlation_id: str | None, body: bytes) -> None:
        """A failure in whoever takes the reply must not reach pika: it would drop the
        connection, and every publish waiting for a confirm with it."""
        try:
            self._on_reply(correlation_id, body)
        except Exception:
            log.exception("handling a reply failed; the reply is dropped")

    def _became_ready(self, current: _Connection) -> None:
        with self._lock:
            if self._current is not current:
                return
            self._ready = current
            self._connecting = False
            self._delay = RECONNECT_FIRST_DELAY
            self._round_errors = []
            self._epoch += 1
            epoch = self._epoch
            self._lock.notify_all()
        self._caller.aim_at(self._parameters)
        if epoch > 1:
            log.info("reconnected to RabbitMQ at %s", self.where)

    def _on_open_error(self, connection: Any, error: BaseException) -> None:
        reason = describe(error)
        count = len(self._candidates)
        self._round_errors.append(f"{self.where}: {reason}")
        self._at = (self._at + 1) % count
        if len(self._round_errors) < count:
            # Another node of the cluster is still to be tried: at once, and not a
            # failure for whoever waits for the connection.
            self._delay = 0.0
            self._lost(connection, reason, learning=True)
            return
        summary = (
            reason
            if count == 1
            else (f"none of the {count} brokers answered: " + "; ".join(self._round_errors))
        )
        self._round_errors = []
        self._lost(connection, summary)

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        current = self._current
        if (
            len(self._candidates) > 1
            and current is not None
            and current.connection is connection
            and self._ready is current
        ):
            # A connection that worked is gone: fail over to the next node at once.
            self._at = (self._at + 1) % len(self._candidates)
            self._delay = 0.0
        self._lost(connection, describe(reason))

    def _on_channel_closed(self, current: _Connection, reason: BaseException) -> None:
        if current.connection.is_open:
            current.connection.close()  # one channel is the connection: start afresh
        error = describe(reason)
        code = getattr(reason, "reply_code", None)
        item = current.declaring
        if item is not None and code == ACCESS_REFUSED and not self._may_not_configure:
            # Learnt once: from the next attempt (at once) on, shared things are checked;
            # not a failure for whoever waits for the connection.
            self._may_not_configure = True
            self._delay = 0.0
            self._lost(current.connection, error, learning=True)
            return
        if item is not None and code == NOT_FOUND:
            error = (
                f"{_what(item)} does not exist, and user {self.user!r} may not declare it: "
                "declare puller's topology as an administrator (`puller broker-setup`)"
            )
        self._lost(current.connection, error)

    def _lost(self, connection: Any, error: str, learning: bool = False) -> None:
        current = self._current
        if current is None or current.connection is not connection:
            return
        self._current = None
        self._caller.aim_at(None)  # the reply queue goes with this connection
        # A connection given up on may still be closing: closing the publisher waits for it.
        self._retired = [c for c in self._retired if not c.is_closed]
        if not connection.is_closed:
            self._retired.append(connection)
        lost = _Lost(f"lost the connection to RabbitMQ at {self.where}: {error}")
        for ticket in {id(t): t for t in current.tickets.values() if t is not None}.values():
            if not ticket.future.done():
                ticket.future.set_exception(
                    _Lost(
                        f"lost the connection to RabbitMQ at {self.where} before it confirmed "
                        f"the request ({error}); it may or may not have been published"
                    )
                )
        follower = self._follower
        if follower is not None and follower.current is current:
            follower.channel = None
            follower.consuming = follower.live = False
            waiting, follower.waiting = follower.waiting, {}
            follower.unsent.clear()
            for _, fail_read in waiting.values():
                fail_read(lost)
        with self._lock:
            was_ready = self._ready is current
            self._ready = None
            if not learning:
                self._connecting = False  # a caller that needs it now may try at once
                self._failures += 1
                self._last_error = error
            self._lock.notify_all()
            closed = self._closed
        if was_ready and not closed:
            log.warning("lost the connection to RabbitMQ at %s: %s", self.where, error)
        if closed:
            return
        loop = self._loop
        if loop is not None:
            delay = self._delay
            self._delay = min(max(delay * 2, RECONNECT_FIRST_DELAY), RECONNECT_MAX_DELAY)
            self._reconnect_timer = loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        self._reconnect_timer = None
        with self._lock:
            self._connecting = True
        self._connect_now()

    def _publish(
        self,
        current: _Connection,
        body: bytes,
        request_id: str,
        future: Future[None],
        history: bool = True,
    ) -> None:
        """Live first (so a worker meets the live copy before the history's and skips the
        latter at no cost); a request that reached no worker is still recorded."""
        channel = current.channel
        if channel is None or not channel.is_open:
            future.set_exception(_Lost(f"lost the connection to RabbitMQ at {self.where}"))
            return
        connection = current.connection
        frames, count = request_frames(
            channel.channel_number,
            connection._body_max_length,  # noqa: SLF001 - frame_max, as tuned
            body,
            request_id,
            self.reply_queue,
            self.user,
            history,
        )
        ticket = _Ticket(future, unconfirmed=count)
        current.by_request[request_id] = ticket
        for _ in range(count):
            current.published += 1
            current.tickets[current.published] = ticket
        connection._output_marshaled_frames([frames])  # noqa: SLF001 - written as one

    def _send(
        self,
        current: _Connection,
        ticket: _Ticket | None,
        exchange: str,
        body: bytes,
        properties: pika.BasicProperties,
        mandatory: bool = False,
    ) -> None:
        channel = current.channel
        if channel is None:
            return
        current.published += 1
        current.tickets[current.published] = ticket
        channel.basic_publish(exchange, "", body, properties, mandatory=mandatory)

    def _on_return(self, current: _Connection, properties: pika.BasicProperties) -> None:
        ticket = current.by_request.get(properties.correlation_id or "")
        if ticket is not None:
            ticket.returned = True

    def _on_confirm(self, current: _Connection, frame: pika.frame.Method) -> None:
        method = frame.method
        refused = isinstance(method, pika.spec.Basic.Nack)
        tags = (
            [t for t in current.tickets if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            ticket = current.tickets.pop(tag, None)
            if ticket is None:
                continue
            ticket.refused |= refused
            ticket.unconfirmed -= 1
            if ticket.unconfirmed == 0:
                self._settle(current, ticket)

    def _settle(self, current: _Connection, ticket: _Ticket) -> None:
        for request_id, candidate in list(current.by_request.items()):
            if candidate is ticket:
                del current.by_request[request_id]
        if ticket.future.done():
            return
        error = self._refusal(ticket.returned, ticket.refused, ticket.in_history)
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(None)

    def _refusal(self, returned: bool, refused: bool, in_history: bool) -> Exception | None:
        """What RabbitMQ's confirms of a request mean for the caller, if not success."""
        if refused:
            return BrokerUnavailable(
                f"RabbitMQ at {self.where} refused the request (nack); see the broker's log"
            )
        if returned:
            return NoNodes(
                f"no nodes: no worker queue is bound to exchange {topo.PULLS.name!r} at "
                f"{self.where}, so no node received the request. Start puller-worker on "
                "the nodes (with the same PULLER_AMQP_URL and vhost)."
                + (
                    " The request is in the history, so workers that start within its "
                    "window will still pull the image."
                    if in_history
                    else ""
                )
            )
        return None

    def _sync(
        self,
        current: _Connection,
        book: RosterBook,
        since: float,
        marker_id: str,
        future: Future[None],
    ) -> None:
        follower = self._follower
        if follower is None or follower.book is not book:
            follower = _Follower(book, window=max(1.0, time.time() - since), start=since)
            self._follower = follower

        def done() -> None:
            if not future.done():
                future.set_result(None)

        def fail(error: BaseException) -> None:
            if not future.done():
                reason = f"reading the presence stream at {self.where} failed: {error}"
                future.set_exception(BrokerUnavailable(reason))

        follower.waiting[marker_id] = (done, fail)
        if follower.current is not current or follower.channel is None:
            follower.unsent.append(marker_id)
            self._follow(current, follower)
        elif not follower.consuming:
            follower.unsent.append(marker_id)
        else:
            self._send_marker(current, marker_id)

    def _send_marker(self, current: _Connection, marker_id: str) -> None:
        self._send(
            current,
            None,
            topo.PRESENCE.name,
            RosterMarker(marker_id).encode(),
            pika.BasicProperties(content_type=CONTENT_TYPE, correlation_id=marker_id),
        )

    def _follow(self, current: _Connection, follower: _Follower) -> None:
        """Starts reading the presence stream on ``current``: from the window back (the
        first time, from where the first caller asked)."""
        if follower.current is not None:  # a reading before, on a connection now gone
            follower.start = time.time() - follower.window
        follower.current = current
        follower.channel = None
        follower.consuming = follower.live = False
        follower.unacked = 0
        start = follower.start

        def on_message(
            channel: pika.channel.Channel,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            reading = follower.channel
            if reading is None or channel is not reading:
                return
            follower.read += 1
            follower.unacked += 1
            if follower.unacked >= ACK_EVERY and reading.is_open:
                reading.basic_ack(method.delivery_tag, multiple=True)
                follower.unacked = 0
            self._take_presence(follower, properties, body)

        def on_consuming(_frame: object) -> None:
            follower.consuming = True
            for marker_id in follower.unsent:
                self._send_marker(current, marker_id)
            follower.unsent.clear()

        def on_close(channel: pika.channel.Channel, reason: BaseException) -> None:
            if channel is not follower.channel:
                return
            follower.channel = None
            follower.consuming = follower.live = False
            waiting, follower.waiting = follower.waiting, {}
            follower.unsent.clear()
            for _, fail in waiting.values():
                fail(reason)

        def on_channel(channel: pika.channel.Channel) -> None:
            if follower.current is not current:
                channel.close()
                return
            follower.channel = channel
            channel.add_on_close_callback(on_close)
            channel.basic_qos(
                prefetch_count=STREAM_PREFETCH,
                callback=lambda _frame: channel.basic_consume(
                    topo.PRESENCE_STREAM.name,
                    on_message,
                    arguments={"x-stream-offset": datetime.fromtimestamp(start, UTC)},
                    callback=on_consuming,
                ),
            )

        current.connection.channel(on_open_callback=on_channel)

    def _take_presence(
        self, follower: _Follower, properties: pika.BasicProperties, body: bytes
    ) -> None:
        """One message of the presence stream: this publisher's marker, or an announcement
        for the book (when it counts as seen: now, once the reading is live; before that,
        when it says it was sent, within the reading's window)."""
        follower.book.count(properties.user_id)
        marker = follower.waiting.pop(properties.correlation_id or "", None)
        if marker is not None:
            follower.live = True
            marker[0]()
            return
        try:
            message = decode_presence_stream(body)
        except InvalidMessage:
            follower.invalid += 1
            return
        if isinstance(message, RosterMarker):
            return  # another reader's
        now = time.time()
        seen = now if follower.live else min(now, max(message.last_seen, follower.start))
        follower.book.add(message, seen, horizon=now - follower.window)

    def invalid_presence(self) -> int:
        """Presence messages that broke the contract, read so far (ignored)."""
        follower = self._follower
        return follower.invalid if follower is not None else 0

    def _shut_down(self) -> None:
        """Closes the connection, then stops the loop once it is closed. A broker that does
        not answer the close (one whose cluster lost its majority), or a connection still
        opening, gets its socket dropped after a moment: nothing is left open."""
        loop = self._loop
        if loop is None:
            return
        current = self._current
        connections = list(self._retired)
        if current is not None:
            connections.append(current.connection)
            if current.connection.is_open:
                current.connection.close()
        started = time.monotonic()

        def stop_when_closed(dropped: bool) -> None:
            waited = time.monotonic() - started
            open_ones = [c for c in connections if not c.is_closed]
            if not open_ones or waited > 2 * CLOSE_WAIT:
                loop.stop()
                return
            if waited > CLOSE_WAIT and not dropped:
                for connection in open_ones:
                    with contextlib.suppress(Exception):  # whatever state pika is in
                        connection._adapter_disconnect_stream()  # noqa: SLF001
                dropped = True
            loop.call_later(0.02, lambda: stop_when_closed(dropped))

        stop_when_closed(False)


def _what(item: topo.Declaration) -> str:
    if isinstance(item, topo.Binding):
        return f"what {item.queue} is bound to ({item.exchange})"
    return item.name
