"""How often a pull is tried, and how long it waits between tries."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all. Between them a jittered wait (:meth:`wait`), so that the
    nodes that met the same failing registry do not all come back in the same instant."""

    attempts: int = 4
    first_delay: float = 1.0
    max_delay: float = 15.0
    uniform: Callable[[float, float], float] = field(
        default=random.uniform, compare=False, repr=False
    )
    """The random source: a number between its two arguments (a test passes its own)."""

    def delay(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1`` without jitter: ``first_delay`` seconds,
        doubling up to ``max_delay``."""
        return float(min(self.first_delay * 2 ** (attempt - 1), self.max_delay))

    def wait(self, previous: float | None) -> float:
        """The next wait, given the previous one of the same pull (``None`` for the first):
        decorrelated jitter, between ``first_delay`` and three times the previous wait, at
        most ``max_delay``. It grows about as the doubling does, never below the first."""
        low = min(self.first_delay, self.max_delay)
        high = max(low, 3 * (previous if previous is not None else low))
        return float(min(self.max_delay, self.uniform(low, high)))
