"""Who sees the pull service's outcomes: hooks that do nothing unless a subclass says so.

As dramatiq's ``Middleware``: an observer (the metrics, the usage log) subclasses
:class:`PullObserver` and implements only the hooks it needs; the service calls every hook
and knows no observer's implementation.
"""

from __future__ import annotations

from contract import ImageReference, NodeResult, PullFailed


class PullObserver:
    """Sees every outcome of the pull service. Hooks are called from any thread and must
    not block; each does nothing here."""

    def answered(self, result: NodeResult, from_memory: bool) -> None:
        """A request's one result, as it is handed over (``from_memory``: no engine call)."""

    def attempt_started(self, image: ImageReference) -> None:
        """A pull attempt of ``image`` starts on a pull thread."""

    def attempt_ended(
        self,
        image: ImageReference,
        seconds: float,
        bytes_received: int,
        failure: PullFailed | None,
    ) -> None:
        """That attempt ended: pulled (``failure`` is ``None``) or failed."""


class Observers(PullObserver):
    """Several observers as one, called in the order given."""

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
