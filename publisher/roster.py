"""The roster: which nodes exist, learned from the workers' presence announcements."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from contract import NodePresence, NodeState


@dataclass(frozen=True)
class NodeInfo:
    """A node whose worker announced itself recently."""

    node: str
    version: str
    engine: str | None
    """The node's Docker Engine version; ``None`` if the worker could not reach it."""
    started_at: float
    last_seen: float
    caught_up: bool | None = None
    """Whether the node has replayed the pulls it missed; ``None`` from older workers."""
    replay_pending: int = 0
    replay_failed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "version": self.version,
            "engine": self.engine,
            "started_at": self.started_at,
            "last_seen": self.last_seen,
            "caught_up": self.caught_up,
            "replay_pending": self.replay_pending,
            "replay_failed": self.replay_failed,
        }


def build_roster(announcements: Iterable[NodePresence]) -> list[NodeInfo]:
    """The nodes whose latest announcement (in stream order) is not "leaving", by name."""
    latest: dict[str, NodePresence] = {}
    for presence in announcements:
        latest[presence.node] = presence
    return [
        NodeInfo(
            node=p.node,
            version=p.version,
            engine=p.engine,
            started_at=p.started_at,
            last_seen=p.sent_at,
            caught_up=p.caught_up,
            replay_pending=p.replay_pending,
            replay_failed=p.replay_failed,
        )
        for name, p in sorted(latest.items())
        if p.state is NodeState.UP
    ]
