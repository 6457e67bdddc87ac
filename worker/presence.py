"""The worker's presence announcements, from which publishers learn the roster of nodes.

How often a node announces itself depends on how many nodes there are (:func:`interval_for`):
every ``base`` seconds on a small cluster, and on a large one so rarely that the whole
cluster sends about ``target_rate`` announcements a second, whatever its size (up to
:data:`~contract.MAX_PRESENCE_INTERVAL`). Each announcement declares the longest wait until
the next; readers drop a node after :data:`~contract.PRESENCE_MISSES` of them. A node
announces at once when it connects, when its state changes (caught up, history lost, engine
gone or back) and when it leaves.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from contract import MAX_PRESENCE_INTERVAL, NodePresence, NodeState, PullFailed, puller_version
from worker.catch_up.status import CatchUpStatus
from worker.stores.contract import ImageStore

JITTER = 0.1
"""A stretched interval's waits are drawn from its last tenth, so that nodes that started
together drift apart; the first after a connection from all of it. The base interval is
kept as it is (a small cluster announces as before)."""


def interval_for(base: float, nodes: int | None, target_rate: float) -> float:
    """The interval a node declares: ``base``, stretched to ``nodes / target_rate`` (at most
    :data:`~contract.MAX_PRESENCE_INTERVAL`, or ``base`` if longer) when that is longer.
    ``nodes`` unknown (``None``) or ``target_rate`` 0 (stretching off): ``base``."""
    if nodes is None or target_rate <= 0:
        return base
    return max(base, min(nodes / target_rate, MAX_PRESENCE_INTERVAL))


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
        target_rate: float = 0.0,
        draw: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.node = node
        self.base_interval = interval
        self.target_rate = target_rate
        self.interval = interval
        """The interval the last announcement declared."""
        self.started_at = time.time()
        self._catch_up = catch_up
        self._store = store
        self._draw = draw
        self._version = puller_version()
        self._engine_version: str | None = None
        self._next_due = 0.0
        self._last_sent = -float("inf")
        self._said: tuple[object, ...] | None = None
        """The state the last announcement showed (see :meth:`_state`)."""
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
        """The wait drawn at the last announcement is over, or the node's state changed
        since (announced at most every base interval)."""
        now = time.monotonic()
        if now >= self._next_due:
            return True
        return now >= self._last_sent + self.base_interval and self._state() != self._said

    def message(
        self, state: NodeState = NodeState.UP, nodes: int | None = None, first: bool = False
    ) -> bytes:
        """The next announcement; counts as sent. ``nodes``: how many nodes there are, if
        known; ``first``: the connection's first, after which the wait is drawn from the whole
        interval, spreading nodes that connect together."""
        self.interval = interval_for(self.base_interval, nodes, self.target_rate)
        now = time.monotonic()
        low = 0.0 if first else 1 - JITTER if self.interval > self.base_interval else 1.0
        self._next_due = now + self._draw(low * self.interval, self.interval)
        self._last_sent = now
        status = self._catch_up()
        self._said = self._state(status)
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
            interval=self.interval,
        ).encode()

    def _state(self, status: CatchUpStatus | None = None) -> tuple[object, ...]:
        """What readers act on (counts that move during a replay are left out)."""
        status = status or self._catch_up()
        return (status.caught_up, status.history_gap, self._engine_version is None)

    def _probe_engine(self) -> None:
        while not self._stopping.wait(self.base_interval):
            self._ask_engine()

    def _ask_engine(self) -> None:
        try:
            self._engine_version = self._store.version()
        except PullFailed:
            self._engine_version = None
