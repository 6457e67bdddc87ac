"""What catching up needs from the rest of the worker: the broker's history side and the
pull service. Named here so that the replay and reconciling both take them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from contract import NodeResult, PullRequest
from worker.broker import HistoryReading, TailRead
from worker.broker.delivery import Delivery
from worker.pulls.answers import AnswerCallback, ProgressCallback


class HistoryBroker(Protocol):
    """The part of the worker's broker catch-up uses."""

    def find_tail(self, on_tail: Callable[[TailRead], None]) -> None: ...

    def read_history(self, reading: HistoryReading) -> None: ...

    def stop_history(self) -> None: ...

    def answer(self, delivery: Delivery, result: NodeResult | None) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def is_current(self, delivery: Delivery) -> bool: ...


class RequestServer(Protocol):
    def submit(
        self,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None = None,
        *,
        asked_by: str | None = None,
        live: bool = True,
    ) -> None: ...
