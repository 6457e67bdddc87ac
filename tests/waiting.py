"""Waiting in tests for a condition, never for a clock."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(
    condition: Callable[[], object],
    what: str = "the condition never came true",
    timeout: float = 10.0,
) -> None:
    """Returns once ``condition()`` is true, asking every few milliseconds; fails saying
    ``what`` if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.005)
