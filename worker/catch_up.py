"""Catching up: a node that was away, or is new, replays the requests it missed.

Every request is also kept in the history stream (see ``contract.HISTORY_STREAM``).
Each worker reads that stream for as long as it runs: from where it last got to
(remembered in ``PULLER_STATE_DIR``), or from the start of the window on a node
that has never run. Requests it already served live are skipped; the others go
through the same :class:`~worker.service.PullService` as live ones (validation,
timeouts, retries, the pull cap, one pull per image), with no reply: their
results go to this module's ledger instead.

On each connection the worker puts a :class:`~contract.HistoryMarker` at the end
of the stream. When every entry before its own marker is done, it has caught up,
and ``/ready`` says so. Connection-thread only, except :meth:`CatchUp.status`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import structlog

from contract import (
    ErrorKind,
    HistoryMarker,
    InvalidMessage,
    NodeResult,
    PullRequest,
    Status,
    decode_history,
    decode_reply,
)
from worker.broker import Delivery, HistoryConsumer

log = structlog.get_logger("worker.catch_up")

STATE_FILE = "history-offset.json"
SEEN_LIVE_LIMIT = 10_000
"""Request ids served live that a replay skips; older ones are served again (cheaply:
the image is there)."""

CHECKPOINT_INTERVAL = 30.0
"""Seconds between saves of how far a connected, caught-up node has got."""

REPLAY_REPLY_TO = "puller.replay"
"""The ``reply_to`` of a replayed request: its result goes to the ledger, not the broker."""


class CannotKeepState(Exception):
    """``PULLER_STATE_DIR`` cannot be created or written."""


class OffsetStore:
    """The offset of the last history entry this node is done with, on the node's disk."""

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / STATE_FILE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            probe = state_dir / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise CannotKeepState(
                f"PULLER_STATE_DIR={str(state_dir)!r} cannot be written ({error.strerror}); "
                "point it at a directory on the node's disk this worker can write"
            ) from None

    def load(self) -> int | None:
        try:
            offset = json.loads(self._path.read_text())["offset"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "unreadable catch-up state; replaying the whole window",
                path=str(self._path),
                error=str(error),
            )
            return None
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            log.warning("invalid catch-up state; replaying the whole window", offset=offset)
            return None
        return offset

    def save(self, offset: int) -> None:
        temporary = self._path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps({"offset": offset, "saved_at": time.time()}))
            os.replace(temporary, self._path)
        except OSError as error:  # a full disk must not stop the node serving live requests
            log.warning("could not save the catch-up state", error=str(error))


class Ledger:
    """Which history entries are in hand and which are done; done ones advance the saved
    offset only when every entry before them is done too, so a restart never skips one."""

    def __init__(self, store: OffsetStore) -> None:
        self._store = store
        self.committed = store.load()
        self._in_order: deque[int] = deque()
        self._done: set[int] = set()

    def start_offset(self) -> int | str:
        """Where a new history consumer starts: after the saved offset, else the start."""
        return "first" if self.committed is None else self.committed + 1

    def restart(self) -> None:
        """A new consumer redelivers everything not committed; forget what was in hand."""
        self._in_order.clear()
        self._done.clear()

    def delivered(self, offset: int) -> None:
        self._in_order.append(offset)

    def done(self, offset: int) -> None:
        self._done.add(offset)
        advanced = None
        while self._in_order and self._in_order[0] in self._done:
            advanced = self._in_order.popleft()
            self._done.discard(advanced)
        if advanced is not None:
            self.jump(advanced)

    def jump(self, offset: int) -> None:
        """Everything up to ``offset`` is done (never moves back)."""
        if self.committed is None or offset > self.committed:
            self.committed = offset
            self._store.save(offset)

    @property
    def in_hand(self) -> int:
        return len(self._in_order)


class HistoryBroker(Protocol):
    """The part of the worker's broker catch-up uses (connection thread only)."""

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def ack(self, delivery: Delivery) -> None: ...

    def consume_history(self, history: HistoryConsumer) -> None: ...

    def stop_history(self) -> None: ...


class RequestServer(Protocol):
    def accept(self, request: PullRequest, delivery: Delivery, channel: ReplayChannel) -> None: ...


