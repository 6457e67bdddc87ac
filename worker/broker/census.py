"""How many workers there are, learned cheaply: every worker consumes the census queue
(:data:`contract.topology.CENSUS`, which stays empty), and a passive declaration of it
answers with its consumer count. Presence stretches its interval by that count.

Everything here runs on the connection's thread and waits for nothing: methods are sent
and their answers come as callbacks. The census is a hint, never required: a broker that
refuses it (a user that may not declare it, and nobody did) leaves the count unknown, and
the worker announces as often as a small cluster's would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pika.exceptions
import structlog

from contract import topology as topo
from contract.connection import CONNECTION_ERRORS, NOT_FOUND, declare, describe

log = structlog.get_logger("worker.broker")

Channel = Any
"""A channel of pika's asynchronous connection (pika has no type hints)."""
REJOIN_AFTER = 60.0
"""Seconds between attempts to join a census that could not be joined."""


class Census:
    """The worker's membership in the census, and the latest count.

    ``open_channel(on_open)`` opens a channel of the current connection, returned at once
    and handed to ``on_open`` once open."""

    def __init__(self, open_channel: Callable[[Callable[[Channel], None]], Channel]) -> None:
        self._open_channel = open_channel
        self._channel: Channel | None = None
        self._consuming = False
        self._asking = False
        self._joined_at = -float("inf")
        self._asked_at = -float("inf")
        self.nodes: int | None = None
        """The workers consuming the census at the last answer (kept across connections:
        the last known is a better guess than none)."""
        self.refused: str | None = None
        """Why the broker refused the census on this connection (``None``: it did not)."""
        self._said: str | None = None
        """The refusal last logged."""

    def join(self) -> None:
        """Declares the census queue (or, refused that, checks it exists) and consumes it,
        on a channel of its own. Called once the connection is up."""
        self._channel, self._consuming, self._asking, self.refused = None, False, False, None
        self._joined_at = self._asked_at = time.monotonic()  # joining answers with a count
        self._open(passive=False)

    def ask(self, every: float) -> None:
        """Asks for the count again, at most every ``every`` seconds (the count moves slowly,
        and a question costs the broker about what an announcement does); the answer updates
        :attr:`nodes`. Does nothing while the last question is unanswered. Not
        joined (refused, or the queue's broker node was down), it joins again every
        :data:`REJOIN_AFTER` seconds."""
        channel, now = self._channel, time.monotonic()
        if channel is None and now >= self._joined_at + REJOIN_AFTER:
            self.join()
            return
        if not self._consuming or self._asking or channel is None or not channel.is_open:
            return
        if now < self._asked_at + every:
            return
        self._asked_at = now
        self._asking = True
        try:
            channel.queue_declare(topo.CENSUS.name, passive=True, callback=self._counted)
        except CONNECTION_ERRORS as error:
            log.info("could not ask for the census", error=describe(error))

    # -- callbacks ---------------------------------------------------------------------------

    def _open(self, passive: bool) -> None:
        def opened(channel: Channel) -> None:
            if not self._current(channel):
                return
            channel.add_on_close_callback(partial(self._on_closed, passive))
            channel.add_on_cancel_callback(lambda _frame: self._on_cancelled(channel))
            declare(channel, topo.CENSUS, passive=passive, callback=partial(joined, channel))

        def joined(channel: Channel, frame: Any) -> None:
            if not self._current(channel):
                return
            self.nodes = frame.method.consumer_count + 1
            channel.basic_consume(
                topo.CENSUS.name,
                lambda *_delivery: None,  # nothing belongs in it: dropped unread
                auto_ack=True,
                callback=lambda _frame: self._on_consuming(channel),
            )

        try:
            self._channel = self._open_channel(opened)
        except CONNECTION_ERRORS as error:
            log.info("could not open the census channel", error=describe(error))

    def _on_consuming(self, channel: Channel) -> None:
        if self._current(channel):
            self._consuming = True

    def _counted(self, frame: Any) -> None:
        self._asking = False
        self.nodes = max(1, frame.method.consumer_count)

    def _on_closed(self, passive: bool, channel: Channel, reason: BaseException) -> None:
        if not self._current(channel):
            return
        self._channel, self._consuming, self._asking = None, False, False
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return  # the connection went: the next one joins again
        if not passive and reason.reply_code != NOT_FOUND:
            self._open(passive=True)  # may not declare it: it may exist all the same
            return
        said, self.refused = self._said, f"{reason.reply_code} {reason.reply_text}"
        self._said = self.refused
        if said == self.refused:
            return  # said once already
        log.info(
            "the census queue cannot be used; presence keeps the last count (the base "
            "interval if none) and tries again in a minute (`puller broker-setup` declares it)",
            queue=topo.CENSUS.name,
            reason=self.refused,
        )

    def _on_cancelled(self, channel: Channel) -> None:
        """The queue was deleted under the consumer: declared again on a new channel."""
        if self._current(channel) and channel.is_open:
            self._channel = None
            channel.close()
            self.join()

    def _current(self, channel: Channel) -> bool:
        return channel is not None and channel is self._channel
