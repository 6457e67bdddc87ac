"""What catching up shows its observer (the worker's metrics): hooks with no-op defaults."""

from __future__ import annotations

from typing import Literal

from contract import HistoryGap, NodeResult, PullRequest

SkipReason = Literal["served_live", "too_old", "invalid", "forbidden", "stopped_the_worker"]
"""Why a history entry was not replayed (``forbidden``: this node's rules refused it)."""

TailOutcome = Literal["tail", "fallback"]
"""How a connection found the history's end: read over the stream protocol, or with a
marker because that read failed."""


class ReplayObserver:
    """Sees what catching up does (the metrics); each hook does nothing here, a subclass
    implements those it needs. Called on the connection's thread; must not block."""

    def replay_started(self, request: PullRequest) -> None:
        """A history entry is handed to the pull service."""

    def replay_skipped(self, reason: SkipReason) -> None:
        """A history entry is not replayed, or its answer does not count as a failure."""

    def replay_failed(self, result: NodeResult) -> None:
        """A replayed request's pull failed."""

    def history_delivered(self) -> None:
        """A history entry came on the current reading (any phase)."""

    def tail_read(self, outcome: TailOutcome) -> None:
        """A connection found where the history ends."""

    def history_gap(self, outcome: HistoryGap, lost: int) -> None:
        """The history lost ``lost`` entries this node had not replayed (0: how many is
        unknown, the stream was deleted and declared again)."""

    def history_whole(self) -> None:
        """A catch-up ended with nothing lost: an earlier gap is no longer the news."""

    def swept(self) -> None:
        """A connection's sweep ended."""

    def started_from_desired(self) -> None:
        """A node with no saved place applied the desired state instead of the history up
        to where the snapshot reaches."""