@dataclass(frozen=True)
class CatchUpStatus:
    connected: bool
    caught_up: bool
    pending: int
    """Replayed requests in hand, not yet done."""
    failed: int
    """Replayed requests whose pull failed since the worker started."""
    committed_offset: int | None

    def to_json(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "caught_up": self.caught_up,
            "replay_pending": self.pending,
            "replay_failed": self.failed,
            "history_offset": self.committed_offset,
        }


class _Reading(Enum):
    NONE = "none"
    CATCH_UP = "catch_up"
    """From the saved offset to this connection's marker, replaying what was missed."""
    CHECKPOINT = "checkpoint"
    """Only the stream's last chunk, to move the saved offset up to a fresh marker."""


class CatchUp:
    """Feeds the history stream to the pull service, and knows when the node has caught up.

    The stream is read only while there is something to learn from it: on each new
    connection, up to the marker put at its end (everything the node may have missed),
    and then, now and then while connected, idle and fed live, its last chunk only up to
    a fresh marker, to save how far the node got. Between them the live queue brings
    every request, and no broker work is spent on the history per request.
    """

    def __init__(
        self,
        node: str,
        ledger: Ledger,
        server: RequestServer,
        broker: HistoryBroker,
        max_age: float,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        self.node = node
        self._ledger = ledger
        self._server = server
        self._broker = broker
        self._max_age = max_age
        self._checkpoint_interval = checkpoint_interval
        self._seen_live: OrderedDict[str, None] = OrderedDict()
        self._live_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._reading = _Reading.NONE
        self._marker_id = ""
        self._marker_offset: int | None = None
        self._connected = False
        self._caught_up = False
        self._round = 0
        self._failed = 0
        self._status = self._snapshot()

    def on_connect(self) -> HistoryConsumer:
        """A new connection: read the history from the saved offset up to a new marker."""
        self._ledger.restart()
        self._round += 1
        self._marker_offset = None
        self._caught_up = False
        self._connected = True
        self._update()
        start = self._ledger.start_offset()
        log.info("catching up", history_from=start)
        return self._reading_from(start, _Reading.CATCH_UP)

    def on_disconnect(self) -> None:
        self._connected = False
        self._reading = _Reading.NONE
        self._update()

    def note_live(self, request: PullRequest | None) -> None:
        """A request served from the live queue: its history entry needs no replay."""
        if request is None:
            return
        self._live_since_checkpoint += 1
        self._seen_live[request.request_id] = None
        if len(self._seen_live) > SEEN_LIVE_LIMIT:
            self._seen_live.popitem(last=False)

    def checkpoint_if_due(self, unanswered: int) -> None:
        """Connection thread, between events: when caught up, idle, and fed live since the
        last time, reads the stream's last chunk up to a fresh marker and saves its offset.
        Idle matters: every request before the marker has then been answered."""
        if (
            self._reading is _Reading.NONE
            and self._connected
            and self._caught_up
            and self._live_since_checkpoint
            and unanswered == 0
            and time.monotonic() - self._last_checkpoint >= self._checkpoint_interval
        ):
            self._last_checkpoint = time.monotonic()
            self._live_since_checkpoint = 0
            self._broker.consume_history(self._reading_from("last", _Reading.CHECKPOINT))

    def _reading_from(self, start: int | str, reading: _Reading) -> HistoryConsumer:
        self._reading = reading
        self._marker_id = uuid.uuid4().hex
        marker = HistoryMarker(self.node, self._marker_id).encode()
        return HistoryConsumer(start, marker, self.on_history)

    def on_history(self, delivery: Delivery) -> None:
        """One history entry. Never raises."""
        offset = delivery.history_offset
        if offset is None or self._reading is _Reading.NONE:
            return  # stragglers after a cancel: the broker takes them back
        if self._reading is _Reading.CHECKPOINT:
            self._checkpoint_entry(delivery, offset)
        else:
            self._catch_up_entry(delivery, offset)

    def _catch_up_entry(self, delivery: Delivery, offset: int) -> None:
        self._ledger.delivered(offset)
        channel = ReplayChannel(self, self._broker, self._round)
        try:
            entry = decode_history(delivery.body)
        except InvalidMessage as error:
            log.warning("skipping a history entry that breaks the contract", error=str(error))
            channel.ack(delivery)
            return
        except Exception:
            log.exception("decoding a history entry failed unexpectedly")
            channel.ack(delivery)
            return
        if isinstance(entry, HistoryMarker):
            if entry.marker_id == self._marker_id:
                self._marker_offset = offset
            channel.ack(delivery)
            return
        age = time.time() - entry.requested_at
        if age > self._max_age:
            log.info(
                "not replaying a request older than the window",
                request_id=entry.request_id,
                image=str(entry.image),
                age=round(age),
            )
            channel.ack(delivery)
            return
        if entry.request_id in self._seen_live:
            channel.ack(delivery)
            return
        log.info("replaying", request_id=entry.request_id, image=str(entry.image), offset=offset)
        replay = dataclasses.replace(
            delivery, reply_to=REPLAY_REPLY_TO, correlation_id=entry.request_id
        )
        self._server.accept(entry, replay, channel)

    def _checkpoint_entry(self, delivery: Delivery, offset: int) -> None:
        self._broker.ack(delivery)
        try:
            entry = decode_history(delivery.body)
        except Exception:  # anything not ours is passed over
            return
        if isinstance(entry, HistoryMarker) and entry.marker_id == self._marker_id:
            self._reading = _Reading.NONE
            self._ledger.jump(offset)
            self._update()
            log.debug("history checkpoint", history_offset=offset)
            self._broker.stop_history()

    def finished(self, delivery: Delivery, round_: int) -> None:
        """An entry is done. One from an earlier connection is redelivered on this one, and
        counts when that copy is done."""
        if round_ == self._round and delivery.history_offset is not None:
            self._ledger.done(delivery.history_offset)
        self._update()

    def record(self, result: NodeResult) -> None:
        if result.error is not None and result.error.kind is ErrorKind.CANCELLED:
            log.info("a replayed pull was cancelled; it is replayed on the next start")
            return
        if result.status is Status.FAILED:
            self._failed += 1
            log.warning(
                "a replayed pull failed",
                request_id=result.request_id,
                image=result.image,
                error=result.error.message if result.error else None,
            )

    def status(self) -> CatchUpStatus:
        """Any thread: the state as of the last change."""
        return self._status

    def _update(self) -> None:
        committed, marker = self._ledger.committed, self._marker_offset
        if (
            not self._caught_up
            and self._reading is _Reading.CATCH_UP
            and marker is not None
            and committed is not None
            and committed >= marker
        ):
            self._caught_up = True
            self._reading = _Reading.NONE
            self._last_checkpoint = time.monotonic()
            log.info("caught up", history_offset=committed, replay_failed=self._failed)
            self._status = self._snapshot()
            self._broker.stop_history()
        self._status = self._snapshot()

    def _snapshot(self) -> CatchUpStatus:
        return CatchUpStatus(
            connected=self._connected,
            caught_up=self._connected and self._caught_up,
            pending=self._ledger.in_hand,
            failed=self._failed,
            committed_offset=self._ledger.committed,
        )


class ReplayChannel:
    """What a replayed request answers through: results go to the ledger, acks to the
    history stream's channel."""

    def __init__(self, catch_up: CatchUp, broker: HistoryBroker, round_: int) -> None:
        self._catch_up = catch_up
        self._broker = broker
        self._round = round_
        self._cancelled = False

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._broker.call_soon(callback)

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        try:
            answer = decode_reply(body)
        except InvalidMessage:
            return
        if isinstance(answer, NodeResult):
            self._catch_up.record(answer)
            if answer.error is not None and answer.error.kind is ErrorKind.CANCELLED:
                self._cancelled = True

    def ack(self, delivery: Delivery) -> None:
        try:
            self._broker.ack(delivery)
        finally:
            # A pull cancelled by shutdown is not done: the offset stays before it.
            if not self._cancelled:
                self._catch_up.finished(delivery, self._round)

    def reject(self, delivery: Delivery) -> None:
        try:
            self._broker.ack(delivery)  # a stream takes acks only; the entry is done
        finally:
            self._catch_up.finished(delivery, self._round)
