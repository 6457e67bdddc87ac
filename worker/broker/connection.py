"""The worker's AMQP connection (with :mod:`worker.broker.topology`, the only modules of the
worker that import pika; the history's end is read over the stream protocol by
:mod:`contract.stream_tail`).

One thread owns the connection: the one that calls :meth:`WorkerBroker.connect` and then
:meth:`WorkerBroker.process_events`; every method that touches pika checks it is that
thread. The connection is pika's asynchronous one, served by that thread a bounded time at
each call (:class:`~contract.connection.ServedConnection`): deliveries, confirms and closes
come as callbacks inside those calls, and every wait is bounded, even while RabbitMQ reads
nothing more. Other threads use :meth:`answer`, :meth:`progress` and :meth:`call_soon`,
which hop onto the connection's thread through pika's ``add_callback_threadsafe`` (the one
pika call that is safe from another thread), or wait for the next connection
(:mod:`worker.broker.outbox`). So a pull that takes minutes runs elsewhere while the connection
keeps answering heartbeats.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pika
import pika.exceptions
import pika.spec
import structlog

from contract import CONTENT_TYPE, BrokerUnavailable, NodeProgress, PullerError, stream_tail
from contract import topology as topo
from contract.connection import (
    CONNECTION_ERRORS,
    RESOURCE_LOCKED,
    SPREAD,
    Brokers,
    BrokerTls,
    ServedConnection,
    broker_candidates,
    broker_errors,
    describe,
    where,
)
from contract.messages import Message
from worker.broker.census import Census
from worker.broker.delivery import Delivery, HistoryReading, TailRead
from worker.broker.desired import DesiredLink
from worker.broker.outbox import Outbox
from worker.broker.topology import WorkerTopology

log = structlog.get_logger("worker.broker")

LOST = "lost the connection to RabbitMQ"
CONNECT_TIMEOUT = 10.0
ANSWER_WAIT = 30.0
"""The longest wait for RabbitMQ to answer one method while connecting."""
TAIL_TIMEOUT = 10.0
"""The longest a read of the history's end over the stream protocol takes."""
STREAM_PORT, STREAM_TLS_PORT = 5552, 5551
AMQP_PORT, AMQP_TLS_PORT = 5672, 5671

Channel = Any
"""A channel of pika's asynchronous connection (pika has no type hints)."""


class NodeNameInUse(PullerError):
    """Another worker holds this node's exclusive queue."""


