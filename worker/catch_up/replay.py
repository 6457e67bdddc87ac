"""Catching up: replaying the pulls a node missed while its worker was away.

An exclusive queue exists only while its worker is connected, so requests published while
a node's worker was down never reach it live; every request is also in the history stream.
On each connection the worker learns where that stream ends, reads it from where it got to
up to there, through the same pull service as live requests; then it stops reading, except
for one sweep per connection and a short checkpoint now and then. Nothing of this writes
into the history (but the fallback's marker). Where it got to is kept by the ledger
(:mod:`worker.catch_up.ledger`).

The phases, in order (all on the connection's thread)::

    DISCONNECTED --connect--> FINDING_END --end read--> REPLAYING --all done--> CAUGHT_UP
                                      (a loss) RECONCILING <--+                |    ^
                      (once per connection, SWEEP_DELAY after caught up) SWEEPING -+
                      (idle and fed live, at most every 30 s)       CHECKPOINTING -+

- FINDING_END: the stream's last offset, read over the stream protocol off the
  connection's thread (:meth:`worker.broker.WorkerBroker.find_tail`). Without the stream
  port (plugin off, port closed, refused) it falls back to reading the last chunk up to a
  fresh marker of its own, as earlier versions did (logged, counted).
- REPLAYING: from the saved place itself to that end. The first entry delivered tells
  whether the history lost entries this node had not replayed (:func:`lost_entries`): a
  loss is logged, counted and shown in presence, and the node reconciles. A saved place
  beyond the end, or whose entry is not the one saved, is from a stream deleted since: the
  worker says so and starts from the beginning.
- RECONCILING: the newest snapshot of the desired state is applied, then the history after
  it and after the loss is replayed (:mod:`worker.catch_up.reconcile`). A node with no
  saved place goes there straight from FINDING_END when a snapshot stands for its whole
  window: it pulls each image once instead of replaying every request of the window.
- SWEEPING: once per connection, a few seconds after caught up: reads from the committed
  place up to the first entry of the stream's last chunk, serving entries not seen live
  (a request whose live copy came before the node's queue was bound, and whose history
  copy came after the end was read).
- CHECKPOINTING: while caught up, idle and fed live requests, at most every 30 s: the
  first entry of the stream's last chunk becomes the saved place, so that a restart does
  not replay what was served live. Idle matters: every request before it was answered.

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
from functools import partial

import structlog

from contract import (
    ErrorKind,
    HistoryGap,
    HistoryMarker,
    InvalidMessage,
    NodeResult,
    PullRequest,
    decode_history,
)
from worker.broker import HistoryReading, TailRead
from worker.broker.delivery import Delivery
from worker.catch_up.attempts import MAX_STARTS, ReplayAttempts
from worker.catch_up.ledger import Ledger, Place, entry_identity, lost_entries, requested_at
from worker.catch_up.observer import ReplayObserver
from worker.catch_up.ports import HistoryBroker, RequestServer
from worker.catch_up.reconcile import ReadDesired, Reconciling
from worker.catch_up.status import CAUGHT_UP_PHASES, CatchUpStatus, Phase

log = structlog.get_logger("worker.catch_up")

SEEN_LIVE_LIMIT = 10_000
"""Request ids served live that a replay skips; older ones are served again (cheaply:
the image is there)."""

CHECKPOINT_INTERVAL = 30.0
"""Seconds between saves of how far a connected, caught-up node has got."""

SWEEP_DELAY = 5.0
"""Seconds after a connection's catch-up before its sweep."""


