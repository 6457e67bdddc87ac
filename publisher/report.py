"""What a pull came to: one :class:`NodeResult` per node that answered."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contract import NodeResult, Status


@dataclass(frozen=True)
class PullReport:
    request_id: str
    image: str
    nodes: tuple[NodeResult, ...]
    """One result per node that answered, sorted by node name."""
    expected: int | None
    """How many nodes the caller waited for; ``None``: as many as answered in time."""

    @property
    def failed(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.nodes if r.status is Status.FAILED)

    @property
    def no_reply(self) -> tuple[NodeResult, ...]:
        """Expected nodes, by name, that did not answer in time."""
        return tuple(r for r in self.nodes if r.status is Status.NO_REPLY)

    @property
    def answered(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.nodes if r.status is not Status.NO_REPLY)

    @property
    def missing(self) -> int:
        """How many expected nodes did not answer (named in :attr:`no_reply` when known)."""
        by_count = 0 if self.expected is None else self.expected - len(self.answered)
        return max(len(self.no_reply), by_count, 0)

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
            "nodes": [
                {
                    "node": r.node,
                    "status": r.status.value,
                    "seconds": r.seconds,
                    "image_id": r.image_id,
                    "digest": r.digest,
                    "error": None
                    if r.error is None
                    else {"kind": r.error.kind.value, "message": r.error.message},
                }
                for r in self.nodes
            ],
        }