class WorkerBroker(Outbox):
    """Connects, declares the worker's topology, consumes the node's queue, sends answers
    (from any thread: see :class:`~worker.broker.outbox.Outbox`)."""

    def __init__(
        self,
        amqp_url: str,
        node: str,
        prefetch: int,
        heartbeat: int,
        history_stream: topo.Queue | None = None,
        replay_prefetch: int = 1,
        tls: BrokerTls | None = None,
        stream_port: int | None = None,
        broker_order: str = SPREAD,
    ) -> None:
        super().__init__()
        blocked_timeout = max(60, 2 * heartbeat)
        listed = broker_candidates(
            amqp_url,
            tls=tls,
            heartbeat=heartbeat,
            connect_timeout=CONNECT_TIMEOUT,
            blocked_timeout=blocked_timeout,
        )
        self._brokers = Brokers(listed, broker_order, node)
        self._close_wait = blocked_timeout + CONNECT_TIMEOUT
        """A close RabbitMQ does not answer (it reads nothing from a connection it blocks)
        ends when pika's blocked-connection timeout drops the socket."""
        self._node = node
        self._prefetch = prefetch
        self._history_stream = history_stream
        self._replay_prefetch = replay_prefetch
        self._link: ServedConnection | None = None
        self._channel: Channel | None = None
        self._history_channel: Channel | None = None
        self._presence_channel: Channel | None = None
        """Every presence announcement goes on it, in order (the last one, "leaving", after
        the first); in confirm mode, so that the first can be waited for."""
        self._arrived: bool | None = None
        """RabbitMQ's answer to the connection's first announcement (``None``: none yet)."""
        self._consumer_tag: str | None = None
        self._held: list[tuple[Callable[[Delivery], None], Delivery]] = []
        """Deliveries held for the next process_events(): those that came while connecting
        or waiting, and those that came after the current slice's end (see ``take``)."""
        self._serve_until = 0.0
        """Deliveries are served as they come until then (``time.monotonic()``)."""
        self._owner: int | None = None
        self.queue = topo.node_queue_name(node)
        self.user: str = getattr(self._parameters.credentials, "username", "")
        self._presence_properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2, user_id=self.user or None
        )
        """Announcements carry the user RabbitMQ checks them against: readers can tell who
        put what into the presence stream."""
        self._topology = WorkerTopology(
            node, self.user, history_stream, self._call, self._new_channel, lambda: self.where
        )
        self._stream_port = stream_port
        self.desired = DesiredLink(
            self._open_link, self._check_owner, self.call_soon, self.read_tail, self.user
        )
        self.census = Census(lambda opened: self._open_link().channel(on_open=opened))
        self.tail_reads_off_leader = 0
        """Tail reads made on the node connected to because the stream's leader could not
        be reached (its copy may lag behind the leader's)."""

    @property
    def where(self) -> str:
        return where(self._parameters)

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.is_open

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
        return self._brokers.current

    def _open_any(self) -> ServedConnection:
        link, failed_over = self._brokers.open(partial(ServedConnection, answer_wait=ANSWER_WAIT))
        if failed_over:
            log.info("connected to another broker", broker=self.where)
        return link

    def _open_and_consume(self, on_live: Callable[[Delivery], None]) -> None:
        link = self._link = self._open_any()
        channel = self._topology.declare_own(self._topology.declare_shared(self._new_channel()))
        link.call(channel, partial(channel.basic_qos, prefetch_count=self._prefetch))
        channel.add_on_cancel_callback(partial(self._on_consumer_cancelled, channel))
        deliver = self._deliverer(channel, on_live)
        consuming = link.call(channel, partial(channel.basic_consume, self.queue, deliver))
        self._consumer_tag = consuming.method.consumer_tag
        self._channel = channel
        # Opened before anything is published: a broker under a resource alarm reads
        # nothing more from a connection once it publishes.
        self._arrived = None
        presence = self._new_channel()
        link.call(presence, partial(presence.confirm_delivery, self._on_confirm))
        self._presence_channel = presence
        self.census.join()

    def _deliverer(
        self, channel: Channel, on_delivery: Callable[[Delivery], None], history: bool = False
    ) -> Callable[[Any, Any, Any, bytes], None]:
        take = self._hold_until_served(on_delivery)

        def deliver(
            _channel: object,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            offset = (properties.headers or {}).get("x-stream-offset") if history else None
            delivery = Delivery(
                body=body,
                tag=method.delivery_tag,
                reply_to=None if history else properties.reply_to,
                correlation_id=None if history else properties.correlation_id,
                source=channel,
                history_offset=(offset if isinstance(offset, int) else -1) if history else None,
                user_id=properties.user_id,
            )
            try:
                take(delivery)
            except Exception as error:  # raised by process_events(), not inside pika's loop
                if self._link is not None:
                    self._link.fail(error)

        return deliver

    def _hold_until_served(
        self, on_delivery: Callable[[Delivery], None]
    ) -> Callable[[Delivery], None]:
        """Served at once within a ``process_events()`` slice, held otherwise. Held, a
        delivery stays unacknowledged, so a flood stops at the prefetch window, and the
        daemon's loop (liveness, presence, answers from other threads) gets its turn."""

        def take(delivery: Delivery) -> None:
            if time.monotonic() < self._serve_until:
                self._serve(on_delivery, delivery)
            else:
                self._held.append((on_delivery, delivery))

        return take

    def _serve(self, on_delivery: Callable[[Delivery], None], delivery: Delivery) -> None:
        """Hands a delivery over. A live request whose handling raises is logged and
        refused; a history entry's error is raised to process_events()' caller."""
        try:
            on_delivery(delivery)
        except Exception:
            if delivery.history_offset is not None:
                raise
            log.exception("serving a live request failed; refusing it")
            self.answer(delivery, None, refuse=True)

    def read_history(self, reading: HistoryReading) -> None:
        """Reads the history stream from ``reading.start`` on a channel of its own, and puts
        ``reading.marker``, if any, at the stream's end; one reading at a time: a new one
        ends the last. Returns at once: the channel opens, consumes, then publishes the
        marker as RabbitMQ answers, and a refusal is raised by the next
        :meth:`process_events`."""
        self._check_owner()
        self.stop_history()
        stream = self._history_stream or topo.history_stream()
        link = self._open_link()

        def opened(channel: Channel) -> None:
            if not self._reading(channel):
                return
            channel.add_on_cancel_callback(partial(self._on_consumer_cancelled, channel))
            try:
                channel.basic_qos(prefetch_count=self._replay_prefetch)
                channel.basic_consume(
                    stream.name,
                    self._deliverer(channel, reading.on_entry, history=True),
                    arguments={"x-stream-offset": reading.start},
                    callback=lambda _frame: consuming(channel),
                )
            except CONNECTION_ERRORS as error:
                link.fail(error)

        def consuming(channel: Channel) -> None:
            if reading.marker is not None and self._reading(channel) and channel.is_open:
                channel.basic_publish(  # through the exchange: a worker may not write to queues
                    topo.HISTORY.name,
                    routing_key="",
                    body=reading.marker,
                    properties=pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
                )

        with broker_errors(LOST, self._parameters):
            self._history_channel = link.channel(self._on_channel_closed, on_open=opened)

    def stop_history(self) -> None:
        """Stops reading the history stream by closing its channel. The close cancels the
        consumer and rejects nothing (a stream answers a reject by closing the whole
        connection); deliveries still on their way are dropped, and answers to them are
        not sent (:meth:`is_current`)."""
        self._check_owner()
        channel, self._history_channel = self._history_channel, None
        if channel is not None and not (channel.is_closed or channel.is_closing):
            try:
                channel.close()
            except CONNECTION_ERRORS as error:
                log.info("could not close the history channel", error=describe(error))

    def find_tail(self, on_tail: Callable[[TailRead], None]) -> None:
        """Reads where the history ends (:meth:`read_tail`) on a thread of its own, so that
        the connection keeps being served; ``on_tail`` then runs on the connection's thread
        (:meth:`call_soon`: on the next connection if this one closed meanwhile)."""

        def read() -> None:
            try:
                found = TailRead(self.read_tail())
            except BrokerUnavailable as error:
                found = TailRead(None, str(error))
            except Exception as error:  # a bug in the reader must not leave catch-up waiting
                log.exception("reading the history's end failed unexpectedly")
                found = TailRead(None, f"unexpected error: {error}")
            self.call_soon(partial(on_tail, found))

        threading.Thread(target=read, name="history-tail", daemon=True).start()

    def read_tail(self, stream: str | None = None) -> int | None:
        """The last offset of ``stream`` (default: the history; ``None``: it is empty), read
        over the stream protocol on the stream's leader, on the port ``stream_port`` of the
        broker in use (a new connection each time). Blocks up to about :data:`TAIL_TIMEOUT`
        seconds: call it off the connection's thread. Raises :class:`BrokerUnavailable`."""
        if threading.get_ident() == self._owner:
            raise RuntimeError("read_tail() blocks: call it off the connection's thread")
        parameters = self._parameters
        credentials = parameters.credentials
        if not isinstance(credentials, pika.PlainCredentials):
            raise BrokerUnavailable("reading the history's end needs a user name and password")
        tls = parameters.ssl_options.context if parameters.ssl_options is not None else None
        if self._stream_port is None and parameters.port not in (AMQP_PORT, AMQP_TLS_PORT):
            # A mapped or proxied AMQP port: 5552 on that host may be another broker's.
            raise BrokerUnavailable(
                f"RabbitMQ's AMQP port here is {parameters.port}, not the default: set "
                "PULLER_STREAM_PORT to the same brokers' stream port"
            )
        port = self._stream_port or (STREAM_PORT if tls is None else STREAM_TLS_PORT)
        reading = stream_tail.read_tail(
            stream_tail.Endpoint(parameters.host, port),
            stream_tail.Login(
                credentials.username, credentials.password, parameters.virtual_host, tls
            ),
            stream or (self._history_stream or topo.history_stream()).name,
            timeout=TAIL_TIMEOUT,
        )
        if reading.leader_missed is not None:
            with self._lock:
                self.tail_reads_off_leader += 1
            log.warning(
                "read the history's end on the broker connected to, not on its leader: its "
                "copy may lag; check stream.advertised_host/port on the brokers",
                read_at=str(reading.read_at),
                leader=reading.leader_missed,
            )
        return reading.offset

    def process_events(self, seconds: float) -> None:
        """Serves the connection (deliveries, callbacks, heartbeats) for up to ``seconds``."""
        self._check_owner()
        with broker_errors(LOST, self._parameters):
            link = self._open_link()
            self._serve_until = time.monotonic() + seconds
            held, self._held = self._held, []
            for on_delivery, delivery in held:
                self._serve(on_delivery, delivery)
            link.serve(seconds)

    def announce(self, body: bytes) -> None:
        """Publishes a presence announcement into the presence stream (not waiting to hear
        that it is there)."""
        self._check_owner()
        with broker_errors(LOST, self._parameters):
            self._open_channel(self._presence_channel).basic_publish(
                topo.PRESENCE.name, routing_key="", body=body, properties=self._presence_properties
            )

    def announce_arrival(self, body: bytes, timeout: float) -> bool | None:
        """The connection's first presence announcement: publishes it and waits up to
        ``timeout`` seconds for RabbitMQ to confirm that it is in the stream, so that a
        roster read after that lists this node. ``True`` when confirmed, ``False`` when
        refused, ``None`` when not answered in time (a broker under a resource alarm reads
        nothing from a connection that publishes). Deliveries that come meanwhile wait for
        :meth:`process_events`."""
        self.announce(body)
        with broker_errors(LOST, self._parameters):
            self._open_link().serve(timeout, until=lambda: self._arrived is not None)
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
                channel.basic_cancel(self._consumer_tag)
            except CONNECTION_ERRORS as error:
                log.warning("could not cancel the consumer", error=describe(error))
        self._consumer_tag = None

    def close(self) -> None:
        """Closes the connection; what was handed to it and not yet run waits for the next."""
        with self._lock:
            link, self._link = self._link, None
            self._keep_handed()
            self._channel = self._history_channel = self._presence_channel = None
        self._serve_until = 0.0
        if link is not None:
            try:
                if not link.close(self._close_wait):
                    log.warning("RabbitMQ did not answer the close", wait=self._close_wait)
            except CONNECTION_ERRORS as error:
                log.warning("error while closing the connection", error=describe(error))
        self._held = []  # unacknowledged: the broker gives them to the next connection

    # -- inside ------------------------------------------------------------------------------

    def _on_own_thread(self) -> bool:
        return threading.get_ident() == self._owner and self.connected

    def _post(self, hop: Callable[[], None]) -> bool:
        link = self._link
        if link is None or not link.is_open:
            return False
        link.add_callback_threadsafe(hop)
        return True

    def _send_ack(self, delivery: Delivery) -> None:
        channel = self._channel_of(delivery)
        if channel is None:
            return
        try:
            channel.basic_ack(delivery.tag)
        except CONNECTION_ERRORS as error:
            log.warning("could not acknowledge; the connection was lost", error=describe(error))

    def _send_answer(self, delivery: Delivery, result: Message | None, refuse: bool) -> None:
        """Connection thread: the reply, then the ack. A reply to a delivery from a closed
        channel still goes out (the requester may be waiting); its ack cannot (the broker
        has already put the message back)."""
        try:
            if result is not None and delivery.reply_to:
                try:
                    self._reply(delivery, delivery.reply_to, result.encode())
                except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
                    # The connection is going (its channel already closed): the requester
                    # may be waiting, so the answer goes out on the next connection.
                    self._keep_answer(delivery, result, refuse)
                    log.warning(
                        "could not answer; the answer waits for the next connection",
                        error=describe(error),
                    )
                    return
                except Exception:
                    log.exception(
                        "could not make the reply; acknowledging the request without it",
                        reply_to=_shown(delivery.reply_to),
                        correlation_id=_shown(delivery.correlation_id),
                    )
            channel = self._channel_of(delivery)
            if channel is not None and not delivery.acked:
                if refuse and delivery.history_offset is None:
                    channel.basic_reject(delivery.tag, requeue=False)
                else:
                    channel.basic_ack(delivery.tag)
        except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
            log.warning("could not answer; the connection was lost", error=describe(error))

    def _send_progress(self, delivery: Delivery, message: NodeProgress) -> None:
        if not delivery.reply_to:
            return
        try:
            self._reply(delivery, delivery.reply_to, message.encode())
        except (BrokerUnavailable, pika.exceptions.AMQPConnectionError) as error:
            log.info("progress not sent; the connection was lost", error=describe(error))
        except Exception:
            log.exception("could not make a progress report", reply_to=_shown(delivery.reply_to))

    def _reply(self, delivery: Delivery, reply_to: str, body: bytes) -> None:
        """Publishes ``body`` to ``reply_to`` on the live channel; the correlation id goes
        back as it came (pika gives one that is not UTF-8 as ``bytes``)."""
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=1, correlation_id=delivery.correlation_id
        )
        self._open_channel(self._channel).basic_publish(
            topo.REPLIES.name, reply_to, body, properties
        )

    def _on_confirm(self, frame: Any) -> None:
        if self._arrived is None and self._link is not None:
            self._arrived = isinstance(frame.method, pika.spec.Basic.Ack)
            self._link.wake()

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        """A refused announcement closes the presence channel (the next announcement
        finds it closed); a refused history reading (its stream gone, say) ends the
        connection's use, and so does the loss of the channel the node's queue is consumed
        on, which takes the queue with it: the worker reconnects rather than stay deaf."""
        if channel is self._presence_channel and self._arrived is None:
            self._arrived = False
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker) or self._link is None:
            return
        if channel is self._history_channel:
            self._link.fail(reason)
        elif channel is self._channel:
            log.warning(
                "RabbitMQ closed the channel this node's requests come on (the node's queue "
                "goes with it); reconnecting to declare and consume it again",
                queue=self.queue,
                code=reason.reply_code,
                reason=reason.reply_text,
            )
            self._link.fail(
                BrokerUnavailable(
                    f"RabbitMQ at {self.where} closed the channel consuming {self.queue}: "
                    f"{reason.reply_code} {reason.reply_text}"
                )
            )

    def _on_consumer_cancelled(self, channel: Channel, frame: Any) -> None:
        """RabbitMQ cancels a consumer whose queue is deleted under it (by an administrator,
        say) and leaves the channel open: the node's queue, or the history stream mid-read.
        Reconnecting declares them again (and reads the history again)."""
        if self._link is None:
            return
        if channel is self._channel and frame.method.consumer_tag == self._consumer_tag:
            queue = self.queue
        elif channel is self._history_channel:
            queue = (self._history_stream or topo.history_stream()).name
        else:
            return  # not a live consumer (stop_consuming() cancelled it)
        log.warning(
            "RabbitMQ cancelled this worker's consumer (its queue deleted?); reconnecting "
            "to declare the queue and consume it again",
            queue=queue,
        )
        self._link.fail(
            BrokerUnavailable(f"RabbitMQ at {self.where} cancelled the consumer of {queue}")
        )

    def _reading(self, channel: Channel) -> bool:
        return channel is self._history_channel

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

    def _open_link(self) -> ServedConnection:
        if self._link is None or not self._link.is_open:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.where}")
        return self._link

    def _new_channel(self) -> Channel:
        return self._open_link().channel(self._on_channel_closed)

    def _call(self, channel: Channel, method: Callable[..., object]) -> Any:
        return self._open_link().call(channel, method)

    def _open_channel(self, channel: Channel | None) -> Channel:
        if channel is None or not channel.is_open:
            link = self._link
            reason = None if link is None or channel is None else link.why_closed(channel)
            why = f" (closed: {reason})" if reason is not None else ""
            raise BrokerUnavailable(f"no open channel to RabbitMQ at {self.where}{why}")
        return channel


def _shown(value: object) -> str:
    """A peer's text for a log line, whatever it is."""
    return repr(value)[:200]
