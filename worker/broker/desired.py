"""The desired state's side of the worker's connection: the keeper's token, reading a
stream on a channel of its own, and publishing with a confirm.

Everything here runs on the connection's thread (as :class:`~worker.broker.WorkerBroker`
does) and never waits: channels open, consume and publish as RabbitMQ answers, and what
they find is handed to callbacks. A read of where a stream ends (the stream protocol)
runs on a thread of its own, its answer handed back with ``call_soon``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pika
import pika.exceptions
import pika.spec
import structlog

from contract import CONTENT_TYPE, BrokerUnavailable
from contract import topology as topo
from contract.connection import CONNECTION_ERRORS, ServedConnection, describe

log = structlog.get_logger("worker.broker")

Channel = Any
"""A channel of pika's asynchronous connection (pika has no type hints)."""

TOKEN_BODY = b'{"token": "puller keeper"}'

OnEntry = Callable[[int, bytes], None]
"""A stream entry: its offset and body."""


class StreamRead:
    """A reading of a stream on a channel of its own; :meth:`stop` closes the channel."""

    def __init__(self) -> None:
        self.channel: Channel | None = None

    def owns(self, channel: Channel) -> bool:
        return self.channel is not None and self.channel is channel

    def stop(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None and channel.is_open:
            try:
                channel.close()
            except CONNECTION_ERRORS as error:
                log.info("could not close a stream channel", error=describe(error))


class DesiredLink:
    """The keeper's and the reconciler's use of the worker's connection."""

    def __init__(
        self,
        link: Callable[[], ServedConnection],
        owner_check: Callable[[], None],
        call_soon: Callable[[Callable[[], None]], None],
        read_tail: Callable[[str], int | None],
        user: str,
    ) -> None:
        self._link = link
        self._owner_check = owner_check
        self._call_soon = call_soon
        self._read_tail = read_tail
        self._user = user

    def consume_token(self, on_token: Callable[[], None]) -> None:
        """Consumes the keeper's token queue (prefetch 1, never acknowledged): ``on_token``
        runs when this worker gets the token, and holds it until the connection goes. If no
        token is ready, puts one in (a held one is not counted: at most one held, one ready)."""
        self._owner_check()

        def opened(channel: Channel) -> None:
            try:
                channel.basic_qos(prefetch_count=1)
                channel.basic_consume(
                    topo.KEEPER_TOKEN.name,
                    lambda *_delivery: on_token(),
                    callback=lambda _frame: count(channel),
                )
            except CONNECTION_ERRORS as error:
                log.warning("cannot consume the keeper's token", error=describe(error))

        def count(channel: Channel) -> None:
            channel.queue_declare(
                topo.KEEPER_TOKEN.name, passive=True, callback=partial(counted, channel)
            )

        def counted(channel: Channel, frame: Any) -> None:
            if frame.method.message_count == 0 and channel.is_open:
                log.info("no keeper's token is ready; putting one in")
                channel.basic_publish(
                    topo.KEEPER.name,
                    routing_key="",
                    body=TOKEN_BODY,
                    properties=pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2),
                )

        self._link().channel(_closed("the keeper's token"), on_open=opened)

    def read_stream(
        self,
        stream: str,
        start: int | str,
        on_entry: OnEntry,
        on_refused: Callable[[str], None] | None = None,
    ) -> StreamRead:
        """Reads ``stream`` from ``start`` (an offset, ``"first"`` or ``"last"``) until the
        returned reading is stopped; ``on_entry`` runs for each entry (it must not raise).
        ``on_refused(why)``: RabbitMQ refused the reading or closed its channel before it
        was stopped (the reading is then over)."""
        self._owner_check()
        reading = StreamRead()

        def refused(why: str) -> None:
            if reading.channel is not None:
                reading.channel = None
                if on_refused is not None:
                    on_refused(why)

        def opened(channel: Channel) -> None:
            if not reading.owns(channel):
                channel.close()
                return
            try:
                channel.basic_qos(prefetch_count=100)
                channel.basic_consume(
                    stream, partial(deliver, channel), arguments={"x-stream-offset": start}
                )
            except CONNECTION_ERRORS as error:
                log.warning("cannot read a stream", stream=stream, error=describe(error))
                refused(describe(error))

        def deliver(
            channel: Channel,
            _channel: object,
            method: pika.spec.Basic.Deliver,
            properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            if not reading.owns(channel):
                return
            channel.basic_ack(method.delivery_tag)
            offset = (properties.headers or {}).get("x-stream-offset")
            if isinstance(offset, int):
                on_entry(offset, body)

        def closed(channel: Channel, reason: BaseException) -> None:
            _closed(stream)(channel, reason)
            if reading.owns(channel):
                refused(f"RabbitMQ closed the reading of {stream}: {describe(reason)}")

        reading.channel = self._link().channel(closed, on_open=opened)
        return reading

    def read_newest(
        self, stream: str, on_found: Callable[[bytes | None, str | None], None]
    ) -> None:
        """The body of the newest entry of ``stream`` (the first of its last chunk: the newest
        when entries are written one at a time): ``on_found(body, None)``, ``(None, None)``
        when the stream is empty, ``(None, why)`` when it could not be read. Where the stream
        ends is read first, over the stream protocol, off the connection's thread."""

        def read_end() -> None:
            try:
                end, why = self._read_tail(stream), None
            except BrokerUnavailable as error:
                end, why = None, str(error)
            except Exception as error:  # a bug in the reader must not leave the caller waiting
                log.exception("reading where a stream ends failed unexpectedly", stream=stream)
                end, why = None, f"unexpected error: {error}"
            self._call_soon(partial(ended, end, why))

        def ended(end: int | None, why: str | None) -> None:
            if end is None:
                on_found(None, why)
                return
            try:
                reading = self.read_stream(
                    stream, "last", lambda _offset, body: first(body), partial(on_found, None)
                )
            except (BrokerUnavailable, *CONNECTION_ERRORS) as error:
                on_found(None, describe(error))
                return

            def first(body: bytes) -> None:
                if reading.channel is not None:
                    reading.stop()
                    on_found(body, None)

        threading.Thread(target=read_end, name="stream-end", daemon=True).start()

    def publish_confirmed(
        self, exchange: str, body: bytes, on_confirmed: Callable[[bool], None]
    ) -> None:
        """Publishes ``body`` to ``exchange`` on a channel of its own in confirm mode;
        ``on_confirmed(True)`` once RabbitMQ has it, ``(False)`` if refused or closed first."""
        self._owner_check()
        answered: list[bool] = []

        def answer(confirmed: bool) -> None:
            if not answered:
                answered.append(confirmed)
                on_confirmed(confirmed)

        def opened(channel: Channel) -> None:
            try:
                channel.confirm_delivery(partial(confirm, channel), callback=partial(send, channel))
            except CONNECTION_ERRORS as error:
                log.warning("cannot publish", exchange=exchange, error=describe(error))
                answer(False)

        def send(channel: Channel, _frame: object) -> None:
            channel.basic_publish(
                exchange,
                routing_key="",
                body=body,
                properties=pika.BasicProperties(
                    content_type=CONTENT_TYPE, delivery_mode=2, user_id=self._user or None
                ),
            )

        def confirm(channel: Channel, frame: Any) -> None:
            answer(isinstance(frame.method, pika.spec.Basic.Ack))
            channel.close()

        def closed(channel: Channel, reason: BaseException) -> None:
            _closed(exchange)(channel, reason)
            answer(False)

        self._link().channel(closed, on_open=opened)


def _closed(what: str) -> Callable[[Channel, BaseException], None]:
    def closed(_channel: Channel, reason: BaseException) -> None:
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            log.warning(
                "RabbitMQ closed a channel of the desired state's",
                on=what,
                code=reason.reply_code,
                reason=reason.reply_text,
            )

    return closed
