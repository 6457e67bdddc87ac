"""The keeper: the one worker that writes the desired state.

Every worker consumes the keeper's token queue; the one RabbitMQ gives the token to is the
keeper until its connection goes. Every ``interval`` seconds, and once on getting the token,
the keeper reads the newest snapshot (``puller.desired.stream``) and the history after it,
merges them (:class:`~worker.desired.view.DesiredView`), drops what left the window, and
publishes a new snapshot, confirmed, when the history moved. All on the connection's thread,
never waiting: each step starts the next from a callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import structlog

from contract import InvalidMessage, PullRequest, decode_history
from contract import topology as topo
from contract.desired import DesiredState
from worker.broker.delivery import TailRead
from worker.broker.desired import OnEntry, StreamRead
from worker.catch_up.ledger import lost_entries
from worker.desired.view import DesiredView

log = structlog.get_logger("worker.keeper")

DUTY_TIMEOUT = 120.0
"""Seconds a keeper's round may take before it is given up (and tried again next time)."""


class DesiredAccess(Protocol):
    """What the keeper and the reconciler use of the worker's connection
    (:class:`worker.broker.desired.DesiredLink`)."""

    def consume_token(self, on_token: Callable[[], None]) -> None: ...

    def read_stream(self, stream: str, start: int | str, on_entry: OnEntry) -> StreamRead: ...

    def read_newest(
        self, stream: str, on_found: Callable[[bytes | None, str | None], None]
    ) -> None: ...

    def publish_confirmed(
        self, exchange: str, body: bytes, on_confirmed: Callable[[bool], None]
    ) -> None: ...


@dataclass
class _Round:
    """One keeper's round: the snapshot it started from and what it read since."""

    deadline: float
    view: DesiredView = field(default_factory=DesiredView)
    previous: int = -1
    """The offset read from (the snapshot's ``through_offset``; -1: from the first)."""
    end: int = -1
    complete_since: float = 0.0
    first_seen: bool = False
    broken: bool = False
    """The history lost entries after ``previous``: complete only from the first one left."""
    reading: StreamRead | None = None


class Keeper:
    """Holds the token or waits for it; writes the desired state while it holds it."""

    def __init__(
        self,
        node: str,
        link: DesiredAccess,
        find_tail: Callable[[Callable[[TailRead], None]], None],
        window: float,
        interval: float,
        on_written: Callable[[DesiredState], None] = lambda _state: None,
    ) -> None:
        self._node = node
        self._link = link
        self._find_tail = find_tail
        self._window = window
        self._interval = interval
        self._on_written = on_written
        self._connection = 0
        """Counts connections and disconnections: an answer for an earlier one is dropped."""
        self.holding = False
        self._round: _Round | None = None
        self._due = 0.0

    def on_connect(self) -> None:
        self._end_connection()
        self._link.consume_token(partial(self._got_token, self._connection))

    def on_disconnect(self) -> None:
        self._end_connection()

    def tick(self) -> None:
        """From the daemon's loop: a round when one is due; a round that hangs is given up."""
        now = time.monotonic()
        current = self._round
        if current is not None and now > current.deadline:
            log.warning("the keeper's round took too long; trying again later")
            self._finish(current)
        if self.holding and self._round is None and now >= self._due:
            self._start(now)

    # -- the round ---------------------------------------------------------------------------

    def _end_connection(self) -> None:
        self._connection += 1
        if self.holding:
            log.info("no longer the keeper (the connection went)")
        self.holding = False
        if self._round is not None and self._round.reading is not None:
            self._round.reading.stop()
        self._round = None

    def _got_token(self, connection: int) -> None:
        if connection != self._connection or self.holding:
            return
        self.holding = True
        self._due = time.monotonic()
        log.info("this worker is the keeper of the desired state", interval=self._interval)

    def _start(self, now: float) -> None:
        current = self._round = _Round(deadline=now + DUTY_TIMEOUT)
        self._due = now + self._interval
        self._link.read_newest(
            topo.DESIRED_STREAM.name, partial(self._snapshot_read, self._connection, current)
        )

    def _live(self, connection: int, current: _Round) -> bool:
        return connection == self._connection and current is self._round

    def _snapshot_read(
        self, connection: int, current: _Round, body: bytes | None, why: str | None
    ) -> None:
        if not self._live(connection, current):
            return
        if why is not None:
            log.warning("cannot read the newest desired state; trying again later", error=why)
            self._finish(current)
            return
        snapshot = None
        if body is not None:
            try:
                snapshot = DesiredState.decode(body)
            except InvalidMessage as error:
                log.warning("the newest desired state is unreadable; rebuilding", error=str(error))
        if snapshot is not None:
            current.view = DesiredView(snapshot.requests)
            current.previous = snapshot.through_offset
            current.complete_since = snapshot.complete_since
        self._find_tail(partial(self._history_end, connection, current))

    def _history_end(self, connection: int, current: _Round, found: TailRead) -> None:
        if not self._live(connection, current):
            return
        if found.error is not None or found.offset is None:
            if found.error is not None:
                log.warning("cannot read where the history ends", error=found.error)
            self._finish(current)
            return
        current.end = found.offset
        if current.previous > found.offset:  # the history was deleted and declared again
            log.warning("the history restarted its offsets; rebuilding the desired state")
            current.previous, current.broken = -1, True
        elif current.previous == found.offset:
            self._finish(current)  # the history did not move: nothing new to write
            return
        start: int | str = "first" if current.previous < 0 else current.previous
        current.reading = self._link.read_stream(
            topo.HISTORY_STREAM_NAME, start, partial(self._entry, connection, current)
        )

    def _entry(self, connection: int, current: _Round, offset: int, body: bytes) -> None:
        if not self._live(connection, current) or offset <= current.previous:
            return
        if not current.first_seen:
            current.first_seen = True
            lost = lost_entries(current.previous, offset, identity_match=True)
            current.broken = current.broken or lost is None or lost > 0
        try:
            entry = decode_history(body)
        except InvalidMessage:
            entry = None
        if isinstance(entry, PullRequest):
            if current.broken:
                current.broken = False  # complete from the first request the history kept
                current.complete_since = max(current.complete_since, entry.requested_at)
            current.view.add(entry)
        if offset >= current.end:
            if current.reading is not None:
                current.reading.stop()
            self._write(connection, current)

    def _write(self, connection: int, current: _Round) -> None:
        now = time.time()
        current.view.prune(now - self._window)
        if current.broken:  # lost entries, and no request after them: complete from now
            current.complete_since = now
        state = DesiredState(
            written_at=now,
            written_by=self._node,
            window=self._window,
            through_offset=current.end,
            complete_since=current.complete_since,
            requests=current.view.requests(),
        )
        self._link.publish_confirmed(
            topo.DESIRED.name, state.encode(), partial(self._written, connection, current, state)
        )

    def _written(self, connection: int, current: _Round, state: DesiredState, ok: bool) -> None:
        if not self._live(connection, current):
            return
        if ok:
            log.info(
                "wrote the desired state",
                images=len(state.requests),
                through_offset=state.through_offset,
                complete_since=state.complete_since,
            )
            self._on_written(state)
        else:
            log.warning("RabbitMQ did not take the desired state; trying again later")
        self._finish(current)

    def _finish(self, current: _Round) -> None:
        if current.reading is not None:
            current.reading.stop()
        if current is self._round:
            self._round = None
