"""The worker's AMQP connection: the only module of the worker that imports pika.

One thread owns the connection: the one that calls :meth:`WorkerBroker.connect` and then
:meth:`WorkerBroker.process_events`; every method that touches pika checks it is that
thread. Other threads use :meth:`answer`, :meth:`progress` and :meth:`call_soon`, which
hop onto the connection's thread through pika's ``add_callback_threadsafe`` (the one pika
call that is safe from another thread). So a pull that takes minutes runs elsewhere while
the connection keeps answering heartbeats.

While there is no connection, answers wait for the next one (every result; only the
latest progress of each request), and so do callbacks.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import structlog
from pika.adapters.blocking_connection import BlockingChannel as Channel

from contract import CONTENT_TYPE, BrokerUnavailable, NodeProgress, PullerError
from contract import topology as topo
from contract.connection import (
    ACCESS_REFUSED,
    CONNECTION_ERRORS,
    NOT_FOUND,
    PRECONDITION_FAILED,
    RESOURCE_LOCKED,
    BrokerTls,
    broker_candidates,
    broker_errors,
    declare,
    describe,
    run_until,
    where,
)
from contract.messages import Message
from worker.delivery import Delivery

log = structlog.get_logger("worker.broker")

LOST = "lost the connection to RabbitMQ"


class NodeNameInUse(PullerError):
    """Another worker holds this node's exclusive queue."""


@dataclass(frozen=True)
class HistoryReading:
    """One reading of the history stream: from where, and the marker put at its end."""

    start: int | str
    """A stream offset, or ``"first"`` / ``"last"``."""
    marker: bytes
    on_entry: Callable[[Delivery], None]


