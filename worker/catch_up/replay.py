"""Catching up: replaying the pulls a node missed while its worker was away.

An exclusive queue exists only while its worker is connected, so requests published while
a node's worker was down never reach it live; every request is also in the history stream.
On each connection the worker reads that stream, through the same pull service as live
requests, up to a marker it puts at the end; then it stops reading until the next
connection, except for a short checkpoint now and then. Where it got to is kept by the
ledger (:mod:`worker.catch_up.ledger`).

The phases, in order (all on the connection's thread)::

    DISCONNECTED --connect--> FINDING_END --marker read--> REPLAYING --all done--> CAUGHT_UP
                                                                   ^                  |
                                      (checkpoint: last chunk to a marker) CHECKPOINTING

- FINDING_END: reads only the stream's last chunk up to a fresh marker, to learn where the
  stream ends now. A saved place beyond that end, or whose entry is not the one saved, is
  from a stream deleted since: the worker says so and starts from the beginning.
- REPLAYING: from the saved place to that end; each request goes to the pull service
  (validation, retries, one pull per image) without a reply.
- CHECKPOINTING: while caught up, idle and fed live requests, at most every 30 s: reads
  the last chunk up to a fresh marker and saves the marker's offset, so that a restart
  does not replay what was served live.

An entry that stopped the worker (it died while the entry was in hand, see
:mod:`worker.catch_up.attempts`) is worked alone at the next start: nothing else is started
beside it, and it waits for what is in hand. One that :data:`MAX_STARTS` runs started
without an end is skipped, logged as an error and counted
(``puller_worker_replay_skipped_total{reason="stopped_the_worker"}``): a replayed request
owes no reply (its publisher had the live copy's answer, or ``no_reply``).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Literal, Protocol

import structlog

from contract import (
    ErrorKind,
    HistoryMarker,
    InvalidMessage,
    NodeResult,
    PullRequest,
    decode_history,
)
from worker.broker import HistoryReading
from worker.catch_up.attempts import MAX_STARTS, ReplayAttempts
from worker.catch_up.ledger import Ledger, Place, entry_identity
from worker.delivery import Delivery
from worker.pulls.answers import AnswerCallback, ProgressCallback

log = structlog.get_logger("worker.catch_up")

SEEN_LIVE_LIMIT = 10_000
"""Request ids served live that a replay skips; older ones are served again (cheaply:
the image is there)."""

CHECKPOINT_INTERVAL = 30.0
"""Seconds between saves of how far a connected, caught-up node has got."""


SkipReason = Literal["served_live", "too_old", "invalid", "forbidden", "stopped_the_worker"]
"""Why a history entry was not replayed (``forbidden``: this node's rules refused it)."""


class ReplayObserver:
    """Sees what catching up does (the metrics); each hook does nothing here, a subclass
    implements those it needs. Called on the connection's thread; must not block."""

    def replay_started(self, request: PullRequest) -> None:
        """A history entry is handed to the pull service."""

    def replay_skipped(self, reason: SkipReason) -> None:
        """A history entry is not replayed, or its answer does not count as a failure."""

    def replay_failed(self, result: NodeResult) -> None:
        """A replayed request's pull failed."""


class Phase(Enum):
    DISCONNECTED = "disconnected"
    FINDING_END = "finding the end of the history"
    REPLAYING = "replaying missed pulls"
    CAUGHT_UP = "caught up"
    CHECKPOINTING = "caught up (saving its place)"


class HistoryBroker(Protocol):
    """The part of the worker's broker catch-up uses."""

    def read_history(self, reading: HistoryReading) -> None: ...

    def stop_history(self) -> None: ...

    def answer(self, delivery: Delivery, result: NodeResult | None) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def is_current(self, delivery: Delivery) -> bool: ...


class RequestServer(Protocol):
    def submit(
        self,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None = None,
        *,
        asked_by: str | None = None,
        live: bool = True,
    ) -> None: ...


@dataclass(frozen=True)
class _Work:
    """A replayed request to hand to the pull service."""

    delivery: Delivery
    request: PullRequest
    offset: int
    identity: str
    suspect: bool
    """It was in hand when a run of the worker died: worked alone."""


@dataclass(frozen=True)
class CatchUpStatus:
    """What ``/ready`` and presence announcements say about catching up."""

    connected: bool
    caught_up: bool
    replay_pending: int
    """Replayed requests in hand, not yet done."""
    replay_failed: int
    """Replayed requests whose pull failed since the worker started."""
    history_offset: int | None
    phase: str


class CatchUp:
    """Feeds the history stream to the pull service and knows when the node has caught up."""

    def __init__(
        self,
        node: str,
        ledger: Ledger,
        server: RequestServer,
        broker: HistoryBroker,
        max_age: float,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        observer: ReplayObserver | None = None,
        attempts: ReplayAttempts | None = None,
        working_limit: int = 64,
    ) -> None:
        """``observer``: sees replays and skips (none: nobody does); ``attempts``: the entries
        in hand, written down over restarts (memory only by default); ``working_limit``:
        entries handed to the pull service at once (the stream delivers whole chunks, beyond
        its prefetch: the rest wait here)."""
        self.node = node
        self._observer = observer or ReplayObserver()
        self._attempts = attempts or ReplayAttempts(None)
        self._waiting: deque[_Work] = deque()
        """Entries not yet handed over: behind a suspect, or a suspect behind others."""
        self._working: dict[Delivery, bool] = {}
        """Entries handed to the pull service and not done, each with whether a suspect."""
        self._suspects_working = 0
        self._working_limit = max(1, working_limit)
        self._ledger = ledger
        self._server = server
        self._broker = broker
        self._max_age = max_age
        self._checkpoint_interval = checkpoint_interval
        self._seen_live: OrderedDict[str, None] = OrderedDict()
        self._live_since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self.phase = Phase.DISCONNECTED
        self._marker_id = ""
        self._end: int | None = None
        """The offset of the marker that ends this connection's replay."""
        self._verify: Place | None = None
        """The saved place, to check against the first entries of the replay."""
        self._failed = 0
        self._status = self._snapshot()

    # -- transitions (connection thread) -----------------------------------------------------

    def on_connect(self) -> None:
        """A new connection: find where the stream ends now, then replay up to there."""
        self._ledger.restart()
        self._waiting.clear()  # the old reading's: delivered again on the new one
        self._end = None
        self._read(Phase.FINDING_END, "last")

    def on_disconnect(self) -> None:
        self.phase = Phase.DISCONNECTED
        self._waiting.clear()
        self._update()

    def close(self) -> None:
        """The worker stops of its own accord: what it had in hand did not stop it."""
        self._attempts.forgive()

    def note_live(self, request: PullRequest) -> None:
        """A request served from the live queue: its history entry needs no replay."""
        self._live_since_checkpoint += 1
        self._seen_live[request.request_id] = None
        if len(self._seen_live) > SEEN_LIVE_LIMIT:
            self._seen_live.popitem(last=False)

    def checkpoint_if_due(self, unanswered: int) -> None:
        """Between events: when caught up, idle, and fed live since the last time, reads the
        stream's last chunk up to a fresh marker and saves its offset. Idle matters: every
        request before the marker has then been answered."""
        if (
            self.phase is Phase.CAUGHT_UP
            and self._live_since_checkpoint
            and unanswered == 0
            and time.monotonic() - self._last_checkpoint >= self._checkpoint_interval
        ):
            self._last_checkpoint = time.monotonic()
            self._live_since_checkpoint = 0
            self._read(Phase.CHECKPOINTING, "last")

    def _read(self, phase: Phase, start: int | str) -> None:
        self.phase = phase
        self._marker_id = uuid.uuid4().hex
        marker = HistoryMarker(self.node, self._marker_id).encode()
        self._update()
        self._broker.read_history(HistoryReading(start, marker, self._on_entry))

    def _found_end(self, end: int) -> None:
        """FINDING_END -> REPLAYING (or straight to CAUGHT_UP)."""
        self._end = end
        saved = self._ledger.committed
        self._verify = None
        if saved is not None and saved.offset >= end:
            log.warning(
                "the saved history place is beyond the end of the stream: the stream was "
                "deleted and declared again since; replaying it from the beginning",
                saved_offset=saved.offset,
                stream_end=end,
            )
            self._ledger.forget_place()
            saved = None
        if saved is None:
            start: int | str = "first"
        elif saved.identity is None:
            start = saved.offset + 1  # an older state file: nothing to check it against
        else:
            start, self._verify = saved.offset, saved
        log.info("catching up", history_from=start, history_end=end)
        self._ledger.restart()
        self._read(Phase.REPLAYING, start)

    def _restart_from_the_beginning(self, offset: int, found: str) -> None:
        log.warning(
            "the saved history place holds another entry: the stream was deleted and "
            "declared again since; replaying it from the beginning",
            saved_offset=offset,
            saved_identity=self._verify.identity if self._verify else None,
            found_identity=found,
        )
        self._verify = None
        self._ledger.forget_place()
        self._read(Phase.REPLAYING, "first")

    # -- entries (connection thread) ---------------------------------------------------------

    def _on_entry(self, delivery: Delivery) -> None:
        """One history entry. Never raises."""
        offset = delivery.history_offset
        if offset is None or not self._broker.is_current(delivery):
            return
        identity = entry_identity(delivery.body)
        if self.phase in (Phase.FINDING_END, Phase.CHECKPOINTING):
            self._broker.answer(delivery, None)
            if self._is_my_marker(delivery.body):
                self._marker_read(offset, identity)
            return
        if self.phase is not Phase.REPLAYING:
            return
        if self._verify is not None:
            verify, self._verify = self._verify, None
            if offset == verify.offset:
                if identity != verify.identity:
                    self._restart_from_the_beginning(offset, identity)
                    return
                self._broker.answer(delivery, None)  # the saved entry itself: done
                return
        self._ledger.delivered(offset, identity)
        self._replay(delivery, offset, identity)
        self._update()

    def _is_my_marker(self, body: bytes) -> bool:
        try:
            entry = decode_history(body)
        except InvalidMessage:
            return False
        return isinstance(entry, HistoryMarker) and entry.marker_id == self._marker_id

    def _marker_read(self, offset: int, identity: str) -> None:
        if self.phase is Phase.FINDING_END:
            self._found_end(offset)
            return
        self.phase = Phase.CAUGHT_UP  # a checkpoint
        self._ledger.jump(Place(offset, identity))
        self._broker.stop_history()
        log.debug("history checkpoint", history_offset=offset)
        self._update()

    def _replay(self, delivery: Delivery, offset: int, identity: str) -> None:
        try:
            entry = decode_history(delivery.body)
        except InvalidMessage as error:
            log.warning("skipping a history entry that breaks the contract", error=str(error))
            self._observer.replay_skipped("invalid")
            self._entry_done(delivery, None)
            return
        except Exception:
            log.exception("decoding a history entry failed unexpectedly")
            self._observer.replay_skipped("invalid")
            self._entry_done(delivery, None)
            return
        if isinstance(entry, HistoryMarker):
            self._entry_done(delivery, None)
            return
        age = time.time() - entry.requested_at
        if age > self._max_age:
            log.info(
                "not replaying a request older than the window",
                request_id=entry.request_id,
                image=str(entry.image),
                age=round(age),
            )
            self._observer.replay_skipped("too_old")
            self._entry_done(delivery, None)
            return
        if entry.request_id in self._seen_live:
            self._observer.replay_skipped("served_live")
            self._entry_done(delivery, None)
            return
        starts = self._attempts.starts(offset, identity)
        if starts >= MAX_STARTS:
            log.error(
                "skipped a history entry: the worker died each time it replayed it; "
                "pull the image by hand if it is needed, and report the worker's log",
                request_id=entry.request_id,
                image=str(entry.image),
                offset=offset,
                runs=starts,
            )
            self._observer.replay_skipped("stopped_the_worker")
            self._attempts.skip(offset)
            self._entry_done(delivery, None)
            return
        if starts:
            log.warning(
                "replaying alone an entry that was in hand when the worker died",
                request_id=entry.request_id,
                image=str(entry.image),
                offset=offset,
                runs=starts,
            )
        self._waiting.append(_Work(delivery, entry, offset, identity, suspect=starts > 0))
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Hands over the waiting entries, in order, that may start: at most the working
        limit at once, a suspect only when nothing else is worked, and nothing beside it."""
        while self._waiting:
            work = self._waiting[0]
            if (
                self._suspects_working
                or (work.suspect and self._working)
                or len(self._working) >= self._working_limit
            ):
                return
            self._waiting.popleft()
            self._start(work)

    def _start(self, work: _Work) -> None:
        request, delivery = work.request, work.delivery
        log.info(
            "replaying", request_id=request.request_id, image=str(request.image), offset=work.offset
        )
        self._observer.replay_started(request)
        self._attempts.begin(work.offset, work.identity)
        self._working[delivery] = work.suspect
        self._suspects_working += work.suspect
        self._server.submit(
            request,
            lambda result: self._broker.call_soon(partial(self._entry_done, delivery, result)),
            asked_by=delivery.user_id,
            live=False,
        )

    def _entry_done(self, delivery: Delivery, result: NodeResult | None) -> None:
        """Connection thread. An entry from an earlier reading is ignored: it is delivered
        again on the current one, and counts when that copy is done."""
        if delivery in self._working:
            self._suspects_working -= self._working.pop(delivery)
            if delivery.history_offset is not None:
                self._attempts.end(delivery.history_offset)  # it did not stop the worker
            self._start_waiting()
        if not self._broker.is_current(delivery) or delivery.history_offset is None:
            return
        self._broker.answer(delivery, None)
        error = result.error if result is not None else None
        if error is not None and error.kind is ErrorKind.CANCELLED:
            # Cancelled by shutdown: not done, the saved place stays before it.
            log.info("a replayed pull was cancelled; it is replayed on the next start")
            return
        if error is not None and error.kind is ErrorKind.FORBIDDEN:
            # Refused by this node's rules: not the node's failure; nothing to catch up on.
            self._observer.replay_skipped("forbidden")
        elif result is not None and error is not None:
            self._failed += 1
            self._observer.replay_failed(result)
            log.warning(
                "a replayed pull failed",
                request_id=result.request_id,
                image=result.image,
                error=error.message,
            )
        self._ledger.done(delivery.history_offset)
        self._update()

    # -- state --------------------------------------------------------------------------------

    def status(self) -> CatchUpStatus:
        """Any thread: the state as of the last change."""
        return self._status

    def _update(self) -> None:
        committed, end = self._ledger.committed_offset, self._end
        if (
            self.phase is Phase.REPLAYING
            and end is not None
            and committed is not None
            and committed >= end
        ):
            self.phase = Phase.CAUGHT_UP
            self._last_checkpoint = time.monotonic()
            log.info("caught up", history_offset=committed, replay_failed=self._failed)
            self._broker.stop_history()
        self._status = self._snapshot()

    def _snapshot(self) -> CatchUpStatus:
        caught_up = self.phase in (Phase.CAUGHT_UP, Phase.CHECKPOINTING)
        return CatchUpStatus(
            connected=self.phase is not Phase.DISCONNECTED,
            caught_up=caught_up,
            replay_pending=self._ledger.in_hand,
            replay_failed=self._failed,
            history_offset=self._ledger.committed_offset,
            phase=self.phase.value,
        )
