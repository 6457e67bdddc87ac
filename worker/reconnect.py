"""How long a worker waits before each attempt to connect to RabbitMQ.

Every wait is random and bounded, so that workers that lost the same broker do not all
come back in the same instant: after a lost connection, up to ``spread`` seconds; after a
failed attempt, between half and all of a delay that doubles from ``first`` to ``cap``
(reset once connected).
"""

from __future__ import annotations

import random
from collections.abc import Callable

FIRST_DELAY = 0.5
MAX_DELAY = 15.0
"""The longest wait between failed attempts."""


class ReconnectWaits:
    """The waits of one worker's connection loop; ``uniform`` draws them (tests seed it)."""

    def __init__(
        self,
        spread: float,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        if spread < 0 or first <= 0 or cap < first:
            raise ValueError("waits need spread >= 0 and 0 < first <= cap")
        self.spread = spread
        self._first = first
        self._cap = cap
        self._delay = first
        self._uniform = uniform

    def after_loss(self) -> float:
        """The wait before the first attempt after a lost connection: up to ``spread``."""
        self._delay = self._first
        return self._uniform(0.0, self.spread) if self.spread else 0.0

    def after_failure(self) -> float:
        """The wait after a failed attempt; each one's bound doubles, up to ``cap``."""
        wait = self._uniform(self._delay / 2, self._delay)
        self._delay = min(self._delay * 2, self._cap)
        return wait

    def connected(self) -> None:
        self._delay = self._first
