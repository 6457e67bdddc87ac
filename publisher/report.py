"""What a pull came to: one :class:`NodeResult` per node, and what the publisher noticed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract import NodeResult, Status


@dataclass(frozen=True)
class PullReport:
    request_id: str
    image: str
    nodes: tuple[NodeResult, ...]
    """One result per node that answered, and a ``no_reply`` row per expected node (by
    name, when the name is known) that did not, sorted by node name."""
    expected: int | None
    """How many nodes the caller waited for; ``None``: as many as answered in time."""
    notes: tuple[str, ...] = ()
    """What else the caller should know: a reconnection during the wait, or that only a
    count of the silent nodes was known."""
    wanted: frozenset[str] | None = None
    """The nodes waited for by name (``nodes=``, or the roster); ``None`` when a count was
    waited for (``expect=``)."""

    @property
    def failed(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.nodes if r.status is Status.FAILED)

    @property
    def no_reply(self) -> tuple[NodeResult, ...]:
        """Nodes, by name, that were expected (or in the roster) and did not answer."""
        return tuple(r for r in self.nodes if r.status is Status.NO_REPLY)

    @property
    def answered(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.nodes if r.status is not Status.NO_REPLY)

    @property
    def missing(self) -> int:
        """How many expected nodes did not answer."""
        if self.wanted is not None:
            return len(self.wanted - {r.node for r in self.answered})
        if self.expected is None:
            return len(self.no_reply)
        return max(self.expected - len(self.answered), 0)

    @property
    def ok(self) -> bool:
        """Every expected node answered and has the image."""
        return bool(self.answered) and not self.failed and self.missing == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "image": self.image,
            "expected": self.expected,
            "ok": self.ok,
            "missing": self.missing,
            "nodes": [report_row(r) for r in self.nodes],
            "notes": list(self.notes),
        }


ROW_FIELDS = ("node", "status", "seconds", "queued_seconds", "image_id", "digest", "error")


def report_row(result: NodeResult) -> dict[str, Any]:
    """One node's row, as ``puller pull --json`` and the HTTP API print it."""
    fields = result.to_json()
    return {name: fields[name] for name in ROW_FIELDS}
