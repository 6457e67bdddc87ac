"""The pulls under way on one node: one per image, with the requests waiting on it. A
request for an image already being pulled joins that pull."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from contract import ImageReference, Lane, PullFailed, Pulling
from worker.pulls.answers import Waiter


@dataclass(eq=False)
class Pull:
    """One image being pulled (or queued, or waiting to retry) and the requests waiting."""

    image: ImageReference
    waiters: list[Waiter]
    warm: bool = False
    """In the warm lane: every waiting request is a warm-up (see :mod:`worker.pulls.slots`)."""
    running: bool = False
    interrupting: bool = False
    """Being cut to make room for a session's pull."""
    attempt: int = 0
    last_wait: float | None = None
    """The wait before its latest retry (see :meth:`worker.pulls.retry.RetryPolicy.wait`)."""
    bytes_received: int = 0
    bytes_total: int = 0
    """The image's size as the engine last reported it (0: not known yet)."""
    last_progress: float = 0.0
    completed: bool = False
    retry: threading.Timer | None = None
    _waits: list[list[float]] = field(default_factory=list)
    """[queued at, got a slot at] for each time it waited for a slot."""

    @property
    def context(self) -> dict[str, object]:
        """Log fields of the pull: those of the request that started it, and how many wait."""
        first = dict(self.waiters[0].context) if self.waiters else {"image": str(self.image)}
        return {**first, "requests": len(self.waiters)}

    def queued(self) -> None:
        self._waits.append([time.monotonic(), 0.0])

    def dequeued(self) -> None:
        if self._waits:
            self._waits[-1][1] = time.monotonic()

    def queued_seconds(self, since: float) -> float:
        """Seconds this pull waited for a slot after ``since`` (when a request joined)."""
        total = 0.0
        now = time.monotonic()
        for queued_at, started_at in self._waits:
            end = started_at or now
            total += max(0.0, end - max(queued_at, since))
        return total


class Taken(Enum):
    """How a request was taken on by :meth:`InFlight.take`."""

    STARTED = "a new pull, to queue"
    JOINED = "joined the pull under way"
    HURRIED = "joined a warm pull under way, which now serves a session"


class InFlight:
    """The pulls under way, by image. Thread-safe: one lock guards the book and each pull's
    waiters, lane and completion."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pulls: dict[ImageReference, Pull] = {}

    def take(
        self, waiter: Waiter, refusal: Callable[[], PullFailed | None]
    ) -> tuple[Pull, Taken] | PullFailed:
        """Joins ``waiter`` to its image's pull under way, or else starts one for it unless
        ``refusal()`` (called under the lock, only then) says why not."""
        image = waiter.request.image
        warm = waiter.request.lane is Lane.WARM
        with self._lock:
            pull = self._pulls.get(image)
            if pull is not None:
                pull.waiters.append(waiter)
                if pull.warm and not warm:
                    pull.warm = False
                    return pull, Taken.HURRIED
                return pull, Taken.JOINED
            refused = refusal()
            if refused is not None:
                return refused
            pull = self._pulls[image] = Pull(image, [waiter], warm=warm)
            return pull, Taken.STARTED

    def complete(self, pull: Pull) -> list[Waiter] | None:
        """Marks ``pull`` done and drops it from the book: the requests to answer, or
        ``None`` when it was completed already."""
        with self._lock:
            if pull.completed:
                return None
            pull.completed = True
            if self._pulls.get(pull.image) is pull:
                del self._pulls[pull.image]
            return list(pull.waiters)

    def progressed(self, pull: Pull, done: int, total: int) -> None:
        """Keeps ``pull``'s bytes so far and the image's size, for :meth:`pulling`."""
        with self._lock:
            pull.bytes_received = done
            pull.bytes_total = max(total, 0)

    def pulling(self, image: ImageReference) -> Pulling | None:
        """How far the running pull of ``image`` is; ``None`` when none runs (queued or
        waiting to retry is not running). Memory only: never waits on the pull."""
        with self._lock:
            pull = self._pulls.get(image)
            if pull is None or not pull.running or pull.completed:
                return None
            return Pulling(pull.bytes_received, pull.bytes_total)

    def waiters(self, pull: Pull) -> list[Waiter]:
        with self._lock:
            return list(pull.waiters)

    def asked_by(self, pull: Pull) -> str | None:
        """The first publisher named among the requests waiting on ``pull``."""
        with self._lock:
            return next((w.asked_by for w in pull.waiters if w.asked_by), None)

    def retrying(self) -> list[Pull]:
        """The pulls waiting to retry."""
        with self._lock:
            return [pull for pull in self._pulls.values() if pull.retry is not None]

    def warm_to_interrupt(self) -> list[Pull]:
        """The warm pulls running now and not being cut already; each is marked as being cut."""
        with self._lock:
            victims = [
                pull
                for pull in self._pulls.values()
                if pull.warm and pull.running and not pull.interrupting
            ]
            for pull in victims:
                pull.interrupting = True
            return victims
