"""How many workers there are, learned cheaply: every worker consumes the keeper's token
queue (:data:`contract.topology.KEEPER_TOKEN`; one holds the token, the others wait), and a
passive declaration of it answers with its consumer count. Presence stretches its interval
by that count. (A stream's passive declaration reports no counts on RabbitMQ 3.10.)

Everything here runs on the connection's thread and waits for nothing: the question is sent
and its answer comes as a callback. The count is a hint, never required: a broker that
refuses it (the queue missing) leaves the last count in place, and a worker that never had
one announces as often as a small cluster's would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pika.exceptions
import structlog

from contract import topology as topo
from contract.connection import CONNECTION_ERRORS, describe

log = structlog.get_logger("worker.broker")

Channel = Any
"""A channel of pika's asynchronous connection (pika has no type hints)."""
REOPEN_AFTER = 60.0
"""Seconds between attempts to count again after a refusal."""


class Census:
    """The latest count of the workers, asked on a channel of its own.

    ``open_channel(on_open)`` opens a channel of the current connection, returned at once
    and handed to ``on_open`` once open."""

    def __init__(self, open_channel: Callable[[Callable[[Channel], None]], Channel]) -> None:
        self._open_channel = open_channel
        self._channel: Channel | None = None
        self._ready = False
        self._asking = False
        self._opened_at = -float("inf")
        self._asked_at = -float("inf")
        self.nodes: int | None = None
        """The workers consuming the keeper's token at the last answer (kept across
        connections: the last known is a better guess than none)."""
        self.refused: str | None = None
        """Why the broker refused the last question (``None``: it did not)."""
        self._said: str | None = None
        """The refusal last logged."""

    def join(self) -> None:
        """Opens the channel and counts once; called once the connection is up."""
        self._channel, self._ready, self._asking = None, False, False
        self._opened_at = time.monotonic()

        def opened(channel: Channel) -> None:
            if self._current(channel):
                channel.add_on_close_callback(self._on_closed)
                self._ready = True
                self._ask(channel)

        try:
            self._channel = self._open_channel(opened)
        except CONNECTION_ERRORS as error:
            log.info("could not open the census channel", error=describe(error))

    def ask(self, every: float) -> None:
        """Asks for the count again, at most every ``every`` seconds (the count moves slowly,
        and a question costs the broker about what an announcement does); the answer updates
        :attr:`nodes`. Does nothing while the last question is unanswered. After a refusal
        (which closes the channel) it asks again every :data:`REOPEN_AFTER` seconds."""
        channel, now = self._channel, time.monotonic()
        if channel is None and now >= self._opened_at + REOPEN_AFTER:
            self.join()
            return
        if not self._ready or self._asking or now < self._asked_at + every:
            return
        if channel is not None and channel.is_open:
            self._ask(channel)

    def _ask(self, channel: Channel) -> None:
        self._asked_at, self._asking = time.monotonic(), True
        try:
            channel.queue_declare(topo.KEEPER_TOKEN.name, passive=True, callback=self._counted)
        except CONNECTION_ERRORS as error:
            self._asking = False
            log.info("could not ask for the census", error=describe(error))

    def _counted(self, frame: Any) -> None:
        self._asking, self.refused = False, None
        self.nodes = max(1, frame.method.consumer_count)

    def _on_closed(self, channel: Channel, reason: BaseException) -> None:
        if not self._current(channel):
            return
        self._channel, self._ready, self._asking = None, False, False
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return  # the connection went: the next one opens another
        said, self.refused = self._said, f"{reason.reply_code} {reason.reply_text}"
        self._said = self.refused
        if said != self.refused:
            log.info(
                "cannot count the workers; presence keeps the last count (the base interval "
                "if none) and asks again in a minute",
                queue=topo.KEEPER_TOKEN.name,
                reason=self.refused,
            )

    def _current(self, channel: Channel) -> bool:
        return channel is not None and channel is self._channel
