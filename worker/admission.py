"""Whether a node takes a request at all: who asked, for what, and how often.

Checked before anything touches the engine, on the connection's thread; a refusal is a
``failed`` answer like any other (``forbidden``, ``rate_limited``), so nothing is lost.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from contract import ErrorKind, ImageReference, PullFailed
from contract.policy import ImagePolicy

ALLOWED_PUBLISHERS = "PULLER_ALLOWED_PUBLISHERS"
MAX_REQUESTS_PER_MINUTE = "PULLER_MAX_REQUESTS_PER_MINUTE"


@dataclass(frozen=True)
class Admission:
    """``publishers``: the AMQP users whose requests this node takes (the broker checks a
    message's ``user_id`` against the connection that published it); ``None``: anyone who
    may publish on the broker."""

    policy: ImagePolicy = field(default_factory=ImagePolicy)
    publishers: frozenset[str] | None = None

    def publisher_refusal(self, asked_by: str | None, outcome: str) -> PullFailed | None:
        """``forbidden`` when ``asked_by`` is not an allowed publisher; ``outcome`` says
        what was therefore not done."""
        if self.publishers is not None and asked_by not in self.publishers:
            who = f"publisher {asked_by!r}" if asked_by else "a request with no user_id"
            return PullFailed(
                ErrorKind.FORBIDDEN,
                f"{who} is not in {ALLOWED_PUBLISHERS} ({', '.join(sorted(self.publishers))}); "
                f"{outcome}",
            )
        return None

    def refusal(self, image: ImageReference, asked_by: str | None) -> PullFailed | None:
        """Why this request is refused (``forbidden``), or ``None``."""
        refused = self.publisher_refusal(asked_by, f"{image} was not pulled")
        if refused is not None:
            return refused
        reason = self.policy.refusal(image)
        if reason is not None:
            return PullFailed(ErrorKind.FORBIDDEN, f"{reason}; it was not pulled")
        return None

    def describe(self) -> str:
        """The rules in one line, for the start-up log."""
        who = ", ".join(sorted(self.publishers)) if self.publishers is not None else "anyone"
        return f"{self.policy.describe()}; publishers: {who}"


def publisher_names(text: str) -> frozenset[str]:
    """Parses a comma-separated :data:`ALLOWED_PUBLISHERS` value."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise ValueError("name at least one AMQP user, or leave it unset")
    return names


class RequestLimiter:
    """At most ``per_minute`` admissions in any 60 seconds (a sliding window). Thread-safe."""

    WINDOW = 60.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._admitted: deque[float] = deque()
        self._lock = threading.Lock()

    def refusal(self, image: ImageReference) -> PullFailed | None:
        """Counts one request and returns ``None``, or says when to try again (``rate_limited``)."""
        now = self._clock()
        with self._lock:
            while self._admitted and now - self._admitted[0] >= self.WINDOW:
                self._admitted.popleft()
            if len(self._admitted) < self.per_minute:
                self._admitted.append(now)
                return None
            wait = self.WINDOW - (now - self._admitted[0])
        return PullFailed(
            ErrorKind.RATE_LIMITED,
            f"this node starts at most {self.per_minute} pulls a minute for live requests "
            f"({MAX_REQUESTS_PER_MINUTE}); {image} was not pulled: ask again in "
            f"{max(1, round(wait))} s",
        )
