"""What the worker remembers about registries and images, so that a bad one costs little.

- :class:`RegistryBreaker`: a registry that does not answer (refused, unreachable, or
  silent with not a byte sent) is marked down for a while; new pulls from it fail at once
  instead of each holding a pull slot for the stall timeout.
- :class:`NotFoundMemory`: an image the registry just said does not exist is answered
  ``not_found`` from memory for a few seconds, so a flood of requests for it costs nothing.
- :class:`RegistryHealth`: both, as the pull service tells them what each attempt showed.

All are thread-safe; the first two take the clock as an argument for tests.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from contract import ErrorKind, ImageReference, PullFailed

Clock = Callable[[], float]

FAILURES_TO_OPEN = 3
"""Failed attempts in a row, across pulls, after which a registry is marked down (a pull
that gives up marks it down at once)."""
MAX_REGISTRIES = 1000
"""Registries with failures kept at most (a flood of requests naming distinct unreachable
registries must not grow the worker): the least recently failed go first."""
REGISTRY_ANSWERED_KINDS = frozenset(
    {ErrorKind.NOT_FOUND, ErrorKind.UNAUTHORIZED, ErrorKind.REGISTRY_ERROR}
)
"""Failures that show the registry is up: it answered, if only to say no."""


@dataclass
class _RegistryState:
    failures_in_row: int = 0
    down_until: float = 0.0
    last_error: str = ""


class RegistryBreaker:
    """Per registry (an image's domain): closed while it answers; open (failing fast) for
    ``cooldown`` seconds once it is known down; then one pull may try it again."""

    def __init__(self, cooldown: float, clock: Clock = time.monotonic) -> None:
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._registries: OrderedDict[str, _RegistryState] = OrderedDict()

    def refusal(self, image: ImageReference) -> PullFailed | None:
        """A failure to answer at once if the image's registry is known down, else ``None``."""
        if self.cooldown <= 0:
            return None
        with self._lock:
            state = self._registries.get(image.domain)
            if state is None:
                return None
            remaining = state.down_until - self._clock()
            if remaining <= 0:
                return None
            last_error = state.last_error
        return PullFailed(
            ErrorKind.REGISTRY_UNREACHABLE,
            f"pulling {image}: the registry {image.domain} is known to be down (latest: "
            f"{last_error}); this node tries it again in {remaining:.0f}s "
            "(PULLER_REGISTRY_COOLDOWN). Check that the node can reach the registry.",
        )

    def attempt_failed(self, image: ImageReference, failure: PullFailed, gave_up: bool) -> None:
        """Counts a failed pull attempt that says the registry did not answer."""
        with self._lock:
            state = self._registries.setdefault(image.domain, _RegistryState())
            self._registries.move_to_end(image.domain)
            while len(self._registries) > MAX_REGISTRIES:
                self._registries.popitem(last=False)
            state.failures_in_row += 1
            state.last_error = _first_line(failure.message)
            if gave_up or state.failures_in_row >= FAILURES_TO_OPEN:
                state.down_until = self._clock() + self.cooldown

    def answered(self, image: ImageReference) -> None:
        """The registry answered (with the image, or a definite "no"): it is up."""
        with self._lock:
            self._registries.pop(image.domain, None)

    def down(self) -> list[str]:
        """Registries marked down now."""
        now = self._clock()
        with self._lock:
            return sorted(name for name, s in self._registries.items() if s.down_until > now)


def says_registry_silent(failure: PullFailed, bytes_received: int) -> bool:
    """Whether a failed attempt means the registry did not answer at all."""
    if failure.kind is ErrorKind.REGISTRY_UNREACHABLE:
        return True
    return failure.kind is ErrorKind.STALLED and bytes_received == 0


class NotFoundMemory:
    """Images the registry said do not exist, for ``seconds`` after it said so.

    Kept per entry: the image's name and the registry's message, as text (never the
    failure itself: an exception holds its traceback, and through it the pull's frames,
    the engine's response and its connection pool, tens of kilobytes an image). Expired
    entries are swept at each new one; the whole stays under ``max_bytes``, oldest out
    first."""

    MAX_BYTES = 2_000_000
    """A bound on what a flood of distinct missing images can hold here."""
    MESSAGE_LIMIT = 500
    """Characters of the registry's message kept (the rest is cut)."""

    def __init__(
        self, seconds: float, clock: Clock = time.monotonic, max_bytes: int = MAX_BYTES
    ) -> None:
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, tuple[float, str]] = OrderedDict()
        """Image name -> (expires, message), in the order they expire."""
        self._bytes = 0

    def remember(self, image: ImageReference, failure: PullFailed) -> None:
        if self.seconds <= 0 or failure.kind is not ErrorKind.NOT_FOUND:
            return
        name = str(image)
        message = _cut(failure.message, self.MESSAGE_LIMIT)
        now = self._clock()
        with self._lock:
            self._drop(name)
            self._failures[name] = (now + self.seconds, message)
            self._bytes += _entry_bytes(name, message)
            self._sweep(now)

    def recall(self, image: ImageReference) -> PullFailed | None:
        name = str(image)
        with self._lock:
            entry = self._failures.get(name)
            if entry is None:
                return None
            expires, message = entry
            if expires <= self._clock():
                self._drop(name)
                return None
        return PullFailed(ErrorKind.NOT_FOUND, message)

    def forget(self, image: ImageReference) -> None:
        with self._lock:
            self._drop(str(image))

    @property
    def held(self) -> tuple[int, int]:
        """Entries held now, and their estimated bytes."""
        with self._lock:
            return len(self._failures), self._bytes

    def _drop(self, name: str) -> None:
        entry = self._failures.pop(name, None)
        if entry is not None:
            self._bytes -= _entry_bytes(name, entry[1])

    def _sweep(self, now: float) -> None:
        """Under the lock: drops expired entries (the oldest come first), then the oldest
        until under the byte bound."""
        while self._failures:
            name, (expires, _) = next(iter(self._failures.items()))
            if expires > now and self._bytes <= self.max_bytes:
                return
            self._drop(name)


class RegistryHealth:
    """What pull attempts showed about registries and images: the breaker and the
    not-found memory, fed and asked as one."""

    def __init__(self, breaker: RegistryBreaker, not_found: NotFoundMemory) -> None:
        self._breaker = breaker
        self._not_found = not_found

    def refusal(self, image: ImageReference) -> PullFailed | None:
        """A failure to answer at once, without pulling, when the registry is known down."""
        return self._breaker.refusal(image)

    def recall(self, image: ImageReference) -> PullFailed | None:
        """``not_found`` from memory, when the registry said so moments ago."""
        failure = self._not_found.recall(image)
        if failure is None:
            return None
        return PullFailed(
            failure.kind, f"{failure.message} (answered from memory: seen moments ago)"
        )

    def pulled(self, image: ImageReference) -> None:
        self._breaker.answered(image)
        self._not_found.forget(image)

    def attempt_failed(
        self, image: ImageReference, failure: PullFailed, bytes_received: int, last: bool
    ) -> None:
        """An attempt failed (``last``: the pull gives up after it)."""
        if says_registry_silent(failure, bytes_received):
            self._breaker.attempt_failed(image, failure, gave_up=last)
        elif failure.kind in REGISTRY_ANSWERED_KINDS:
            self._breaker.answered(image)
        self._not_found.remember(image, failure)


ENTRY_OVERHEAD = 250
"""Bytes an entry costs beyond its two strings (dict slot, tuple, float, string headers)."""


def _entry_bytes(name: str, message: str) -> int:
    return ENTRY_OVERHEAD + len(name) + len(message)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else f"{line[: limit - 3]}..."
