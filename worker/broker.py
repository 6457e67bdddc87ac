"""The worker's AMQP connection: the only module of the worker that imports pika.

One thread owns the connection: the one that calls :meth:`WorkerBroker.serve`.
Every other thread reaches it only through :meth:`WorkerBroker.call_soon`, which
is pika's ``add_callback_threadsafe``: replies and acks for a finished pull are
sent from the connection's own thread, while the connection keeps answering
heartbeats through a pull that takes minutes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import pika
import pika.exceptions
import structlog

from contract import (
    CONTENT_TYPE,
    HISTORY_EXCHANGE,
    HISTORY_STREAM,
    PRESENCE_EXCHANGE,
    PRESENCE_STREAM,
    PRESENCE_STREAM_ARGUMENTS,
    PULL_EXCHANGE,
    REPLY_EXCHANGE,
    BrokerUnavailable,
    PullerError,
)
from contract.messages import node_queue_name

log = structlog.get_logger("worker.broker")

RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406


class NodeNameInUse(PullerError):
    """Another worker holds this node's exclusive queue."""


@dataclass(frozen=True)
class HistoryConsumer:
    """One reading of the history stream: from where, and the marker that ends it."""

    start: int | str
    """The stream offset to read from, or ``"first"``."""
    marker: bytes
    """Put at the end of the stream once reading has begun."""
    on_entry: Callable[[Delivery], None]


@dataclass(frozen=True)
class Delivery:
    """One message from the node's queue, in the project's own terms."""

    body: bytes
    delivery_tag: int
    reply_to: str | None
    correlation_id: str | None
    content_type: str | None
    connection_generation: int
    """Which connection delivered it: an ack on a later connection would be an error."""
    history_offset: int | None = None
    """Set when it comes from the history stream (a replay), not the node's live queue."""
    history_channel: int = 0
    """Which history channel delivered it: acks go only to that one."""


