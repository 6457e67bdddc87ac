"""The roster: which nodes exist, learned from the workers' presence announcements."""

from __future__ import annotations

from collections.abc import Iterable

from contract import NodePresence, NodeState

NodeInfo = NodePresence
"""A node in the roster is its latest announcement; ``last_seen`` is when it was sent."""


def build_roster(announcements: Iterable[NodePresence]) -> list[NodeInfo]:
    """The nodes whose latest announcement (in stream order) is not "leaving", by name."""
    latest: dict[str, NodePresence] = {}
    for presence in announcements:
        latest[presence.node] = presence
    return [p for _, p in sorted(latest.items()) if p.state is NodeState.UP]
