"""The publisher's AMQP connection: the only module of the publisher that imports pika.

Publishes with publisher confirms and ``mandatory``: a request returns once
RabbitMQ has taken it, and a request that no worker queue is bound to receive
comes back as :class:`NoNodes` instead of vanishing. Replies arrive on an
exclusive queue bound to the reply exchange under its own name.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pika
import pika.exceptions

from contract import (
    CONTENT_TYPE,
    HISTORY_EXCHANGE,
    PRESENCE_EXCHANGE,
    PRESENCE_STREAM,
    PRESENCE_STREAM_ARGUMENTS,
    PULL_EXCHANGE,
    REPLY_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    BrokerUnavailable,
    NoNodes,
    RosterMarker,
)

STREAM_PREFETCH = 1000

ReplyHandler = Callable[[str | None, bytes], None]


class PublisherBroker:
    """One connection, one channel in confirm mode, one reply queue. Not thread-safe."""

    def __init__(self, amqp_url: str, connect_timeout: float, heartbeat: int = 60) -> None:
        self._parameters = pika.URLParameters(amqp_url)
        self._parameters.connection_attempts = 1
        self._parameters.socket_timeout = connect_timeout
        self._parameters.stack_timeout = connect_timeout
        self._parameters.blocked_connection_timeout = connect_timeout
        self._parameters.heartbeat = heartbeat
        self._connection: pika.BlockingConnection | None = None
        self._channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self.reply_queue = f"{REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"

    @property
    def where(self) -> str:
        parameters = self._parameters
        return f"{parameters.host}:{parameters.port} vhost {parameters.virtual_host!r}"

    @property
    def connected(self) -> bool:
        return (
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    def connect(self, on_reply: ReplyHandler) -> None:
        self.close()
        try:
            self._connection = pika.BlockingConnection(self._parameters)
            channel = self._connection.channel()
            channel.confirm_delivery()
            channel.exchange_declare(PULL_EXCHANGE, exchange_type="fanout", durable=True)
            channel.exchange_declare(HISTORY_EXCHANGE, exchange_type="fanout", durable=True)
            channel.exchange_declare(REPLY_EXCHANGE, exchange_type="direct", durable=True)
            channel.exchange_declare(PRESENCE_EXCHANGE, exchange_type="fanout", durable=True)
            channel.queue_declare(
                PRESENCE_STREAM, durable=True, arguments=PRESENCE_STREAM_ARGUMENTS
            )
            channel.queue_bind(PRESENCE_STREAM, PRESENCE_EXCHANGE)
            channel.queue_declare(self.reply_queue, exclusive=True, auto_delete=True)
            channel.queue_bind(self.reply_queue, REPLY_EXCHANGE, routing_key=self.reply_queue)

            def deliver(
                _channel: object,
                _method: object,
                properties: pika.BasicProperties,
                body: bytes,
            ) -> None:
                on_reply(properties.correlation_id, body)

            channel.basic_consume(self.reply_queue, deliver, auto_ack=True)
            self._channel = channel
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {self.where}: {_describe(error)}. "
                "Check PULLER_AMQP_URL and that RabbitMQ is running."
            ) from None

    def publish_request(self, body: bytes, correlation_id: str) -> None:
        """Publishes the request to the live workers, then records it in the history; waits
        for the broker's confirm of each.

        Two publishes rather than one exchange bound to both, so that ``mandatory`` still
        tells "no worker is listening" (the history stream would always take the message).
        Live first, so a worker meets the live copy before the history's and skips the
        latter at no cost; a request that reached no worker is still recorded.
        """
        channel = self._open_channel()
        try:
            try:
                channel.basic_publish(
                    PULL_EXCHANGE,
                    routing_key="",
                    body=body,
                    properties=pika.BasicProperties(
                        content_type=CONTENT_TYPE,
                        correlation_id=correlation_id,
                        reply_to=self.reply_queue,
                        delivery_mode=1,
                    ),
                    mandatory=True,
                )
            finally:
                channel.basic_publish(
                    HISTORY_EXCHANGE,
                    routing_key="",
                    body=body,
                    properties=pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
                )
        except pika.exceptions.UnroutableError:
            raise NoNodes(
                f"no nodes: no worker queue is bound to exchange {PULL_EXCHANGE!r} at "
                f"{self.where}, so no node received the request. Start puller-worker on the "
                "nodes (with the same PULLER_AMQP_URL and vhost); the request is in the history, "
                "so workers that start within its window will still pull the image."
            ) from None
        except pika.exceptions.NackError:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.where} refused the request (nack); see the broker's log"
            ) from None
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(
                f"lost the connection to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None

    def read_presence(self, since: float, timeout: float) -> list[bytes]:
        """Every presence announcement in the stream from ``since`` (a Unix time) until now.

        "Now" is a marker this call puts into the stream itself: the stream is
        read until the marker comes back, so nothing announced before the call is missed.
        """
        connection = self._connection
        if connection is None or not connection.is_open:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.where}")
        marker_id = uuid.uuid4().hex
        bodies: list[bytes] = []
        marker_seen = False

        def on_message(
            channel: pika.adapters.blocking_connection.BlockingChannel,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            nonlocal marker_seen
            if properties.correlation_id == marker_id:
                marker_seen = True
            else:
                bodies.append(body)
            channel.basic_ack(method.delivery_tag)

        try:
            stream = connection.channel()
            try:
                stream.basic_qos(prefetch_count=STREAM_PREFETCH)
                stream.basic_consume(
                    PRESENCE_STREAM,
                    on_message,
                    arguments={"x-stream-offset": datetime.fromtimestamp(since, UTC)},
                )
                self._open_channel().basic_publish(
                    PRESENCE_EXCHANGE,
                    routing_key="",
                    body=RosterMarker(marker_id).encode(),
                    properties=pika.BasicProperties(
                        content_type=CONTENT_TYPE, correlation_id=marker_id
                    ),
                )
                deadline = time.monotonic() + timeout
                while not marker_seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BrokerUnavailable(
                            f"reading the presence stream at {self.where} took longer than "
                            f"{timeout:g}s"
                        )
                    connection.process_data_events(time_limit=min(remaining, 0.1))
            finally:
                if stream.is_open:
                    stream.close()
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(
                f"reading the presence stream at {self.where} failed: {_describe(error)}"
            ) from None
        return bodies

    def process_events(self, seconds: float) -> None:
        """Receives replies for up to ``seconds`` (returns early once some arrived)."""
        connection = self._connection
        if connection is None or not connection.is_open:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.where}")
        try:
            connection.process_data_events(time_limit=seconds)
        except (pika.exceptions.AMQPError, OSError) as error:
            self.close()
            raise BrokerUnavailable(
                f"lost the connection to RabbitMQ at {self.where}: {_describe(error)}"
            ) from None

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            # closing a connection that is already failing may fail too; nothing to do then
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                connection.close()

    def _open_channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            raise BrokerUnavailable(f"not connected to RabbitMQ at {self.where}")
        return self._channel


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error) or repr(error)}"