class WorkerBroker:
    """Connects, declares the topology, consumes the node's queue and sends replies."""

    def __init__(
        self,
        amqp_url: str,
        node: str,
        prefetch: int,
        heartbeat: int,
        history_arguments: dict[str, object] | None = None,
        replay_prefetch: int = 1,
    ) -> None:
        self._parameters = pika.URLParameters(amqp_url)
        self._parameters.heartbeat = heartbeat
        self._parameters.blocked_connection_timeout = max(60, 2 * heartbeat)
        self._parameters.connection_attempts = 1
        self._parameters.socket_timeout = 10
        self._node = node
        self._prefetch = prefetch
        self._history_arguments = history_arguments
        self._replay_prefetch = replay_prefetch
        self._history_channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self._history_tag: str | None = None
        self._history_channels = 0
        """History channels opened so far: the number of the current one."""
        self._connection: pika.BlockingConnection | None = None
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        self._pending: list[Callable[[], None]] = []
        self._pending_lock = threading.Lock()
        self.queue = node_queue_name(node)

    @property
    def where(self) -> str:
        parameters = self._parameters
        return f"{parameters.host}:{parameters.port} vhost {parameters.virtual_host!r}"

    def connect(
        self,
        on_delivery: Callable[[Delivery], None],
        history: HistoryConsumer | None = None,
    ) -> None:
        """Opens the connection, declares exchanges and the node's queue, starts consuming;
        with ``history``, also reads the history stream and puts its marker at the end."""
        self._generation += 1
        generation = self._generation
        try:
            self._connection = pika.BlockingConnection(self._parameters)
            if history is not None:
                self._history_channel = self._declare_history()
                self._history_channels += 1
            channel = self._connection.channel()
            channel.exchange_declare(PULL_EXCHANGE, exchange_type="fanout", durable=True)
            channel.exchange_declare(REPLY_EXCHANGE, exchange_type="direct", durable=True)
            declare_presence_stream(channel)
            channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
            channel.queue_bind(self.queue, PULL_EXCHANGE)
            channel.basic_qos(prefetch_count=self._prefetch)

            def deliver(
                _channel: object,
                method: pika.spec.Basic.Deliver,
                properties: pika.BasicProperties,
                body: bytes,
            ) -> None:
                on_delivery(
                    Delivery(
                        body=body,
                        delivery_tag=method.delivery_tag,
                        reply_to=properties.reply_to,
                        correlation_id=properties.correlation_id,
                        content_type=properties.content_type,
                        connection_generation=generation,
                    )
                )

            self._consumer_tag = channel.basic_consume(self.queue, deliver, auto_ack=False)
            self._channel = channel
            if history is not None:
                self.consume_history(history)
            self._run_pending()
        except pika.exceptions.ChannelClosedByBroker as error:
            self.close()
            if error.reply_code == RESOURCE_LOCKED:
                raise NodeNameInUse(
                    f"queue {self.queue} is held by another connection: another worker with "
                    f"PULLER_NODE_NAME={self._node!r} is running against {self.where}. "
                    "Give each node's worker its own name."
                ) from None
            raise BrokerUnavailable(f"RabbitMQ at {self.where} refused: {error}") from None
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None

    def _declare_history(self) -> pika.adapters.blocking_connection.BlockingChannel:
        connection = self._open_connection()
        channel = connection.channel()
        channel.exchange_declare(HISTORY_EXCHANGE, exchange_type="fanout", durable=True)
        try:
            channel.queue_declare(HISTORY_STREAM, durable=True, arguments=self._history_arguments)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != PRECONDITION_FAILED:
                raise
            log.warning(
                "the history stream exists with other retention settings; using it as it is",
                error=error.reply_text,
            )
            channel = connection.channel()
            channel.queue_declare(HISTORY_STREAM, passive=True)
        channel.queue_bind(HISTORY_STREAM, HISTORY_EXCHANGE)
        channel.basic_qos(prefetch_count=self._replay_prefetch)
        return channel

    def consume_history(self, history: HistoryConsumer) -> None:
        """Reads the history stream from ``history.start`` and puts ``history.marker`` at its
        end. Connection thread only; one reading at a time."""
        generation = self._generation
        try:
            channel = self._history_channel
            if channel is None or not channel.is_open:
                channel = self._open_connection().channel()
                channel.basic_qos(prefetch_count=self._replay_prefetch)
                self._history_channel = channel
                self._history_channels += 1
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BrokerUnavailable(
                f"lost the connection to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None
        channel_number = self._history_channels

        def deliver(
            _channel: object,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            offset = (properties.headers or {}).get("x-stream-offset")
            history.on_entry(
                Delivery(
                    body=body,
                    delivery_tag=method.delivery_tag,
                    reply_to=None,
                    correlation_id=None,
                    content_type=properties.content_type,
                    connection_generation=generation,
                    history_offset=offset if isinstance(offset, int) else -1,
                    history_channel=channel_number,
                )
            )

        try:
            self._history_tag = channel.basic_consume(
                HISTORY_STREAM,
                deliver,
                auto_ack=False,
                arguments={"x-stream-offset": history.start},
            )
            channel.basic_publish(
                "",
                routing_key=HISTORY_STREAM,
                body=history.marker,
                properties=pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
            )
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BrokerUnavailable(
                f"lost the connection to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None

    def stop_history(self) -> None:
        """Stops reading the history stream (until the next :meth:`consume_history`).

        By closing its channel, not cancelling the consumer: pika's cancel rejects the
        deliveries not yet dispatched, and a stream answers a reject by closing the whole
        connection. A closed channel's deliveries are simply dropped by the broker.
        """
        channel, self._history_channel, self._history_tag = self._history_channel, None, None
        if channel is not None and channel.is_open:
            channel._impl.close()  # noqa: SLF001 - the blocking close cancels, as above

    def process_events(self, seconds: float) -> None:
        """Serves the connection (deliveries, callbacks, heartbeats) for up to ``seconds``."""
        try:
            self._open_connection().process_data_events(time_limit=seconds)
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BrokerUnavailable(
                f"lost the connection to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` on the connection's thread. The one method safe from any thread.

        While there is no connection, callbacks wait and run on the next one, so a pull
        that finishes while the worker reconnects still gets its reply sent.
        """
        with self._pending_lock:
            connection = self._connection
            if connection is None or not connection.is_open:
                self._pending.append(callback)
                return
            try:
                connection.add_callback_threadsafe(callback)
            except (pika.exceptions.AMQPError, OSError) as error:
                log.info("connection closing; keeping a callback for the next", error=str(error))
                self._pending.append(callback)

    def _run_pending(self) -> None:
        with self._pending_lock:
            waiting, self._pending = self._pending, []
            connection = self._connection
        if waiting:
            log.info("sending what waited for the connection", callbacks=len(waiting))
        for callback in waiting:
            if connection is None:
                break
            connection.add_callback_threadsafe(callback)

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Sends a reply through :data:`REPLY_EXCHANGE`. Connection thread only."""
        # The blocking channel would flush this frame alone (a send and two poller changes);
        # queued on the channel underneath, it goes out with the ack in one write when the
        # connection's loop next runs, which is at once: we are inside that loop.
        self._open_channel()._impl.basic_publish(  # noqa: SLF001 - see above
            REPLY_EXCHANGE,
            routing_key=reply_to,
            body=body,
            properties=pika.BasicProperties(
                content_type=CONTENT_TYPE, correlation_id=correlation_id, delivery_mode=1
            ),
        )

    def announce(self, body: bytes) -> None:
        """Publishes a presence announcement into the presence stream. Connection thread only."""
        try:
            self._open_channel().basic_publish(
                PRESENCE_EXCHANGE,
                routing_key="",
                body=body,
                properties=pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
            )
        except (pika.exceptions.AMQPError, OSError) as error:
            raise BrokerUnavailable(
                f"lost the connection to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None

    def ack(self, delivery: Delivery) -> None:
        if not self._current(delivery):
            return
        if delivery.history_offset is not None:
            channel = self._history_channel
            if (
                channel is not None
                and channel.is_open
                and delivery.history_channel == self._history_channels
            ):
                channel._impl.basic_ack(delivery.delivery_tag)  # noqa: SLF001 - as reply
            return
        self._open_channel()._impl.basic_ack(delivery.delivery_tag)  # noqa: SLF001 - as reply

    def reject(self, delivery: Delivery) -> None:
        """Rejects without requeue: a message that cannot be served now never will be."""
        if self._current(delivery):
            self._open_channel().basic_reject(delivery.delivery_tag, requeue=False)

    def _current(self, delivery: Delivery) -> bool:
        if delivery.connection_generation == self._generation:
            return True
        log.info(
            "not acking a delivery from a connection that is gone",
            delivery_tag=delivery.delivery_tag,
        )
        return False

    def stop_consuming(self) -> None:
        """Takes no more live requests or history entries."""
        self.stop_history()
        if self._channel is not None and self._consumer_tag is not None:
            try:
                self._channel.basic_cancel(self._consumer_tag)
            except (pika.exceptions.AMQPError, OSError) as error:
                log.warning("could not cancel the consumer", error=_describe(error))
        self._consumer_tag = None

    def close(self) -> None:
        with self._pending_lock:
            connection, self._connection, self._channel = self._connection, None, None
            self._history_channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError) as error:
                log.warning("error while closing the connection", error=_describe(error))

    def _open_connection(self) -> pika.BlockingConnection:
        if self._connection is None or not self._connection.is_open:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.where}")
        return self._connection

    def _open_channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            raise BrokerUnavailable(f"no open channel to RabbitMQ at {self.where}")
        return self._channel


def declare_presence_stream(channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
    """The presence exchange and the stream bound to it (idempotent; same arguments everywhere)."""
    channel.exchange_declare(PRESENCE_EXCHANGE, exchange_type="fanout", durable=True)
    channel.queue_declare(PRESENCE_STREAM, durable=True, arguments=PRESENCE_STREAM_ARGUMENTS)
    channel.queue_bind(PRESENCE_STREAM, PRESENCE_EXCHANGE)


def _describe(error: BaseException) -> str:
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"
