"""Which pull runs next: a bounded number at once, fair between registries.

At most ``slots`` pulls run at once, taken in turn from each registry's queue (first come,
first served within a registry). One exception keeps a slow or silent registry from
starving the others: a registry with no pull running may always start one, even when every
slot is held by other registries. So a black-holed registry costs the others nothing, and
at most ``slots`` plus one per extra registry pulls run in the worst case.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

J = TypeVar("J")


class PullSlots(Generic[J]):
    def __init__(self, slots: int, start: Callable[[J], None]) -> None:
        """``start(job)`` is called, outside any lock, when ``job`` gets a slot; it must
        not block (it hands the job to a thread)."""
        self.slots = slots
        self._start = start
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, deque[J]] = OrderedDict()
        self._running: dict[str, int] = {}

    def add(self, registry: str, job: J) -> None:
        with self._lock:
            self._waiting.setdefault(registry, deque()).append(job)
            ready = self._take_ready()
        for job_ready in ready:
            self._start(job_ready)

    def release(self, registry: str) -> None:
        """A job of ``registry`` has stopped running (done, or waiting to retry)."""
        with self._lock:
            left = self._running.get(registry, 0) - 1
            if left > 0:
                self._running[registry] = left
            else:
                self._running.pop(registry, None)
            ready = self._take_ready()
        for job in ready:
            self._start(job)

    def remove_waiting(self) -> list[J]:
        """Takes every job that has not started (to cancel them)."""
        with self._lock:
            jobs = [job for queue in self._waiting.values() for job in queue]
            self._waiting.clear()
        return jobs

    @property
    def running(self) -> int:
        with self._lock:
            return sum(self._running.values())

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(queue) for queue in self._waiting.values())

    def _take_ready(self) -> list[J]:
        """Under the lock: the jobs that may start now, counted as running."""
        ready: list[J] = []
        progress = True
        while progress and self._waiting:
            progress = False
            for registry in list(self._waiting):
                running_here = self._running.get(registry, 0)
                total = sum(self._running.values())
                if running_here and total >= self.slots:
                    continue
                queue = self._waiting[registry]
                ready.append(queue.popleft())
                self._running[registry] = running_here + 1
                if not queue:
                    del self._waiting[registry]
                else:
                    self._waiting.move_to_end(registry)  # the others go first next time
                progress = True
                break
        return ready
