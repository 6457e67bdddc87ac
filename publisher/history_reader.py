"""The images the fleet was asked for lately, by anyone: read from the history stream (every
pull request within its window, whoever published it), followed on the publisher's I/O
thread from ``window`` seconds back.

Reading the stream needs *read* on ``puller.history.stream``, which ``puller broker-setup``
gives workers, not publishers: a publisher whose user may not read it learns that once
(:attr:`RecentRequests.problem`) and asks again at most every :data:`RETRY_AFTER` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime

import pika
import pika.channel
import pika.spec

from contract import BrokerUnavailable, HistoryMarker, InvalidMessage, decode_history
from contract import topology as topo
from contract.connection import describe
from publisher.roster import IoThread

log = logging.getLogger("puller.publisher.history")

MAX_IMAGES = 1000
"""Images remembered at most (the least recently asked are forgotten first)."""
PREFETCH = 500
ACK_EVERY = 100
RETRY_AFTER = 10.0
"""Seconds before a reading that failed (refused, or the stream not declared yet) is tried
again."""


class RecentRequests:
    """The images asked for in the history since ``window`` seconds back, with when each was
    last asked. :meth:`images` is called from any thread; the reading runs on the I/O
    thread."""

    def __init__(self, io: IoThread, window: float, max_images: int = MAX_IMAGES) -> None:
        self._io = io
        self._window = window
        self._max_images = max_images
        self._lock = threading.Lock()
        self._asked: OrderedDict[str, float] = OrderedDict()
        self._channel: pika.channel.Channel | None = None
        self._starting = False
        self._failed_at: float | None = None
        self.problem: str | None = None
        """Why the history cannot be read now (``None`` while it is read)."""

    def images(self) -> list[tuple[str, float]]:
        """``(image, requested_at)`` for each image asked within the window, the most recent
        first. Starts the reading on the first call (and again after it was lost): what was
        asked is then read in the background, and later calls see it."""
        self._follow_if_not()
        horizon = time.time() - self._window
        with self._lock:
            found = [(image, when) for image, when in self._asked.items() if when >= horizon]
        return sorted(found, key=lambda item: item[1], reverse=True)

    def stop(self) -> None:
        """Ends the reading (on the I/O thread)."""
        channel = self._channel
        if channel is not None and channel.is_open:
            channel.close()

    def _follow_if_not(self) -> None:
        with self._lock:
            if self._channel is not None or self._starting:
                return
            if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
                return
            self._starting = True
        try:
            self._io.run_connected(self._follow, self._lost)
        except BrokerUnavailable as error:
            self._lost(error)

    def _lost(self, error: BaseException) -> None:
        with self._lock:
            self._starting = False
            self._channel = None
            self._failed_at = time.monotonic()
            self.problem = f"the history stream cannot be read: {describe(error)}"

    # -- the I/O thread -------------------------------------------------------------------------

    def _follow(self, connection: pika.SelectConnection) -> None:
        start = datetime.fromtimestamp(time.time() - self._window, UTC)
        unacked = 0

        def on_message(
            reading: pika.channel.Channel,
            method: pika.spec.Basic.Deliver,
            _properties: pika.BasicProperties,
            body: bytes,
        ) -> None:
            nonlocal unacked
            unacked += 1
            if unacked >= ACK_EVERY and reading.is_open:
                reading.basic_ack(method.delivery_tag, multiple=True)  # a stream's credit
                unacked = 0
            try:
                entry = decode_history(body)
            except InvalidMessage:
                return
            if not isinstance(entry, HistoryMarker):
                self._take(str(entry.image), entry.requested_at)

        def on_open(channel: pika.channel.Channel) -> None:
            with self._lock:
                self._channel, self._starting = channel, False
            channel.basic_qos(
                prefetch_count=PREFETCH,
                callback=lambda _frame: channel.basic_consume(
                    topo.HISTORY_STREAM_NAME,
                    on_message,
                    arguments={"x-stream-offset": start},
                    callback=lambda _frame: self._reading(),
                ),
            )

        channel = connection.channel(on_open_callback=on_open)
        channel.add_on_close_callback(self._closed)
        channel.add_on_cancel_callback(lambda _frame: channel.close() if channel.is_open else None)

    def _reading(self) -> None:
        with self._lock:
            self._failed_at, self.problem = None, None

    def _closed(self, channel: pika.channel.Channel, reason: BaseException) -> None:
        with self._lock:
            if self._channel is not None and channel is not self._channel:
                return
        log.info("the reading of the history stream ended: %s", describe(reason))
        self._lost(reason)

    def _take(self, image: str, requested_at: float) -> None:
        with self._lock:
            if requested_at >= self._asked.get(image, 0.0):
                self._asked[image] = requested_at
                self._asked.move_to_end(image)
            while len(self._asked) > self._max_images:
                self._asked.popitem(last=False)
