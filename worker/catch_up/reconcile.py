"""Reconciling: a node whose missed range of the history is gone applies the desired state;
so does a node with no saved place at all (new, or its state deleted), instead of
replaying the whole window.

The newest snapshot's requests go to the pull service as replays (images the node has are
answered ``present`` at once), a few at a time; catch-up then replays the history after the
snapshot. Whether that makes good the loss is :func:`covers`; whether it can stand for the
whole window, for a node with no place, :func:`covers_window`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Container, Iterable
from functools import partial

import structlog

from contract import ErrorKind, InvalidMessage, NodeResult, PullRequest
from contract.desired import DesiredState
from worker.catch_up.ledger import Place
from worker.catch_up.observer import ReplayObserver
from worker.catch_up.ports import RequestServer

ReadDesired = Callable[[Callable[[bytes | None, str | None], None]], None]
"""Reads the newest snapshot of the desired state: ``(body, None)``, ``(None, None)`` when
there is none, ``(None, why)`` when it cannot be read."""

log = structlog.get_logger("worker.catch_up")


def covers(snapshot: DesiredState, first_delivered: int, saved_requested_at: float | None) -> bool:
    """Whether ``snapshot`` holds every request the history lost before ``first_delivered``
    (the first entry a reading from the saved place delivered): it reaches up to that entry,
    and it was complete since the saved place's request time (unknown, from an older state
    file: only a snapshot built from an unbroken history is)."""
    if snapshot.through_offset < first_delivered - 1:
        return False
    if snapshot.complete_since == 0:
        return True
    return saved_requested_at is not None and snapshot.complete_since <= saved_requested_at


def covers_window(snapshot: DesiredState, max_age: float, now: float) -> bool:
    """Whether ``snapshot`` holds every request of the last ``max_age`` seconds up to its
    ``through_offset``: built from an unbroken history (or complete since early enough),
    and its own window reaching back as far."""
    since = now - max_age
    complete = snapshot.complete_since == 0 or snapshot.complete_since <= since
    return complete and snapshot.written_at - snapshot.window <= since


class Reconciling:
    """One loss made good: reads the newest snapshot, hands its requests to the pull
    service (at most ``limit`` at once), then says how it went: ``on_done(place,
    recovered)``, ``place`` what the snapshot covers (``None``: none applied in full).
    Connection thread, but for the pull service's answers, which come back through
    ``call_soon``; after :meth:`stop` (the connection went) nothing more is said."""

    def __init__(
        self,
        read_desired: ReadDesired | None,
        server: RequestServer,
        call_soon: Callable[[Callable[[], None]], None],
        limit: int,
        max_age: float,
        seen_live: Container[str],
        on_answer: Callable[[NodeResult | None], None],
        on_done: Callable[[Place | None, bool], None],
        observer: ReplayObserver | None = None,
    ) -> None:
        """Requests older than ``max_age`` or in ``seen_live`` are not applied. ``on_answer``
        hears of a change in what is pending: a failed pull (its result), or ``None``.
        ``observer`` counts the snapshot's requests as the history's: each handed to the
        pull service a replay, each left out a skip (``too_old``, ``served_live``)."""
        self._read_desired = read_desired
        self._server = server
        self._call_soon = call_soon
        self._limit = max(1, limit)
        self._max_age = max_age
        self._seen_live = seen_live
        self._on_answer = on_answer
        self._on_done = on_done
        self._observer = observer or ReplayObserver()
        self._waiting: deque[PullRequest] = deque()
        self._working = 0
        self._cancelled = False
        self._stopped = False
        self._place: Place | None = None
        self._covered = False
        self._fresh = False

    @property
    def pending(self) -> int:
        return len(self._waiting) + self._working

    def start(self, saved: Place, first: int, lost: int) -> None:
        """The history lost ``lost`` entries after ``saved``; the first left is ``first``."""
        log.warning(
            f"the history lost {lost} entries this node had not replayed (offsets "
            f"{saved.offset + 1}..{first - 1}): reconciling with the desired state",
            lost=lost,
            saved_offset=saved.offset,
            first_offset=first,
        )
        if self._read_desired is None:
            self._finish(False, "this worker reads no desired state")
        else:
            self._read_desired(partial(self._read, saved, first))

    def start_fresh(self, end: int) -> None:
        """A node with no saved place, the history ending at ``end``: the snapshot stands
        for the history up to its ``through_offset``, if it covers the whole window
        (:func:`covers_window`) and reaches no further than ``end`` (further, it was made
        from a stream deleted since); if not, or if there is none, ``on_done(None, False)``
        and nothing is applied."""
        self._fresh = True
        if self._read_desired is None:
            self._finish(False, "this worker reads no desired state")
        else:
            self._read_desired(partial(self._read_fresh, end))

    def _read_fresh(self, end: int, body: bytes | None, why: str | None) -> None:
        if self._stopped:
            return
        snapshot, why = _decoded(body, why)
        if snapshot is None:
            self._finish(False, why)
            return
        if not covers_window(snapshot, self._max_age, time.time()):
            self._finish(False, "the newest desired state does not cover this node's window")
            return
        if snapshot.through_offset > end:
            self._finish(False, "the newest desired state reaches beyond the history's end")
            return
        self._apply(snapshot)
        self._covered = True
        self._next()
        self._on_answer(None)

    def stop(self) -> None:
        self._stopped = True
        self._waiting.clear()
        self._working = 0

    def _read(self, saved: Place, first: int, body: bytes | None, why: str | None) -> None:
        if self._stopped:
            return
        snapshot, why = _decoded(body, why)
        if snapshot is None:
            self._finish(False, why)
            return
        self._apply(snapshot)
        self._covered = covers(snapshot, first, saved.requested_at)
        self._next()
        self._on_answer(None)

    def _apply(self, snapshot: DesiredState) -> None:
        log.info(
            "applying the desired state",
            written_at=snapshot.written_at,
            written_by=snapshot.written_by,
            through_offset=snapshot.through_offset,
            images=len(snapshot.requests),
        )
        newest = max((request.requested_at for request in snapshot.requests), default=None)
        self._place = Place(snapshot.through_offset, None, newest)
        applied = to_apply(snapshot.requests, self._max_age, self._seen_live)
        now = time.time()
        for request in snapshot.requests:
            if now - request.requested_at > self._max_age:
                self._observer.replay_skipped("too_old")
            elif request.request_id in self._seen_live:
                self._observer.replay_skipped("served_live")
        self._waiting.extend(applied)

    def _next(self) -> None:
        while self._waiting and self._working < self._limit:
            request = self._waiting.popleft()
            self._working += 1
            log.info("reconciling", request_id=request.request_id, image=str(request.image))
            self._observer.replay_started(request)
            self._server.submit(
                request, lambda result: self._call_soon(partial(self._answered, result)), live=False
            )
        if not self._working and not self._stopped:
            self._finish(self._covered and not self._cancelled, None)

    def _answered(self, result: NodeResult) -> None:
        if self._stopped:
            return
        self._working -= 1
        error = result.error
        if error is not None and error.kind is ErrorKind.CANCELLED:
            self._cancelled = True
        elif error is not None and error.kind is not ErrorKind.FORBIDDEN:
            log.warning("a reconciling pull failed", image=result.image, error=error.message)
            self._on_answer(result)
        else:
            self._on_answer(None)
        self._next()

    def _finish(self, recovered: bool, why: str | None) -> None:
        self._stopped = True
        if self._fresh:
            if recovered:
                log.info("started from the desired state; replaying the history after it")
            else:
                log.info("replaying the history from its first entry", why=why)
        elif recovered:
            log.info("recovered the lost history entries from the desired state")
        else:
            log.warning(
                "the desired state does not make good the lost history entries: ask for the "
                "images they named again",
                why=why or "it does not cover the lost range (or a pull was cancelled)",
            )
        self._on_done(None if self._cancelled else self._place, recovered)


def _decoded(body: bytes | None, why: str | None) -> tuple[DesiredState | None, str]:
    """The snapshot read, or why there is none."""
    if body is None:
        return None, why or "no desired state written yet"
    try:
        return DesiredState.decode(body), ""
    except InvalidMessage as error:
        return None, f"the newest desired state is unreadable: {error}"


def to_apply(
    requests: Iterable[PullRequest], max_age: float, seen_live: Container[str]
) -> list[PullRequest]:
    """The snapshot's requests this node applies: inside its own window, not served live."""
    now = time.time()
    return [
        request
        for request in requests
        if now - request.requested_at <= max_age and request.request_id not in seen_live
    ]
