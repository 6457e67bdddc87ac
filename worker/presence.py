"""The worker's presence announcements, from which publishers learn the roster of nodes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from contract import NodePresence, NodeState, PullFailed, puller_version
from worker.catch_up.status import CatchUpStatus
from worker.stores.contract import ImageStore


class PresenceAnnouncer:
    """Builds this node's presence messages and says when the next one is due.

    The engine's version is asked on a thread of its own, so that a hung engine never holds
    up the connection's thread; announcements carry the last answer, or ``None`` while the
    engine cannot be reached.
    """

    def __init__(
        self,
        node: str,
        store: ImageStore,
        interval: float,
        catch_up: Callable[[], CatchUpStatus],
    ) -> None:
        self.node = node
        self.interval = interval
        self.started_at = time.time()
        self._catch_up = catch_up
        self._store = store
        self._version = puller_version()
        self._engine_version: str | None = None
        self._next_due = 0.0
        self._stopping = threading.Event()
        self._probe = threading.Thread(target=self._probe_engine, name="engine-probe", daemon=True)

    def start(self) -> None:
        self._ask_engine()
        self._probe.start()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def engine_version(self) -> str | None:
        return self._engine_version

    def due(self) -> bool:
        return time.monotonic() >= self._next_due

    def message(self, state: NodeState = NodeState.UP) -> bytes:
        """The next announcement; counts as sent."""
        self._next_due = time.monotonic() + self.interval
        status = self._catch_up()
        return NodePresence(
            node=self.node,
            version=self._version,
            engine=self._engine_version,
            started_at=self.started_at,
            last_seen=time.time(),
            state=state,
            caught_up=status.caught_up,
            replay_pending=status.replay_pending,
            replay_failed=status.replay_failed,
            history_gap=status.history_gap,
            history_lost=status.history_lost,
        ).encode()

    def _probe_engine(self) -> None:
        while not self._stopping.wait(self.interval):
            self._ask_engine()

    def _ask_engine(self) -> None:
        try:
            self._engine_version = self._store.version()
        except PullFailed:
            self._engine_version = None
