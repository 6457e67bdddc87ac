"""The publisher's AMQP connection: one, on a thread of its own.

The connection lives on the I/O thread (pika's select loop), so that no caller ever holds
it while waiting: a ``request()`` made while other threads wait for answers is published
at once. Callers hand work to the loop with ``add_callback_threadsafe`` and wait on a
future of their own.

Requests are published with publisher confirms and ``mandatory``: ``publish_request``
returns once RabbitMQ has taken both copies (live and history, published together and
confirmed together), and a request that no worker queue is bound to receive comes back as
:class:`NoNodes` instead of vanishing. A history copy RabbitMQ cannot route yet is published
again (see :mod:`publisher.request_channel`); one it never takes is counted
(:attr:`PublisherBroker.history_unrouted`). Replies arrive on an exclusive queue bound to the
reply exchange under its own name; the queue keeps its name across reconnections.

A lost connection is opened again in the background (capped backoff), and at once when a
caller needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import pika
import pika.channel
import pika.exceptions
from pika.adapters.select_connection import IOLoop

from contract import REPLY_QUEUE_PREFIX, BrokerUnavailable
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
from publisher.request_channel import RequestChannel
from publisher.roster import PresenceSync, RosterBook, RosterFollower

log = logging.getLogger("puller.publisher.broker")

CLOSE_WAIT = 1.0
"""Seconds :meth:`PublisherBroker.close` waits for the broker to answer before shutting
the socket down."""
CONFIRM_GRACE = 5.0
"""Seconds, beyond the connect timeout, that a request waits for RabbitMQ's confirms."""
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 10.0

ReplyHandler = Callable[[str | None, bytes], None]
"""Receives ``(correlation_id, body)`` of each reply, on the I/O thread."""


class _Lost(BrokerUnavailable):
    """The connection went away while an operation was in flight."""


@dataclass
class _Connection:
    """One connection's state, on the I/O thread."""

    connection: pika.SelectConnection
    requests: RequestChannel | None = None
    declaring: topo.Declaration | None = None
    """What is being declared, until RabbitMQ says it is done."""


