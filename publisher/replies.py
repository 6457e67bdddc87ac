"""The answers nodes sent to this publisher's requests, kept for the callers that wait.

Replies arrive on the broker's I/O thread (:meth:`ReplyBook.receive`); callers wait on
their own threads (:meth:`ReplyBook.wait`), each for its own request, without holding
anything the I/O thread or other callers need. A waiter is woken only when it has
something to do: its condition is met, or it asked for every event and one came.

What is kept is bounded in bytes (``budget``), each answer counted at an estimate of what
it holds in memory (its encoded size and a fixed cost per object). Past the budget the
oldest requests no caller waits on are forgotten first (a later question about one says so);
a request a caller waits on is never forgotten, but its further answers are kept as node
and status only, and progress reports that do not fit are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from contract import (
    ErrorKind,
    InvalidMessage,
    NodeError,
    NodeProgress,
    NodeResult,
    PruneResult,
    PullerError,
    Status,
    decode_reply,
)

log = logging.getLogger("puller.publisher.replies")

REQUESTS_REMEMBERED = 1000
DEFAULT_ANSWER_MEMORY = 64 * 2**20
"""Bytes of answers kept (estimated): about 85,000 whole answers, the answers to 8 pulls at
10,000 nodes or to the last 1,000 requests at 85 nodes; well within the gateway's 256 MiB."""
ANSWER_OVERHEAD = 320
"""Bytes a decoded answer holds beyond its encoded size (its objects; measured: a 446-byte
result held 750 bytes)."""
STATUS_ONLY_OVERHEAD = 72
"""Bytes an answer kept as node and status holds beyond its node name."""
FORGOTTEN_REMEMBERED = 10_000
"""Ids of forgotten requests remembered, to answer "forgotten" rather than "unknown"."""
STATUS_ONLY_MESSAGE = (
    "the error message was not kept: the publisher's answer memory (PULLER_ANSWER_MEMORY_MB) "
    "was full"
)

Answer = NodeResult | PruneResult
"""A node's final answer to a request (a prune has its own)."""
Event = NodeProgress | Answer
Condition = Callable[[Mapping[str, object]], bool]
"""Judged on the answers so far, by node (only their number and names are to be read)."""
_StatusOnly = tuple[Status, ErrorKind | None]


class AnswersForgotten(PullerError):
    """The answers to a request were forgotten to keep the answer memory within its budget."""

    def __init__(self, request_id: str, budget: int) -> None:
        super().__init__(
            f"the answers to request {request_id!r} were forgotten: this publisher keeps the "
            f"answers to its last {REQUESTS_REMEMBERED:,} requests within {budget / 2**20:g} MB "
            "(PULLER_ANSWER_MEMORY_MB), and forgets the oldest requests no caller waits on first"
        )
        self.request_id = request_id


@dataclass(frozen=True)
class AnswerMemory:
    """What the answer memory holds now, and what it gave up since it was made."""

    budget: int
    kept_bytes: int
    requests: int
    forgotten_requests: int
    """Requests forgotten since start (oldest first, to stay within the budget or count)."""
    status_only_answers: int
    """Answers to waited-on requests kept as node and status only since start."""
    dropped_progress: int
    """Progress reports dropped since start, for want of room."""


@dataclass
class _Waiter:
    done: Condition
    wants_events: bool
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Request:
    image: str | None = None
    results: dict[str, Answer] = field(default_factory=dict)
    """The first result from each node (a node asked again answers again; the first counts)."""
    status_only: dict[str, _StatusOnly] = field(default_factory=dict)
    """Nodes whose first result came when the budget was spent: its status only."""
    events: deque[tuple[Event, int]] = field(default_factory=deque)
    """Progress and results not yet handed to a waiting caller (only while one watches), with
    the bytes each is counted at."""
    watchers: int = 0
    holds: int = 0
    waiters: list[_Waiter] = field(default_factory=list)
    bytes: int = 0

    @property
    def pinned(self) -> bool:
        """Whether a caller waits on it (or will): it is not forgotten then."""
        return bool(self.watchers or self.holds or self.waiters)

    def answered(self) -> Mapping[str, object]:
        """Every node that answered, whole or status only (for a condition; not a copy)."""
        return _Answered(self.results, self.status_only) if self.status_only else self.results

    def answers(self, request_id: str) -> dict[str, Answer]:
        """The answers, status-only ones made whole again (without what was not kept)."""
        answers = dict(self.results)
        for node, (status, kind) in self.status_only.items():
            error = None if kind is None else NodeError(kind, STATUS_ONLY_MESSAGE)
            answers[node] = NodeResult(request_id, node, self.image or "", status, 0.0, error=error)
        return answers


