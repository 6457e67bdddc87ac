"""Who sees the pull service's outcomes: the observer protocol, and several observers as one."""

from __future__ import annotations

from typing import Protocol

from contract import ImageReference, NodeResult, PullFailed


class PullObserver(Protocol):
    """Sees every outcome of the pull service (the metrics, the usage log). Called from any
    thread; must not block."""

    def answered(self, result: NodeResult, from_memory: bool) -> None: ...

    def attempt_started(self, image: ImageReference) -> None: ...

    def attempt_ended(
        self,
        image: ImageReference,
        seconds: float,
        bytes_received: int,
        failure: PullFailed | None,
    ) -> None: ...


class Observers:
    """Several pull observers as one (the metrics and the usage log)."""

    def __init__(self, *observers: PullObserver) -> None:
        self._observers = observers

    def answered(self, result: NodeResult, from_memory: bool) -> None:
        for observer in self._observers:
            observer.answered(result, from_memory)

    def attempt_started(self, image: ImageReference) -> None:
        for observer in self._observers:
            observer.attempt_started(image)

    def attempt_ended(
        self,
        image: ImageReference,
        seconds: float,
        bytes_received: int,
        failure: PullFailed | None,
    ) -> None:
        for observer in self._observers:
            observer.attempt_ended(image, seconds, bytes_received, failure)