class WorkerBroker:
    """Connects, declares the worker's topology, consumes the node's queue, sends answers."""

    def __init__(
        self,
        amqp_url: str,
        node: str,
        prefetch: int,
        heartbeat: int,
        history_stream: topo.Queue | None = None,
        replay_prefetch: int = 1,
        tls: BrokerTls | None = None,
    ) -> None:
        self._candidates = broker_candidates(
            amqp_url,
            tls=tls,
            heartbeat=heartbeat,
            connect_timeout=10,
            blocked_timeout=max(60, 2 * heartbeat),
        )
        self._at = 0
        """The broker in use, or last tried: an index into ``_candidates``."""
        self._connected_once = False
        self._node = node
        self._prefetch = prefetch
        self._history_stream = history_stream
        self._replay_prefetch = replay_prefetch
        self._connection: pika.BlockingConnection | None = None
        self._channel: Channel | None = None
        self._history_channel: Channel | None = None
        self._presence_channel: Channel | None = None
        """Every presence announcement goes on it, in order (the last one, "leaving", after
        the first); in confirm mode, so that the first can be waited for."""
        self._arrived: bool | None = None
        """RabbitMQ's answer to the connection's first announcement (``None``: none yet)."""
        self._consumer_tag: str | None = None
        self._held: list[tuple[Callable[[Delivery], None], Delivery]] = []
        """Live deliveries held for the next process_events(): those that came while
        connecting, and those that came after the current slice's end (see ``take``)."""
        self._serve_until = 0.0
        """Live deliveries are served as they come until then (``time.monotonic()``)."""
        self._owner: int | None = None
        self._lock = threading.Lock()
        self._waiting_answers: list[tuple[Delivery, Message | None, bool]] = []
        self._waiting_progress: dict[tuple[str, str], tuple[Delivery, NodeProgress]] = {}
        self._waiting_calls: list[Callable[[], None]] = []
        self._hops = 0
        """Actions handed to the connection's thread and not yet run there."""
        self.queue = topo.node_queue_name(node)
        self.user: str = getattr(self._parameters.credentials, "username", "")
        self._presence_properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2, user_id=self.user or None
        )
        """Announcements carry the user RabbitMQ checks them against: readers can tell who
        put what into the presence stream."""
        self._may_not_configure = False
        """Learnt from RabbitMQ's refusal, once: from then on shared things are checked."""

    @property
    def where(self) -> str:
        return where(self._parameters)

    @property
    def connected(self) -> bool:
        connection = self._connection
        return connection is not None and connection.is_open

    # -- the connection's thread ------------------------------------------------------------

    def connect(self, on_live: Callable[[Delivery], None]) -> None:
        """Opens the connection, declares the topology, starts consuming the node's queue,
        then sends what waited for a connection. This thread owns the connection from now."""
        self.close()
        self._owner = threading.get_ident()
        self._serve_until = 0.0
        try:
            with broker_errors("cannot connect to RabbitMQ", self._parameters):
                try:
                    self._open_and_consume(on_live)
                except pika.exceptions.ChannelClosedByBroker as error:
                    if error.reply_code == RESOURCE_LOCKED:
                        raise NodeNameInUse(
                            f"queue {self.queue} is held by another connection: another worker "
                            f"with PULLER_NODE_NAME={self._node!r} is running against "
                            f"{self.where}. Give each node's worker its own name."
                        ) from None
                    raise BrokerUnavailable(
                        f"RabbitMQ at {self.where} refused: {error.reply_text}"
                    ) from None
        except PullerError:
            self.close()
            raise
        self._send_what_waited()

    @property
    def _parameters(self) -> pika.URLParameters:
        return self._candidates[self._at]

    def _open_any(self) -> pika.BlockingConnection:
        """A connection to the first broker that answers, starting after the one used last
        (a lost connection fails over to the next node of the cluster at once)."""
        count = len(self._candidates)
        first = (self._at + 1) % count if self._connected_once else self._at
        failures = []
        for step in range(count):
            index = (first + step) % count
            try:
                connection = pika.BlockingConnection(self._candidates[index])
            except CONNECTION_ERRORS as error:
                failures.append((where(self._candidates[index]), describe(error)))
                continue
            if count > 1 and failures:
                log.info("connected to another broker", broker=where(self._candidates[index]))
            self._at = index
            self._connected_once = True
            return connection
        self._at = first
        if count == 1:
            at, why = failures[0]
            raise BrokerUnavailable(f"cannot connect to RabbitMQ at {at}: {why}")
        raise BrokerUnavailable(
            f"cannot connect to any of {count} RabbitMQ brokers: "
            + "; ".join(f"{at}: {why}" for at, why in failures)
        )

    def _open_and_consume(self, on_live: Callable[[Delivery], None]) -> None:
        self._connection = self._open_any()
        channel = self._declare_own(self._declare_shared(self._connection.channel()))
        channel.basic_qos(prefetch_count=self._prefetch)
        # Live requests are consumed on the channel's non-blocking side: each delivery is
        # handed to ``on_live`` straight from the frame that carried it, inside the I/O
        # loop. Through the blocking channel it would be queued, dispatched after the loop
        # returned, and the loop (a timer, the daemon's checks) set up again for every
        # request: the part of a worker's CPU per request that the floor consumer did not
        # have (bench/README.md, "Broadcast round trip"). Deliveries that come before
        # connect() returns wait for the first process_events(), as they did.
        self._consumer_tag = channel._impl.basic_consume(  # noqa: SLF001 - see above
            self.queue, self._deliverer(channel, self._hold_until_served(on_live)), auto_ack=False
        )
        self._channel = channel
        # Methods on a channel are answered in order: once this passive declare is
        # answered, so is the consume (or the channel is closed, and this raises why).
        channel.queue_declare(self.queue, passive=True)
        # Opened before anything is published: a broker under a resource alarm reads
        # nothing more from a connection once it publishes.
        self._presence_channel = self._presence(self._connection.channel())

    def _declare_own(self, channel: Channel) -> Channel:
        """Declares the node's exclusive queue and its binding; returns the channel to go on
        with. RabbitMQ refuses it (405) when a queue of that name exists that is not this
        connection's: another worker's (exclusive: :class:`NodeNameInUse` is raised as it
        was), or a shared one somebody declared in its place, which would take this node's
        requests for good. That one is deleted, and the node's own declared."""
        own = topo.worker_declarations(self._node)
        try:
            _declare(channel, own)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != RESOURCE_LOCKED:
                raise
        else:
            return channel
        channel = self._open_connection().channel()
        # A passive declaration of another connection's exclusive queue is refused too
        # (405, raised to connect()); a shared one is answered, with its depth.
        found = channel.queue_declare(self.queue, passive=True).method
        log.warning(
            "the node's queue was declared by someone else, shared instead of exclusive: "
            "deleting it (the requests in it are in the history) and declaring this "
            "worker's own. Only a user that may configure it could: this worker's user, a "
            "worker user for any node, or an administrator; rotate the credentials if that "
            "was not you",
            queue=self.queue,
            user=self.user,
            messages=found.message_count,
            consumers=found.consumer_count,
        )
        channel.queue_delete(self.queue)
        _declare(channel, own)
        return channel

    def _presence(self, channel: Channel) -> Channel:
        self._arrived = None
        impl = channel._impl  # noqa: SLF001 - confirms without pika's blocking wait for each

        def on_confirm(frame: pika.frame.Method) -> None:
            if self._arrived is None and self._presence_channel is channel:
                self._arrived = isinstance(frame.method, pika.spec.Basic.Ack)

        def on_close(_channel: object, _reason: object) -> None:
            if self._arrived is None and self._presence_channel is channel:
                self._arrived = False

        impl.add_on_close_callback(on_close)
        impl.confirm_delivery(on_confirm, lambda _frame: None)
        return channel

    def _hold_until_served(self, on_live: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """Served at once within a ``process_events()`` slice, held otherwise. Held, a
        delivery stays unacknowledged, so a flood stops at the prefetch window: pika's loop
        returns only once its output is written, and requests answered at once (each with
        a reply to write) kept it going past its time limit for as long as they came, with
        the daemon's loop (liveness, presence, answers from other threads) waiting."""

        def take(delivery: Delivery) -> None:
            if time.monotonic() < self._serve_until:
                self._serve(on_live, delivery)
            else:
                self._held.append((on_live, delivery))

        return take

    def _serve(self, on_live: Callable[[Delivery], None], delivery: Delivery) -> None:
        """Hands a live delivery over. ``on_live`` never raises; if it did, the error would
        surface inside pika's frame handling and take the connection (and the worker)
        down with it: logged and the delivery refused instead."""
        try:
            on_live(delivery)
        except Exception:
            log.exception("serving a live request failed; refusing it")
            self.answer(delivery, None, refuse=True)

    def _declare_shared(self, channel: Channel) -> Channel:
        """Declares the shared topology (the history stream with this worker's retention);
        returns the channel to go on with. A user without configure rights (see ``puller
        broker-setup``) checks instead that the exchanges and streams exist. A history
        stream that exists with other retention is used as it is (RabbitMQ refuses to
        change it), with a warning."""
        stream = self._history_stream or topo.history_stream()
        shared = topo.shared_declarations(stream)
        if not self._may_not_configure:
            try:
                _declare(channel, shared)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code == PRECONDITION_FAILED:
                    log.warning(
                        "a stream exists with other settings (the history's retention, or "
                        "another version's presence stream); using it as it is",
                        error=error.reply_text,
                    )
                elif error.reply_code == ACCESS_REFUSED:
                    self._may_not_configure = True
                    log.info(
                        "this user may not declare puller's exchanges and streams; "
                        "checking that they exist",
                        user=self.user,
                    )
                else:
                    raise
                channel = self._open_connection().channel()
                if not self._may_not_configure:  # retention: the rest as usual
                    channel.queue_declare(stream.name, passive=True)
                    _declare(channel, [d for d in shared if d != stream])
                    return channel
            else:
                return channel
        return self._check_shared(channel, shared)

    def _check_shared(self, channel: Channel, shared: Iterable[topo.Declaration]) -> Channel:
        missing = []
        for item in shared:
            if isinstance(item, topo.Binding):
                continue  # bindings have no passive form; whoever declared them bound them
            try:
                declare(channel, item, passive=True)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code != NOT_FOUND:
                    raise
                missing.append(item.name)
                channel = self._open_connection().channel()
        if missing:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.where}: {', '.join(missing)} do not exist, and user "
                f"{self.user!r} may not declare them: declare puller's topology as an "
                "administrator (`puller broker-setup`) or once with a user that may"
            )
        return channel

    def _deliverer(
        self, channel: Channel, on_delivery: Callable[[Delivery], None], history: bool = False
    ) -> Callable[[Any, Any, Any, bytes], None]:
        def deliver(
            _channel: object,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            offset = (properties.headers or {}).get("x-stream-offset") if history else None
            on_delivery(
                Delivery(
                    body=body,
                    tag=method.delivery_tag,
                    reply_to=None if history else properties.reply_to,
                    correlation_id=None if history else properties.correlation_id,
                    source=channel,
                    history_offset=(offset if isinstance(offset, int) else -1) if history else None,
                    user_id=properties.user_id,
                )
            )

        return deliver

    def read_history(self, reading: HistoryReading) -> None:
        """Reads the history stream from ``reading.start`` on a channel of its own, and puts
        ``reading.marker`` at the stream's end. One reading at a time: a new one ends the last."""
        self._check_owner()
        self.stop_history()
        stream = self._history_stream or topo.history_stream()
        with broker_errors(LOST, self._parameters):
            channel = self._open_connection().channel()
            channel.basic_qos(prefetch_count=self._replay_prefetch)
            self._history_channel = channel
            channel.basic_consume(
                stream.name,
                self._deliverer(channel, reading.on_entry, history=True),
                auto_ack=False,
                arguments={"x-stream-offset": reading.start},
            )
            channel.basic_publish(  # through the exchange: a worker may not write to queues
                topo.HISTORY.name,
                routing_key="",
                body=reading.marker,
                properties=pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
            )

    def stop_history(self) -> None:
        """Stops reading the history stream, by closing its channel, not by cancelling the
        consumer: pika's cancel rejects the deliveries not yet dispatched, and a stream
        answers a reject by closing the whole connection. A closed channel's deliveries are
        simply dropped by the broker, and answers to them are not sent (:meth:`is_current`)."""
        self._check_owner()
        channel, self._history_channel = self._history_channel, None
        if channel is not None and channel.is_open:
            channel._impl.close()  # noqa: SLF001 - the blocking close cancels, as above

    def process_events(self, seconds: float) -> None:
        """Serves the connection (deliveries, callbacks, heartbeats) for up to ``seconds``."""
        self._check_owner()
        with broker_errors(LOST, self._parameters):
            self._serve_until = time.monotonic() + seconds
            held, self._held = self._held, []
            for on_live, delivery in held:
                self._serve(on_live, delivery)
            self._open_connection().process_data_events(time_limit=seconds)

    def announce(self, body: bytes) -> None:
        """Publishes a presence announcement into the presence stream (not waiting to hear
        that it is there)."""
        self._check_owner()
        with broker_errors(LOST, self._parameters):
            self._open_presence_channel().basic_publish(
                topo.PRESENCE.name, routing_key="", body=body, properties=self._presence_properties
            )

    def announce_arrival(self, body: bytes, timeout: float) -> bool | None:
        """The connection's first presence announcement: publishes it and waits up to
        ``timeout`` seconds for RabbitMQ to confirm that it is in the stream, so that a
        roster read after that lists this node. ``True`` when confirmed, ``False`` when
        refused, ``None`` when not answered in time (a broker under a resource alarm reads
        nothing from a connection that publishes; longer than ``timeout`` only if pika has
        more to write than the socket takes, until the blocked-connection timeout). Live
        deliveries that come meanwhile wait for :meth:`process_events`."""
        self.announce(body)
        with broker_errors(LOST, self._parameters):
            run_until(self._open_connection(), lambda: self._arrived is not None, timeout)
        return self._arrived

    def is_current(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` came on a channel that is still open: answers to it count."""
        return self._channel_of(delivery) is not None

    def stop_consuming(self) -> None:
        """Takes no more live requests or history entries."""
        self.stop_history()
        self._held = []  # unacknowledged: they go with the queue (and are in the history)
        self._serve_until = 0.0
        channel = self._channel
        if channel is not None and self._consumer_tag is not None:
            try:
                # Sent, not waited for: the queue is auto-delete (gone once cancelled), and
                # pika turns away what still comes for a cancelled consumer.
                channel._impl.basic_cancel(self._consumer_tag)  # noqa: SLF001 - consumed there
            except CONNECTION_ERRORS as error:
                log.warning("could not cancel the consumer", error=describe(error))
        self._consumer_tag = None

    def close(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
            self._hops = 0  # a closed connection runs none of them
            self._channel = self._history_channel = self._presence_channel = None
            self._held = []  # unacknowledged: the broker gives them to the next connection
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except CONNECTION_ERRORS as error:
                log.warning("error while closing the connection", error=describe(error))

    # -- any thread --------------------------------------------------------------------------

    def acknowledge(self, delivery: Delivery) -> Delivery:
        """Acks ``delivery`` now, before it is served, and returns it marked so that its
        answer is sent without a second ack. For warm-ups: unacked they would fill the
        prefetch window and hold a session's request back in the broker. Nothing is lost
        by it: the request is in the history, and the worker saves its place there only
        when it has nothing unanswered. Any thread."""
        self._on_connection_thread(
            lambda: self._send_ack(delivery),
            waiting=lambda: None,  # the channel is gone: the broker has put it back
        )
        return dataclasses.replace(delivery, acked=True)

    def answer(self, delivery: Delivery, result: Message | None, refuse: bool = False) -> None:
        """Replies ``result`` to the delivery's ``reply_to`` (if any) and acks the delivery;
        with ``refuse``, rejects it without requeue instead (a message that can never be
        served; a stream takes acks only). Any thread; kept for the next connection while
        there is none."""
        self._on_connection_thread(
            lambda: self._send_answer(delivery, result, refuse),
            waiting=lambda: self._waiting_answers.append((delivery, result, refuse)),
        )

    def progress(self, delivery: Delivery, message: NodeProgress) -> None:
        """Sends a progress report to the delivery's ``reply_to``. Any thread; while there is
        no connection only the latest of each request is kept."""
        reply_to = delivery.reply_to
        if not reply_to:
            return
        key = (reply_to, message.request_id)
        self._on_connection_thread(
            lambda: self._send_progress(delivery, message),
            waiting=lambda: self._waiting_progress.__setitem__(key, (delivery, message)),
        )

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` on the connection's thread, after what that thread is doing now."""
        self._on_connection_thread(
            callback, waiting=lambda: self._waiting_calls.append(callback), defer=True
        )

    @property
    def handing_over(self) -> int:
        """Answers and callbacks handed to the connection's thread, not yet run there: a
        worker that stops must serve the connection until this is 0, or lose them."""
        with self._lock:
            return self._hops

    def waiting(self) -> tuple[int, int, int]:
        """What waits for the next connection: answers, progress reports, callbacks."""
        with self._lock:
            return (
                len(self._waiting_answers),
                len(self._waiting_progress),
                len(self._waiting_calls),
            )

    # -- inside ------------------------------------------------------------------------------

    def _on_connection_thread(
        self, action: Callable[[], None], waiting: Callable[[], None], defer: bool = False
    ) -> None:
        if not defer and threading.get_ident() == self._owner and self.connected:
            action()
            return
        with self._lock:
            connection = self._connection
            if connection is None or not connection.is_open:
                waiting()
                return
            self._hops += 1

            def hop() -> None:
                try:
                    action()
                except Exception:  # raised here, it would stop pika's loop and the worker
                    log.exception("an action on the connection's thread failed")
                finally:
                    with self._lock:
                        self._hops -= 1

            try:
                connection.add_callback_threadsafe(hop)
            except CONNECTION_ERRORS as error:
                self._hops -= 1
                log.info("connection closing; keeping an answer for the next", error=str(error))
                waiting()

    def _send_what_waited(self) -> None:
        with self._lock:
            answers, self._waiting_answers = self._waiting_answers, []
            progress, self._waiting_progress = self._waiting_progress, {}
            calls, self._waiting_calls = self._waiting_calls, []
        if answers or progress or calls:
            log.info(
                "sending what waited for the connection",
                answers=len(answers),
                progress=len(progress),
                callbacks=len(calls),
            )
        for delivery, message in progress.values():
            self._send_progress(delivery, message)
        for delivery, result, refuse in answers:
            self._send_answer(delivery, result, refuse)
        for callback in calls:
            callback()

    def _send_ack(self, delivery: Delivery) -> None:
        channel = self._channel_of(delivery)
        if channel is None:
            return
        try:
            channel._impl.basic_ack(delivery.tag)  # noqa: SLF001 - see _send_answer
        except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
            log.warning("could not acknowledge; the connection was lost", error=describe(error))

    def _send_answer(self, delivery: Delivery, result: Message | None, refuse: bool) -> None:
        """Connection thread: the reply, then the ack, in one write. A reply to a delivery
        from a closed channel still goes out (the requester may be waiting); its ack cannot
        (the broker has already put the message back)."""
        try:
            frames: list[bytes] = []
            if result is not None and delivery.reply_to:
                try:
                    frames += self._reply_frames(
                        delivery.reply_to, delivery.correlation_id, result.encode()
                    )
                except (BrokerUnavailable, *CONNECTION_ERRORS):
                    raise
                except Exception:
                    log.exception(
                        "could not make the reply; acknowledging the request without it",
                        reply_to=_shown(delivery.reply_to),
                        correlation_id=_shown(delivery.correlation_id),
                    )
            channel = self._channel_of(delivery)
            if channel is not None and not delivery.acked:
                if refuse and delivery.history_offset is None:
                    reject = pika.spec.Basic.Reject(delivery.tag, requeue=False)
                    frames.append(pika.frame.Method(channel.channel_number, reject).marshal())
                else:
                    frames.append(ack_frame(channel.channel_number, delivery.tag))
            self._write(frames)
        except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
            log.warning("could not answer; the connection was lost", error=describe(error))

    def _send_progress(self, delivery: Delivery, message: NodeProgress) -> None:
        if not delivery.reply_to:
            return
        try:
            self._write(
                self._reply_frames(delivery.reply_to, delivery.correlation_id, message.encode())
            )
        except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
            log.info("progress not sent; the connection was lost", error=describe(error))
        except Exception:
            log.exception("could not make a progress report", reply_to=_shown(delivery.reply_to))

    def _reply_frames(self, reply_to: str, correlation_id: str | None, body: bytes) -> list[bytes]:
        """A reply's frames on the live channel, marshalled, not yet written."""
        number = self._open_channel().channel_number
        limit = self._open_connection()._impl._body_max_length  # noqa: SLF001 - frame_max, as tuned
        return reply_frames(number, reply_to, correlation_id, body, limit)

    def _write(self, frames: list[bytes]) -> None:
        """Connection thread: ``frames`` in one write when the loop next runs, which is at
        once (we are inside it). Going through the channels, pika writes every frame with
        a send of its own (a reply and its ack were four), and the blocking channel would
        flush each publish alone (a send and two poller changes); each send also wakes the
        broker. The channels' own checks are the callers': the connection and the
        channels are open."""
        if not frames:
            return
        connection = self._open_connection()._impl  # noqa: SLF001 - see above
        connection._output_marshaled_frames([b"".join(frames)])  # noqa: SLF001

    def _channel_of(self, delivery: Delivery) -> Channel | None:
        source = delivery.source
        for channel in (self._channel, self._history_channel):
            if channel is not None and channel.is_open and channel is source:
                return channel
        return None

    def _check_owner(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError(
                "pika was called off the connection's thread; use answer(), progress() or "
                "call_soon() from other threads"
            )

    def _open_connection(self) -> pika.BlockingConnection:
        if self._connection is None or not self._connection.is_open:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.where}")
        return self._connection

    def _open_channel(self) -> Channel:
        return _open(self._channel, self.where)

    def _open_presence_channel(self) -> Channel:
        return _open(self._presence_channel, self.where)


def _open(channel: Channel | None, where: str) -> Channel:
    if channel is None or not channel.is_open:
        reason = None if channel is None else channel._impl._closing_reason  # noqa: SLF001
        why = f" (closed: {reason})" if reason is not None else ""
        raise BrokerUnavailable(f"no open channel to RabbitMQ at {where}{why}")
    return channel


# -- frames --------------------------------------------------------------------------------
# A worker sends a reply and an ack for every request. pika's frame objects spell out every
# property and argument in Python each time; these give the same bytes (checked against
# pika's in tests/unit/test_worker_broker.py) for the few shapes a worker sends.

_FRAME_END = bytes([pika.spec.FRAME_END])
_PROPERTIES = pika.spec.BasicProperties
_REPLY_FLAGS = _PROPERTIES.FLAG_CONTENT_TYPE | _PROPERTIES.FLAG_DELIVERY_MODE
_CONTENT_TYPE = bytes([len(CONTENT_TYPE)]) + CONTENT_TYPE.encode()


def reply_frames(
    number: int, reply_to: str, correlation_id: str | bytes | None, body: bytes, limit: int
) -> list[bytes]:
    """A reply's frames on channel ``number``: ``Basic.Publish`` to the reply exchange with
    routing key ``reply_to``, a content header (content type, delivery mode 1, correlation
    id) and the body in frames of at most ``limit`` bytes. The correlation id goes back as
    it came: pika gives one that is not UTF-8 as ``bytes``."""
    properties = _CONTENT_TYPE + b"\x01"
    flags = _REPLY_FLAGS
    if correlation_id is not None:
        encoded = correlation_id if isinstance(correlation_id, bytes) else correlation_id.encode()
        if len(encoded) > 255:
            raise ValueError("a correlation id is at most 255 bytes")
        properties += bytes([len(encoded)]) + encoded
        flags |= _PROPERTIES.FLAG_CORRELATION_ID
    header = struct.pack(">HxxQH", _PROPERTIES.INDEX, len(body), flags) + properties
    return [
        _publish_frame(number, reply_to),
        _frame(pika.spec.FRAME_HEADER, number, header),
        *(
            _frame(pika.spec.FRAME_BODY, number, body[start : start + limit])
            for start in range(0, len(body), limit)
        ),
    ]


def ack_frame(number: int, tag: int) -> bytes:
    """``Basic.Ack`` of delivery ``tag`` alone (not ``multiple``) on channel ``number``."""
    return _frame(
        pika.spec.FRAME_METHOD, number, struct.pack(">IQB", pika.spec.Basic.Ack.INDEX, tag, 0)
    )


@functools.lru_cache(maxsize=256)
def _publish_frame(number: int, reply_to: str) -> bytes:
    """The same for every reply to one publisher (its reply queue) on one channel."""
    method = pika.spec.Basic.Publish(exchange=topo.REPLIES.name, routing_key=reply_to)
    marshalled: bytes = pika.frame.Method(number, method).marshal()
    return marshalled


def _shown(value: object) -> str:
    """A peer's text for a log line, whatever it is."""
    return repr(value)[:200]


def _frame(kind: int, number: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, number, len(payload)) + payload + _FRAME_END


def _declare(channel: Channel, declarations: Iterable[topo.Declaration]) -> None:
    """Declares the given topology (see :mod:`contract.topology`) on a blocking channel."""
    for item in declarations:
        declare(channel, item)