class _Loop(IOLoop):  # type: ignore[misc]  # pika ships no type information
    """pika's select loop, knowing the sockets it watches. pika closes a connection's socket
    only once the broker answers the close; closing shuts down those that do not answer."""

    def __init__(self) -> None:
        super().__init__()
        self.sockets: set[int] = set()

    def add_handler(self, fd: int, handler: Callable[[int, int], None], events: int) -> None:
        super().add_handler(fd, handler, events)
        self.sockets.add(fd)

    def remove_handler(self, fd: int) -> None:
        self.sockets.discard(fd)
        super().remove_handler(fd)

    def shut_down_sockets(self) -> None:
        """pika then reads the end of the stream and closes each connection itself."""
        for fd in list(self.sockets):
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as duplicate:
                duplicate.shutdown(socket.SHUT_RDWR)


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
        self._connect_timeout = connect_timeout
        self._on_reply = on_reply
        self.reply_queue = f"{REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: _Loop | None = None
        self._current: _Connection | None = None
        self._ready: _Connection | None = None
        self._connecting = False
        self._closed = False
        self._reconnect_timer: object | None = None
        self._delay = RECONNECT_FIRST_DELAY
        self._failures = 0
        self._last_error = "not connected yet"
        self._epoch = 0
        self._follower: RosterFollower | None = None
        self._history_unrouted = 0
        self._history_resent = 0

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
    def last_error(self) -> str:
        with self._lock:
            return self._last_error

    @property
    def history_unrouted(self) -> int:
        """Requests published (and confirmed) whose history copy RabbitMQ could not route
        into the history stream, however often it was published again: a node away then
        will not catch up on them."""
        with self._lock:
            return self._history_unrouted

    @property
    def history_resent(self) -> int:
        """History copies RabbitMQ returned (could not route) and that were sent again."""
        with self._lock:
            return self._history_resent

    def _count_history_return(self, given_up: bool) -> None:
        with self._lock:
            if given_up:
                self._history_unrouted += 1
            else:
                self._history_resent += 1

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
        future: Future[None] = Future()
        published_in: list[int] = []

        def publish(requests: RequestChannel) -> None:
            published_in.append(self._epoch)  # on the I/O thread, which alone changes it
            requests.publish(body, request_id, history, future)

        self._run_connected(publish, future.set_exception)
        try:
            future.result(timeout=wait)
        except FutureTimeout:
            raise self._unconfirmed(wait) from None
        return published_in[0] if published_in else self.epoch

    def _unconfirmed(self, wait: float) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"RabbitMQ at {self.where} did not confirm the request within {wait:g}s (a "
            "RabbitMQ cluster that lost most of its nodes cannot store it); it may or may "
            "not have been published"
        )

    def sync_presence(self, book: RosterBook, since: float, timeout: float) -> PresenceSync:
        """Follows the presence stream into ``book`` (the first time from ``since``, a Unix
        time) and waits until everything announced before this call is in it; see
        :meth:`RosterFollower.sync`."""
        with self._lock:
            replaced = follower = self._follower
            if follower is None or follower.book is not book:
                follower = self._follower = RosterFollower(book, since, self)
        if replaced is not None and replaced is not follower:
            self.call_soon(replaced.stop)
        return follower.sync(timeout)

    def invalid_presence(self) -> int:
        """Presence messages that broke the contract, read so far (ignored)."""
        follower = self._follower
        return follower.invalid if follower is not None else 0

    def wait_connected(self, timeout: float) -> bool:
        """Asks for a connection now, and waits up to ``timeout`` for it."""
        try:
            self._wait_ready(time.monotonic() + timeout, fail_on_error=False)
        except BrokerUnavailable:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.add_callback_threadsafe(self._shut_down)
        thread.join(timeout=10)

    def run_connected(
        self,
        operation: Callable[[pika.SelectConnection], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        """Runs ``operation`` on the I/O thread with the ready connection (see
        :meth:`_run_connected`)."""
        self._run_connected(lambda requests: operation(requests.channel.connection), on_lost)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` on the I/O thread, unless the publisher is closed."""
        with self._lock:
            if self._loop is not None and not self._closed:
                self._loop.add_callback_threadsafe(callback)

    # -- getting a connection -----------------------------------------------------------------

    def _run_connected(
        self,
        operation: Callable[[RequestChannel], None],
        on_lost: Callable[[BaseException], None],
    ) -> None:
        """Runs ``operation`` on the I/O thread with a ready connection's channel; waits at
        most the connect timeout per broker for one (failing at once when every broker was
        tried and failed; a broker that accepts the connection and says nothing takes the
        whole timeout before the next is tried). If the connection is gone by the time the
        loop runs it, ``on_lost`` gets the error."""
        deadline = time.monotonic() + self._connect_timeout * len(self._candidates)
        self._wait_ready(deadline, fail_on_error=True)
        loop = self._loop
        if loop is None:
            raise BrokerUnavailable(f"the publisher for {self.where} is closed")

        def run() -> None:
            current = self._ready
            requests = current.requests if current is not None else None
            if requests is None or not requests.is_open:
                on_lost(_Lost(f"lost the connection to RabbitMQ at {self.where}"))
                return
            operation(requests)

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
            self._loop = _Loop()
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
        current.requests = RequestChannel(
            channel,
            self.where,
            self.reply_queue,
            self.user,
            on_history_returned=self._count_history_return,
        )
        channel.add_on_close_callback(lambda _ch, reason: self._on_channel_closed(current, reason))
        current.requests.confirming(lambda: self._declare(current, self._declarations()))

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
        if current.requests is None:
            return
        channel = current.requests.channel
        if not todo:
            channel.add_on_cancel_callback(lambda _frame: self._on_replies_cancelled(current))
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
            current.connection.close()  # requests go on this channel only: start afresh
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

    def _on_replies_cancelled(self, current: _Connection) -> None:
        """RabbitMQ cancels the reply queue's consumer when the queue is deleted under it (by
        an administrator, say) and keeps the channel open: no answer could come any more, so
        the connection starts afresh and declares the queue again."""
        if current.connection.is_open:
            log.warning(
                "RabbitMQ cancelled the consumer of reply queue %s (deleted?); reconnecting "
                "to declare it again",
                self.reply_queue,
            )
            current.connection.close()

    def _lost(self, connection: Any, error: str, learning: bool = False) -> None:
        current = self._current
        if current is None or current.connection is not connection:
            return
        self._current = None
        if current.requests is not None:
            current.requests.fail_all(
                _Lost(
                    f"lost the connection to RabbitMQ at {self.where} before it confirmed "
                    f"the request ({error}); it may or may not have been published"
                )
            )
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

    def _shut_down(self) -> None:
        """Closes the connection, then stops the loop once every socket is closed. A broker
        that does not answer the close (one whose cluster lost its majority) has its socket
        shut down after :data:`CLOSE_WAIT`: closing is bounded and leaves nothing open."""
        loop = self._loop
        if loop is None:
            return
        current = self._current
        if current is not None:
            with contextlib.suppress(pika.exceptions.ConnectionWrongStateError):
                current.connection.close()  # one still opening is dropped at once
        started = time.monotonic()

        def stop_when_closed() -> None:
            waited = time.monotonic() - started
            if not loop.sockets or waited > 2 * CLOSE_WAIT:
                loop.stop()
                return
            if waited > CLOSE_WAIT:
                loop.shut_down_sockets()
            loop.call_later(0.02, stop_when_closed)

        stop_when_closed()


def _what(item: topo.Declaration) -> str:
    if isinstance(item, topo.Binding):
        return f"what {item.queue} is bound to ({item.exchange})"
    return item.name
