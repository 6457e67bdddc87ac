"""What the broker hands over: one message from the node's queue or its history, free of pika."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Delivery:
    """One message from the node's queue or from the history stream."""

    body: bytes
    tag: int
    reply_to: str | None
    correlation_id: str | None
    source: object
    """The channel it came from, opaque to all but the broker: an answer to a delivery whose
    channel has closed since is not sent (the broker redelivers it, or a replay starts over)."""
    history_offset: int | None = None
    """Set when it comes from the history stream (a replay), not the node's live queue."""
    user_id: str | None = None
    """The AMQP ``user_id`` property: who published it, as the broker checked it."""
    acked: bool = False
    """Acknowledged on receipt (a warm-up: see ``WorkerBroker.acknowledge``); its answer is
    sent without an ack."""


@dataclass(frozen=True)
class HistoryReading:
    """One reading of the history stream: from where, and the marker put at its end (none:
    nothing is written)."""

    start: int | str
    """A stream offset, or ``"first"`` / ``"last"``."""
    marker: bytes | None
    on_entry: Callable[[Delivery], None]


@dataclass(frozen=True)
class TailRead:
    """Where the history ends, as :meth:`WorkerBroker.find_tail` read it."""

    offset: int | None
    """The last entry's offset (``None``: the stream is empty, or the read failed)."""
    error: str | None = None
    """Why it could not be read (no stream port, plugin off, refused...)."""
