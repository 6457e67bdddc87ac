"""The roster: which nodes exist, learned from the workers' presence announcements.

A publisher follows the presence stream into a :class:`RosterBook` (see
:meth:`publisher.broker.PublisherBroker.sync_presence`): each node's latest announcement,
kept in memory and followed live, so that a roster read costs what was announced since the
last one, not the whole window again. Anyone who may publish to ``puller.presence`` can
flood the stream; a read that cannot reach "now" in time answers from the book with a note
(:class:`Roster`), and the book never holds more than ``max_nodes``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from contract import NodePresence, NodeState

NodeInfo = NodePresence
"""A node in the roster is its latest announcement; ``last_seen`` is when it was sent."""

MAX_NODES = 10_000
"""Nodes a roster book holds at most: a flood of made-up names cannot grow it without end."""


def build_roster(announcements: Iterable[NodePresence]) -> list[NodeInfo]:
    """The nodes whose latest announcement (in stream order) is not "leaving", by name."""
    latest: dict[str, NodePresence] = {}
    for presence in announcements:
        latest[presence.node] = presence
    return [p for _, p in sorted(latest.items()) if p.state is NodeState.UP]


@dataclass(frozen=True)
class Roster:
    """The live nodes, and whether they are all that was announced until the read began."""

    nodes: list[NodeInfo]
    complete: bool = True
    note: str | None = None
    """Why the roster may miss something (``complete`` is false), for the caller to show."""


@dataclass
class _Entry:
    presence: NodePresence
    seen: float
    """When it counts as seen (Unix time), for the roster's age limit."""


@dataclass
class RosterBook:
    """Each node's latest announcement and when it was seen; shared by the connection's
    thread (which adds) and callers (who read)."""

    max_nodes: int = MAX_NODES
    _latest: dict[str, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    turned_away: int = 0
    """Announcements of new nodes not kept because the book was full."""
    senders: Counter[str] = field(default_factory=Counter)
    """Messages read from the stream, by the AMQP ``user_id`` RabbitMQ vouched for ("" when
    none was given): who floods, if anyone does."""

    def add(self, presence: NodePresence, seen: float, horizon: float) -> None:
        """Records ``presence`` as its node's latest. A full book first forgets the nodes not
        seen since ``horizon`` (Unix time); still full, it turns a new node away."""
        with self._lock:
            if presence.node not in self._latest and len(self._latest) >= self.max_nodes:
                self._latest = {n: e for n, e in self._latest.items() if e.seen >= horizon}
                if len(self._latest) >= self.max_nodes:
                    self.turned_away += 1
                    return
            self._latest[presence.node] = _Entry(presence, seen)

    def roster(self, since: float) -> list[NodeInfo]:
        """The nodes seen since ``since`` (Unix time) whose latest word is not "leaving"."""
        with self._lock:
            entries = sorted(self._latest.items())
        return [
            entry.presence
            for _, entry in entries
            if entry.seen >= since and entry.presence.state is NodeState.UP
        ]

    def count(self, user: str | None) -> None:
        with self._lock:
            self.senders[user or ""] += 1

    def busiest(self) -> tuple[str, int] | None:
        """The user that put the most messages into the stream since the book was made."""
        with self._lock:
            found = self.senders.most_common(1)
        return found[0] if found else None
