"""Each request's one answer: the :class:`Waiter` that gives it, and :class:`InHand`, which
counts the requests taken and not yet answered and shows every answer to the observer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from contract import Lane, NodeProgress, NodeResult, PullFailed, Pulling, PullRequest, Status
from worker.pulls.observers import PullObserver
from worker.stores.contract import ImageInfo, PullProgress

log = structlog.get_logger("worker.service")

AnswerCallback = Callable[[NodeResult], None]
"""Receives a request's one result, on whatever thread produced it."""
ProgressCallback = Callable[[NodeProgress], None]


class InHand:
    """The requests one node has taken and not answered yet. Thread-safe."""

    def __init__(self, node: str, observer: PullObserver) -> None:
        self.node = node
        self.observer = observer
        self._lock = threading.Lock()
        self._unfinished = 0
        self._warm = 0

    def take(
        self,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None = None,
        asked_by: str | None = None,
        live: bool = True,
    ) -> Waiter:
        """Counts ``request`` as in hand until its waiter has handed over its answer."""
        with self._lock:
            self._unfinished += 1
            if request.lane is Lane.WARM:
                self._warm += 1
        return Waiter(self, request, answer, progress, asked_by, live)

    @property
    def unfinished(self) -> int:
        with self._lock:
            return self._unfinished

    @property
    def warm(self) -> int:
        with self._lock:
            return self._warm

    def handed_over(self, request: PullRequest) -> None:
        with self._lock:
            self._unfinished -= 1
            if request.lane is Lane.WARM:
                self._warm -= 1


class Waiter:
    """One request waiting for its answer: answers exactly once."""

    def __init__(
        self,
        in_hand: InHand,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None,
        asked_by: str | None = None,
        live: bool = True,
    ) -> None:
        self.request = request
        self.live = live
        """From the node's queue, not replayed from the history."""
        self.since = time.monotonic()
        self.context: dict[str, object] = {
            "request_id": request.request_id,
            "image": str(request.image),
        }
        if request.session_id is not None:
            self.context["session_id"] = request.session_id
        if asked_by is not None:
            self.context["asked_by"] = asked_by
        self.asked_by = asked_by
        self.had: ImageInfo | None = None
        """For a refresh: the image the node had under that name before pulling."""
        self._in_hand = in_hand
        self._answer = answer
        self._progress = progress if request.progress else None
        """Only for a requester that asked for progress reports."""
        self._answered = False
        self._lock = threading.Lock()

    def send_progress(self, progress: PullProgress) -> None:
        if self._progress is None:
            return
        message = NodeProgress(
            request_id=self.request.request_id,
            node=self._in_hand.node,
            image=str(self.request.image),
            done=progress.done,
            total=progress.total,
        )
        try:
            self._progress(message)
        except Exception:
            log.exception("sending progress failed", **self.context)

    def finish_absent(self, pulling: Pulling | None = None) -> None:
        """The answer to a check: the node does not have the image (``pulling``: yet, and
        its pull runs, this far)."""
        self._hand_over(
            NodeResult(
                request_id=self.request.request_id,
                node=self._in_hand.node,
                image=str(self.request.image),
                status=Status.ABSENT,
                seconds=round(time.monotonic() - self.since, 6),
                pulling=pulling,
            ),
            from_memory=False,
        )

    def finish(
        self,
        outcome: ImageInfo | PullFailed,
        status: Status = Status.FAILED,
        queued: float = 0.0,
        from_memory: bool = False,
    ) -> None:
        found = outcome if isinstance(outcome, ImageInfo) else None
        result = NodeResult(
            request_id=self.request.request_id,
            node=self._in_hand.node,
            image=str(self.request.image),
            status=status if found is not None else Status.FAILED,
            seconds=round(time.monotonic() - self.since, 6),
            queued_seconds=round(queued, 6),
            image_id=found.image_id if found is not None else None,
            digest=found.digest if found is not None else None,
            error=None if isinstance(outcome, ImageInfo) else outcome.as_node_error(),
        )
        self._hand_over(result, from_memory)

    def _hand_over(self, result: NodeResult, from_memory: bool) -> None:
        with self._lock:
            if self._answered:
                return
            self._answered = True
        try:
            self._in_hand.observer.answered(result, from_memory)
        except Exception:
            log.exception("an observer failed", **self.context)
        log.info(
            "answered",
            **self.context,
            status=result.status.value,
            seconds=result.seconds,
            queued_seconds=result.queued_seconds,
            error_kind=result.error.kind.value if result.error else None,
        )
        try:
            self._answer(result)
        except Exception:
            log.exception("handing over the result failed", **self.context)
        finally:
            # Counted as answered only once handed over: whoever drains (the worker
            # stopping) then sees either this request unfinished or its answer in the
            # broker's hands, never neither.
            self._in_hand.handed_over(self.request)
