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

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "version": self.version,
            "engine": self.engine,
            "started_at": self.started_at,
            "last_seen": self.last_seen,
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
        )
        for name, p in sorted(latest.items())
        if p.state is NodeState.UP
    ]