class _Answered(Mapping[str, object]):
    """A request's whole and short answers read as one table, without copying either."""

    def __init__(self, whole: Mapping[str, object], short: Mapping[str, object]) -> None:
        self._whole, self._short = whole, short

    def __getitem__(self, node: str) -> object:
        return self._whole[node] if node in self._whole else self._short[node]

    def __contains__(self, node: object) -> bool:
        return node in self._whole or node in self._short

    def __len__(self) -> int:
        return len(self._whole) + len(self._short)

    def __iter__(self) -> Iterator[str]:
        yield from self._whole
        yield from self._short


class ReplyBook:
    """Answers to at most :data:`REQUESTS_REMEMBERED` requests of one publisher, within
    ``budget`` bytes (see the module's documentation)."""

    def __init__(
        self, remembered: int = REQUESTS_REMEMBERED, budget: int = DEFAULT_ANSWER_MEMORY
    ) -> None:
        if budget < 1:
            raise ValueError("the answer memory's budget must be at least 1 byte")
        self._remembered = remembered
        self._budget = budget
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._kept = 0
        self._forgotten_count = 0
        self._status_only = 0
        self._dropped_progress = 0

    def track(
        self, request_id: str, image: str | None = None, watch: bool = False, hold: bool = False
    ) -> None:
        """Keeps the answers to ``request_id``; with ``watch``, also every progress report
        and result in order, for :meth:`wait`'s ``on_event`` (until :meth:`unwatch`); with
        ``hold``, never forgets them until :meth:`release` (a caller will wait)."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                request = self._requests[request_id] = _Request(image)
                self._forgotten.pop(request_id, None)
            self._requests.move_to_end(request_id)
            request.watchers += watch
            request.holds += hold
            while len(self._requests) > self._remembered and self._forget_oldest():
                pass

    def unwatch(self, request_id: str) -> None:
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None and request.watchers:
                request.watchers -= 1
                if not request.watchers:
                    self._take_events(request)
                self._room_for(0)  # what it held past the budget goes, oldest first

    def release(self, request_id: str) -> None:
        """Ends a :meth:`track` ``hold``."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None and request.holds:
                request.holds -= 1
                self._room_for(0)

    def receive(self, correlation_id: str | None, body: bytes) -> None:
        """I/O thread: one reply."""
        try:
            message = decode_reply(body)
        except InvalidMessage as error:
            log.warning(
                "ignored a reply that breaks the contract: %s",
                error,
                extra={"correlation_id": correlation_id},
            )
            return
        cost = len(body) + ANSWER_OVERHEAD
        with self._lock:
            request_id = message.request_id
            request = self._requests.get(request_id)
            if request is None and correlation_id is not None:
                request_id, request = correlation_id, self._requests.get(correlation_id)
            if request is None:
                log.debug(
                    "ignored a reply to a request this publisher does not know",
                    extra={"request_id": message.request_id, "node": message.node},
                )
                return
            if isinstance(message, NodeProgress):
                if not request.watchers:
                    return
                if not self._room_for(cost):
                    self._dropped_progress += 1
                    return
                self._add(request, cost)
                request.events.append((message, cost))
            else:
                if message.node in request.results or message.node in request.status_only:
                    return
                if not self._keep(request_id, request, message, cost):
                    return
            _wake(request, isinstance(message, NodeProgress))

    def lookup(self, request_id: str) -> tuple[str | None, dict[str, Answer]] | None:
        """The image and the answers so far of a request this publisher made and still
        remembers; ``None`` for any other (:meth:`forgot` says whether it was forgotten)."""
        with self._lock:
            request = self._requests.get(request_id)
            return None if request is None else (request.image, request.answers(request_id))

    def forgot(self, request_id: str) -> bool:
        """Whether ``request_id``'s answers were forgotten to stay within the budget or count."""
        with self._lock:
            return request_id in self._forgotten

    def status_only(self, request_id: str) -> int:
        """How many of the request's answers are kept as node and status only."""
        with self._lock:
            request = self._requests.get(request_id)
            return 0 if request is None else len(request.status_only)

    def memory(self) -> AnswerMemory:
        with self._lock:
            return AnswerMemory(
                budget=self._budget,
                kept_bytes=self._kept,
                requests=len(self._requests),
                forgotten_requests=self._forgotten_count,
                status_only_answers=self._status_only,
                dropped_progress=self._dropped_progress,
            )

    def wait(
        self,
        request_id: str,
        done: Condition,
        deadline: float,
        on_event: Callable[[Event], None] | None = None,
        wake_every: float | None = None,
    ) -> dict[str, Answer]:
        """Waits until ``done(answers)`` or the deadline (``time.monotonic()``), handing each
        progress report and result to ``on_event`` on this thread as it arrives. With
        ``wake_every``, returns at least that often (so the caller can look around).
        Raises :class:`AnswersForgotten` if the request's answers were forgotten."""
        until = deadline if wake_every is None else min(deadline, time.monotonic() + wake_every)
        waiter = _Waiter(done, wants_events=on_event is not None)
        with self._lock:
            if request_id in self._forgotten:
                raise AnswersForgotten(request_id, self._budget)
            request = self._requests.setdefault(request_id, _Request())
            request.waiters.append(waiter)
        try:
            while True:
                with self._lock:  # the condition reads the answers as they are: no copy
                    waiter.wake.clear()
                    events: list[Event] = []
                    if on_event is not None:
                        events = self._take_events(request)
                    finished = done(request.answered())
                if on_event is not None:
                    for event in events:
                        on_event(event)
                if finished or until - time.monotonic() <= 0:
                    with self._lock:
                        return request.answers(request_id)
                waiter.wake.wait(until - time.monotonic())
        finally:
            with self._lock:
                request.waiters.remove(waiter)
                self._room_for(0)

    # -- the budget (with the lock held) ---------------------------------------------------

    def _keep(self, request_id: str, request: _Request, answer: Answer, cost: int) -> bool:
        """Keeps a node's first answer whole if there is room, else as its status only (a
        prune's answer, small and rare, stays whole); whether it was kept. Older requests
        nobody waits on are forgotten to make room; this one last, when even its status
        does not fit and nobody waits on it."""
        whole = self._room_for(cost, request_id) or isinstance(answer, PruneResult)
        held_by_event = 0 if whole else cost  # a whole answer is shared with the events
        if not whole and isinstance(answer, NodeResult):
            cost = STATUS_ONLY_OVERHEAD + len(answer.node)
            if not self._room_for(cost, request_id) and not request.pinned:
                self._forget(request_id)
                return False
            kind = None if answer.error is None else answer.error.kind
            request.status_only[answer.node] = (answer.status, kind)
            self._status_only += 1
            if self._status_only == 1:
                log.warning(
                    "the answer memory is full: answers to requests callers wait on are kept "
                    "as node and status only (PULLER_ANSWER_MEMORY_MB)",
                    extra={"budget": self._budget, "request_id": request_id},
                )
        else:
            request.results[answer.node] = answer
        self._add(request, cost)
        if request.watchers:
            request.events.append((answer, held_by_event))
            self._add(request, held_by_event)
        return True

    def _room_for(self, cost: int, answering: str | None = None) -> bool:
        """Forgets the oldest requests no caller waits on (never ``answering``) until ``cost``
        more bytes fit, and for an answer drops the progress reports not yet handed over;
        whether they fit."""
        while self._kept + cost > self._budget:
            if not self._forget_oldest(answering) and (
                answering is None or not self._drop_progress()
            ):
                return False
        return True

    def _drop_progress(self) -> bool:
        """Drops every progress report not yet handed to a watcher; whether there was one."""
        dropped = 0
        for request in self._requests.values():
            progress = [(e, cost) for e, cost in request.events if isinstance(e, NodeProgress)]
            if progress:
                dropped += len(progress)
                self._add(request, -sum(cost for _, cost in progress))
                kept = [(e, cost) for e, cost in request.events if not isinstance(e, NodeProgress)]
                request.events = deque(kept)
        self._dropped_progress += dropped
        return dropped > 0

    def _forget_oldest(self, spare: str | None = None) -> bool:
        for request_id, request in self._requests.items():
            if not request.pinned and request_id != spare:
                self._forget(request_id)
                return True
        return False

    def _forget(self, request_id: str) -> None:
        request = self._requests.pop(request_id)
        self._kept -= request.bytes
        self._forgotten_count += 1
        self._forgotten[request_id] = None
        while len(self._forgotten) > FORGOTTEN_REMEMBERED:
            self._forgotten.popitem(last=False)

    def _add(self, request: _Request, cost: int) -> None:
        request.bytes += cost
        self._kept += cost

    def _take_events(self, request: _Request) -> list[Event]:
        taken = [event for event, _ in request.events]
        self._add(request, -sum(cost for _, cost in request.events))
        request.events.clear()
        return taken


def _wake(request: _Request, progress: bool) -> None:
    """Wakes the waiters with something to do: those that take every event and, for an
    answer, those whose condition now holds."""
    answered = None
    for waiter in request.waiters:
        if waiter.wants_events:
            waiter.wake.set()
        elif not progress:
            answered = request.answered() if answered is None else answered
            if waiter.done(answered):
                waiter.wake.set()