@dataclass(frozen=True)
class _Work:
    """A replayed request to hand to the pull service."""

    delivery: Delivery
    request: PullRequest
    offset: int
    identity: str
    suspect: bool
    """It was in hand when a run of the worker died: worked alone."""


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
        sweep_delay: float = SWEEP_DELAY,
        read_desired: ReadDesired | None = None,
    ) -> None:
        """``observer``: sees replays and skips (none: nobody does); ``attempts``: the entries
        in hand, written down over restarts (memory only by default); ``working_limit``:
        entries handed to the pull service at once (the stream delivers whole chunks, beyond
        its prefetch: the rest wait here); ``read_desired``: where a loss is made good from
        (none: it is reported ``unrecovered``)."""
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
        self._sweep_delay = sweep_delay
        self._seen_live: OrderedDict[str, None] = OrderedDict()
        self._live_since_checkpoint = 0
        self._last_checkpoint = self._caught_up_at = time.monotonic()
        self.phase = Phase.DISCONNECTED
        self._connection = 0
        """Counts connections and disconnections: a tail read for an earlier one is dropped."""
        self._marker_id = ""
        self._end: int | None = None
        """The offset of the last entry this connection's replay reads."""
        self._sweep_end: int | None = None
        """The offset the sweep reads up to, once read (``None``: not yet)."""
        self._swept = False
        self._verify: Place | None = None
        """The saved place, to check against the first entry of the replay."""
        self._failed = 0
        self._gap = HistoryGap.NONE
        self._lost = 0
        self._gap_on_this_connection = False
        self._read_desired = read_desired
        self._reconciling: Reconciling | None = None
        self._status = self._snapshot()

    # -- transitions (connection thread) -----------------------------------------------------

    def on_connect(self) -> None:
        """A new connection: find where the stream ends now, then replay up to there."""
        self._connection += 1
        if self._reconciling is not None:
            self._reconciling.stop()  # its answers are dropped
        self._ledger.restart()
        self._waiting.clear()  # the old reading's: delivered again on the new one
        self._end = self._sweep_end = None
        self._swept = self._gap_on_this_connection = False
        self.phase = Phase.FINDING_END
        self._update()
        self._broker.find_tail(partial(self._tail_read, self._connection))

    def on_disconnect(self) -> None:
        self._connection += 1
        if self._reconciling is not None:
            self._reconciling.stop()  # its answers are dropped
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
        """Between events, while caught up and idle (every request before the place read
        has then been answered): the connection's sweep once it is due; after it, when fed
        live since the last time, a checkpoint at most every ``checkpoint_interval``."""
        if self.phase not in (Phase.CAUGHT_UP, Phase.CHECKPOINTING) or unanswered:
            return
        now = time.monotonic()
        if not self._swept:
            if self.phase is Phase.CAUGHT_UP and now - self._caught_up_at >= self._sweep_delay:
                self._swept = True
                self._sweep_end = None
                self._read(Phase.SWEEPING, "last")  # first: the place to sweep up to
            return
        if self._live_since_checkpoint and now - self._last_checkpoint >= self._checkpoint_interval:
            self._last_checkpoint = now
            self._live_since_checkpoint = 0
            self._read(Phase.CHECKPOINTING, "last")

    def _read(self, phase: Phase, start: int | str, marker: bool = False) -> None:
        self.phase = phase
        body = None
        if marker:
            self._marker_id = uuid.uuid4().hex
            body = HistoryMarker(self.node, self._marker_id).encode()
        self._update()
        self._broker.read_history(HistoryReading(start, body, self._on_entry))

    def _tail_read(self, connection: int, found: TailRead) -> None:
        """The stream protocol's answer: the end, or the fallback to a marker."""
        if connection != self._connection or self.phase is not Phase.FINDING_END:
            return
        if found.error is not None:
            log.warning(
                "cannot read where the history ends over RabbitMQ's stream protocol; "
                "finding it with a marker instead, which writes into the history: enable "
                "the rabbitmq_stream plugin and check PULLER_STREAM_PORT",
                error=found.error,
            )
            self._observer.tail_read("fallback")
            self._read(Phase.FINDING_END, "last", marker=True)
            return
        self._observer.tail_read("tail")
        self._found_end(found.offset, by_marker=False)

    def _found_end(self, end: int | None, by_marker: bool) -> None:
        """FINDING_END -> REPLAYING (or straight to CAUGHT_UP). ``end``: the last entry's
        offset (``None``: the stream is empty); ``by_marker``: it is this node's marker."""
        self._end = end
        saved = self._ledger.committed
        new_node = saved is None
        self._verify = None
        beyond = saved is not None and (
            end is None or saved.offset > end or (by_marker and saved.offset == end)
        )
        if saved is not None and beyond:
            log.warning(
                "the saved history place is beyond the end of the stream: the stream was "
                "deleted and declared again since; replaying it from the beginning",
                saved_offset=saved.offset,
                stream_end=end,
            )
            self._report_gap()
            self._ledger.forget_place()
            saved = None
        self._ledger.restart()
        if end is None:
            self._caught_up()  # an empty stream: nothing to replay
            self._update()
            return
        if new_node and self._read_desired is not None:
            self._start_from_desired(end)
            return
        self._replay_from(saved)

    def _replay_from(self, saved: Place | None) -> None:
        start: int | str = "first" if saved is None else saved.offset
        self._verify = saved
        log.info("catching up", history_from=start, history_end=self._end)
        self._read(Phase.REPLAYING, start)

    def _start_from_desired(self, end: int) -> None:
        """FINDING_END -> RECONCILING, for a node with no saved place: the newest snapshot
        of the desired state, if it covers the window, stands for the history up to where
        it reaches (a new node pulls each image once, not once per request), then the rest
        is replayed; if it does not, the whole history is."""
        self.phase = Phase.RECONCILING
        self._update()
        self._reconciling = self._reconciler(self._started_from_desired)
        self._reconciling.start_fresh(end)

    def _started_from_desired(self, place: Place | None, applied: bool) -> None:
        """RECONCILING -> REPLAYING after the snapshot (or from the first entry)."""
        self._reconciling = None
        if place is None or not applied:
            self._replay_from(None)
            return
        self._observer.started_from_desired()
        self._ledger.jump(place)
        # As a node saved there: the replay starts at that entry itself, so that a loss
        # after it (retention outrunning the keeper) is found and said as any other.
        self._replay_from(place)

    def _restart_from_the_beginning(self, offset: int, found: str) -> None:
        log.warning(
            "the saved history place holds another entry: the stream was deleted and "
            "declared again since; replaying it from the beginning",
            saved_offset=offset,
            saved_identity=self._verify.identity if self._verify else None,
            found_identity=found,
        )
        self._report_gap()
        self._verify = None
        self._ledger.forget_place()
        self._read(Phase.REPLAYING, "first")

    def _report_gap(self) -> None:
        """The stream was deleted and declared again: an unknown loss, counted and shown."""
        self._gap_on_this_connection = True
        self._gap, self._lost = HistoryGap.UNRECOVERED, 0
        self._observer.history_gap(HistoryGap.UNRECOVERED, 0)

    def _reconcile(self, saved: Place, first: int, lost: int) -> None:
        """REPLAYING -> RECONCILING: the history lost ``lost`` entries after ``saved``; the
        first left is at ``first``. Reads the newest snapshot of the desired state."""
        self._broker.stop_history()
        self._ledger.restart()
        self._waiting.clear()
        self._gap_on_this_connection = True
        self._gap, self._lost = HistoryGap.RECONCILING, lost
        self.phase = Phase.RECONCILING
        self._update()
        self._reconciling = self._reconciler(partial(self._reconciled, first))
        self._reconciling.start(saved, first, lost)

    def _reconciler(self, on_done: Callable[[Place | None, bool], None]) -> Reconciling:
        return Reconciling(
            self._read_desired,
            self._server,
            self._broker.call_soon,
            self._working_limit,
            self._max_age,
            self._seen_live,
            self._reconcile_answered,
            on_done,
            self._observer,
        )

    def _reconcile_answered(self, failed: NodeResult | None) -> None:
        if failed is not None:
            self._failed += 1
            self._observer.replay_failed(failed)
        self._update()

    def _reconciled(self, first: int, place: Place | None, recovered: bool) -> None:
        """RECONCILING -> REPLAYING from after the loss and after the snapshot."""
        self._reconciling = None
        self._gap = HistoryGap.RECOVERED if recovered else HistoryGap.UNRECOVERED
        self._observer.history_gap(self._gap, self._lost)
        if place is not None:
            self._ledger.jump(place)  # what the snapshot holds is done
        start = first if place is None else max(first, place.offset + 1)
        if self._end is not None and start > self._end:
            self.phase = Phase.REPLAYING
            self._update()
        else:
            self._read(Phase.REPLAYING, start)

    def _caught_up(self) -> None:
        self.phase = Phase.CAUGHT_UP
        self._last_checkpoint = self._caught_up_at = time.monotonic()
        if not self._gap_on_this_connection and self._gap is not HistoryGap.NONE:
            self._gap, self._lost = HistoryGap.NONE, 0
            self._observer.history_whole()
        log.info(
            "caught up",
            history_offset=self._ledger.committed_offset,
            replay_failed=self._failed,
            history_gap=self._gap.value,
        )
        self._broker.stop_history()

    # -- entries (connection thread) ---------------------------------------------------------

    def _on_entry(self, delivery: Delivery) -> None:
        """One history entry. Never raises."""
        offset = delivery.history_offset
        if offset is None or not self._broker.is_current(delivery):
            return
        self._observer.history_delivered()
        identity = entry_identity(delivery.body)
        if self.phase is Phase.FINDING_END:
            self._broker.answer(delivery, None)
            if self._is_my_marker(delivery.body):
                self._found_end(offset, by_marker=True)
            return
        if self.phase is Phase.CHECKPOINTING or (
            self.phase is Phase.SWEEPING and self._sweep_end is None
        ):
            self._broker.answer(delivery, None)
            self._place_read(offset, identity, delivery.body)
            return
        if self.phase not in (Phase.REPLAYING, Phase.SWEEPING):
            return
        if self._verify is None or self._verified(self._verify, delivery, offset, identity):
            self._ledger.delivered(offset, identity)
            self._replay(delivery, offset, identity)
            self._update()

    def _verified(self, verify: Place, delivery: Delivery, offset: int, identity: str) -> bool:
        """The first entry read from the saved place: whether to replay it (not after a loss)."""
        self._verify = None
        same = verify.identity is None or verify.identity == identity
        lost = lost_entries(verify.offset, offset, same)
        if lost is None:
            self._restart_from_the_beginning(verify.offset, identity)
        elif lost:
            self._reconcile(verify, offset, lost)
        elif offset == verify.offset:
            self._broker.answer(delivery, None)  # the saved entry itself: done
            self._update()
        else:
            return True
        return False

    def _is_my_marker(self, body: bytes) -> bool:
        try:
            entry = decode_history(body)
        except InvalidMessage:
            return False
        return isinstance(entry, HistoryMarker) and entry.marker_id == self._marker_id

    def _place_read(self, offset: int, identity: str, body: bytes) -> None:
        """The first entry of the stream's last chunk: every entry up to it existed before
        the read. A checkpoint saves it; a sweep reads up to it."""
        self._broker.stop_history()
        if self.phase is Phase.CHECKPOINTING:
            self.phase = Phase.CAUGHT_UP
            self._ledger.jump(Place(offset, identity, requested_at(body)))
            log.debug("history checkpoint", history_offset=offset)
            self._update()
            return
        committed = self._ledger.committed_offset
        if committed is not None and committed >= offset:
            self._sweep_done()
            return
        self._sweep_end = offset
        self._ledger.restart()
        self._read(Phase.SWEEPING, "first" if committed is None else committed + 1)

    def _sweep_done(self) -> None:
        self.phase = Phase.CAUGHT_UP
        self._broker.stop_history()
        self._observer.swept()
        log.debug("history swept", history_offset=self._ledger.committed_offset)
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
        self._ledger.requested(offset, entry.requested_at)
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
        committed = self._ledger.committed_offset
        end = self._end if self.phase is Phase.REPLAYING else self._sweep_end
        reached = end is not None and committed is not None and committed >= end
        if reached and self.phase is Phase.REPLAYING:
            self._caught_up()
        elif reached and self.phase is Phase.SWEEPING:
            self._sweep_done()
            return  # _sweep_done() updates
        self._status = self._snapshot()

    def _snapshot(self) -> CatchUpStatus:
        return CatchUpStatus(
            connected=self.phase is not Phase.DISCONNECTED,
            caught_up=self.phase in CAUGHT_UP_PHASES,
            replay_pending=self._ledger.in_hand
            + (self._reconciling.pending if self._reconciling else 0),
            replay_failed=self._failed,
            history_offset=self._ledger.committed_offset,
            phase=self.phase.value,
            history_gap=self._gap,
            history_lost=self._lost,
        )
