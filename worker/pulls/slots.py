"""Which pull runs next: a bounded number at once, sessions first, fair between registries.

Two lanes. A **session** pull (someone is about to need the image) always goes before a
**warm** one (a bulk warm-up): no warm pull starts while a session pull waits or runs, and
a session pull does not wait for warm ones to finish, so at most ``slots`` session pulls
and ``slots`` warm pulls run at once (the warm ones only those already started when the
session's came).

Within a lane, pulls are taken in turn from each registry's queue (first come, first
served within a registry). One exception keeps a slow or silent registry from starving
the others: a registry with no pull running in that lane may always start one, even when
every slot is held by other registries. So a black-holed registry costs the others
nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

J = TypeVar("J")


class _Lane(Generic[J]):
    def __init__(self) -> None:
        self.waiting: OrderedDict[str, deque[J]] = OrderedDict()
        self.running: dict[str, int] = {}

    @property
    def running_total(self) -> int:
        return sum(self.running.values())

    @property
    def waiting_total(self) -> int:
        return sum(len(queue) for queue in self.waiting.values())

    def take(self, slots: int, busy: int) -> J | None:
        """The next job that may start with ``busy`` slots taken, counted as running."""
        for registry in list(self.waiting):
            running_here = self.running.get(registry, 0)
            if running_here and busy >= slots:
                continue
            queue = self.waiting[registry]
            job = queue.popleft()
            self.running[registry] = running_here + 1
            if not queue:
                del self.waiting[registry]
            else:
                self.waiting.move_to_end(registry)  # the others go first next time
            return job
        return None

    def remove(self, registry: str, job: J) -> bool:
        queue = self.waiting.get(registry)
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        if not queue:
            del self.waiting[registry]
        return True

    def release(self, registry: str) -> None:
        left = self.running.get(registry, 0) - 1
        if left > 0:
            self.running[registry] = left
        else:
            self.running.pop(registry, None)


class PullSlots(Generic[J]):
    def __init__(self, slots: int, start: Callable[[J], None]) -> None:
        """``start(job)`` is called, outside any lock, when ``job`` gets a slot; it must
        not block (it hands the job to a thread)."""
        self.slots = slots
        self._start = start
        self._lock = threading.Lock()
        self._session: _Lane[J] = _Lane()
        self._warm: _Lane[J] = _Lane()
        self._started_warm: dict[int, bool] = {}

    def add(self, registry: str, job: J, warm: bool = False) -> None:
        with self._lock:
            lane = self._warm if warm else self._session
            lane.waiting.setdefault(registry, deque()).append(job)
            ready = self._take_ready()
        for job_ready in ready:
            self._start(job_ready)

    def hurry(self, registry: str, job: J) -> None:
        """A waiting warm ``job`` is now wanted by a session: it moves to the session lane
        (nothing happens if it has started or is there already)."""
        with self._lock:
            if not self._warm.remove(registry, job):
                return
            self._session.waiting.setdefault(registry, deque()).append(job)
            ready = self._take_ready()
        for job_ready in ready:
            self._start(job_ready)

    def release(self, registry: str, job: J) -> None:
        """``job`` of ``registry`` has stopped running (done, or waiting to retry)."""
        with self._lock:
            warm = self._started_warm.pop(id(job), False)
            (self._warm if warm else self._session).release(registry)
            ready = self._take_ready()
        for job_ready in ready:
            self._start(job_ready)

    def requeue(self, registry: str, job: J, warm: bool) -> None:
        """``job`` stopped running and goes back to the front of its lane's queue (an
        interrupted pull: it goes on before the others that waited)."""
        with self._lock:
            was_warm = self._started_warm.pop(id(job), False)
            (self._warm if was_warm else self._session).release(registry)
            lane = self._warm if warm else self._session
            lane.waiting.setdefault(registry, deque()).appendleft(job)
            ready = self._take_ready()
        for job_ready in ready:
            self._start(job_ready)

    def remove_waiting(self) -> list[J]:
        """Takes every job that has not started (to cancel them)."""
        with self._lock:
            jobs = [
                job
                for lane in (self._session, self._warm)
                for queue in lane.waiting.values()
                for job in queue
            ]
            self._session.waiting.clear()
            self._warm.waiting.clear()
        return jobs

    @property
    def running(self) -> int:
        with self._lock:
            return self._session.running_total + self._warm.running_total

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._session.waiting_total + self._warm.waiting_total

    def _take_ready(self) -> list[J]:
        """Under the lock: the jobs that may start now, counted as running."""
        ready: list[J] = []
        while (job := self._session.take(self.slots, self._session.running_total)) is not None:
            self._started_warm[id(job)] = False
            ready.append(job)
        if self._session.waiting or self._session.running:
            return ready
        busy = self._warm.running_total
        while (job := self._warm.take(self.slots, busy)) is not None:
            self._started_warm[id(job)] = True
            ready.append(job)
            busy += 1
        return ready
