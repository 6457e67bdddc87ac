"""What a pull came to: one :class:`NodeResult` per node, and what the publisher noticed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract import ErrorKind, NodeProgress, NodeResult, PruneResult, Status


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


OLDER_WORKER_HINT = "expected a message of type 'pull', got"
"""What a worker from before checks and prunes answers to one (``invalid_request``)."""


def older_worker(result: NodeResult) -> bool:
    """Whether ``result`` is how a worker that predates the request's type answers it."""
    return (
        result.status is Status.FAILED
        and result.error is not None
        and result.error.kind is ErrorKind.INVALID_REQUEST
        and OLDER_WORKER_HINT in result.error.message
    )


@dataclass(frozen=True)
class StatusReport:
    """Where an image is: one row per node (``present``, ``absent``, ``failed``,
    ``no_reply``), and the nodes whose digests differ for the same name."""

    request_id: str
    image: str
    nodes: tuple[NodeResult, ...]
    notes: tuple[str, ...] = ()

    @property
    def present(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.nodes if r.status is Status.PRESENT)

    @property
    def absent(self) -> tuple[NodeResult, ...]:
        return tuple(r for r in self.nodes if r.status is Status.ABSENT)

    @property
    def older_workers(self) -> tuple[str, ...]:
        """Nodes whose worker does not know the ``check`` request (it predates it)."""
        return tuple(r.node for r in self.nodes if older_worker(r))

    @property
    def versions(self) -> dict[str, tuple[str, ...]]:
        """The nodes that have the image, grouped by what they have: its repository digest
        (its image id when the node knows no digest)."""
        groups: dict[str, list[str]] = {}
        for result in self.present:
            key = result.digest or result.image_id or "unknown"
            groups.setdefault(key, []).append(result.node)
        return {key: tuple(nodes) for key, nodes in sorted(groups.items())}

    @property
    def drift(self) -> bool:
        """Nodes have different images under the same name: a mutable tag (``:latest``)
        moved between their pulls. ``puller pull --refresh`` brings them together."""
        return len(self.versions) > 1

    @property
    def ok(self) -> bool:
        """Present on every node that was asked, with one digest."""
        return bool(self.nodes) and len(self.present) == len(self.nodes) and not self.drift

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "image": self.image,
            "ok": self.ok,
            "drift": self.drift,
            "versions": {key: list(nodes) for key, nodes in self.versions.items()},
            "older_workers": list(self.older_workers),
            "nodes": [report_row(r) for r in self.nodes],
            "notes": list(self.notes),
        }


@dataclass
class NodeWarmUp:
    """One node's progress through a warm-up."""

    node: str
    answered: int = 0
    failed: int = 0
    bytes: int = 0
    """Bytes pulled so far (the sizes the node's engine reported)."""


@dataclass
class WarmReport:
    """A warm-up so far: per node, images answered and bytes; the failures by kind."""

    images: tuple[str, ...]
    expected: int | None
    wanted: frozenset[str] | None
    by_node: dict[str, NodeWarmUp] = field(default_factory=dict)
    failures: list[NodeResult] = field(default_factory=list)
    """Every ``failed`` answer, in the order they came."""
    silent: frozenset[str] = frozenset()
    """Expected nodes that answered for no image at all."""
    notes: tuple[str, ...] = ()
    requests: tuple[str, ...] = ()
    _answers: dict[str, set[str]] = field(default_factory=dict)
    _progress: dict[tuple[str, str], int] = field(default_factory=dict)

    @classmethod
    def start(
        cls, images: tuple[str, ...], expected: int | None, wanted: set[str] | None
    ) -> WarmReport:
        report = cls(images, expected, frozenset(wanted) if wanted is not None else None)
        for node in sorted(wanted or ()):
            report.by_node[node] = NodeWarmUp(node)
        return report

    def take(self, event: NodeProgress | NodeResult | PruneResult) -> None:
        """One progress report or answer (the publisher's reply thread hands them over)."""
        if isinstance(event, PruneResult):
            return
        node = self.by_node.setdefault(event.node, NodeWarmUp(event.node))
        if isinstance(event, NodeProgress):
            key = (event.request_id, event.node)
            node.bytes += max(0, event.done - self._progress.get(key, 0))
            self._progress[key] = max(event.done, self._progress.get(key, 0))
            return
        answered = self._answers.setdefault(event.request_id, set())
        if event.node in answered:
            return
        answered.add(event.node)
        node.answered += 1
        if event.status is Status.FAILED:
            node.failed += 1
            self.failures.append(event)

    def finished(self, request_id: str) -> bool:
        """Every expected node answered for this image."""
        answered = self._answers.get(request_id, set())
        if self.wanted is not None:
            return self.wanted <= answered
        return self.expected is not None and len(answered) >= self.expected

    def nodes_answered(self) -> set[str]:
        return {name for name, node in self.by_node.items() if node.answered}

    def finish(
        self, requests: tuple[str, ...], silent: frozenset[str], notes: tuple[str, ...]
    ) -> WarmReport:
        self.requests, self.silent, self.notes = requests, silent, notes
        return self

    @property
    def failures_by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for result in self.failures:
            kind = result.error.kind.value if result.error else "unknown"
            kinds[kind] = kinds.get(kind, 0) + 1
        return dict(sorted(kinds.items()))

    @property
    def ok(self) -> bool:
        """Every expected node answered for every image, and none failed."""
        total = len(self.images)
        nodes = list(self.by_node.values())
        enough = (
            len(nodes) >= self.expected
            if self.expected is not None
            else bool(nodes) and (self.wanted is None or self.wanted <= set(self.by_node))
        )
        return (
            enough
            and not self.failures
            and not self.silent
            and all(node.answered == total for node in nodes)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "images": len(self.images),
            "ok": self.ok,
            "nodes": [
                {
                    "node": node.node,
                    "answered": node.answered,
                    "failed": node.failed,
                    "bytes": node.bytes,
                }
                for node in sorted(self.by_node.values(), key=lambda n: n.node)
            ],
            "failures_by_kind": self.failures_by_kind,
            "failures": [
                {"node": r.node, "image": r.image, "error": report_row(r)["error"]}
                for r in self.failures
            ],
            "no_reply": sorted(self.silent),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class PruneReport:
    """What each node removed (or, in a dry run, would remove) and the bytes freed."""

    request_id: str
    dry_run: bool
    answers: tuple[PruneResult | NodeResult, ...]
    """A :class:`PruneResult` per node that pruned; a ``failed`` :class:`NodeResult` from a
    node that refused (``forbidden``) or whose worker predates pruning."""
    no_reply: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def bytes_freed(self) -> int:
        return sum(a.bytes_freed for a in self.answers if isinstance(a, PruneResult))

    @property
    def ok(self) -> bool:
        return (
            bool(self.answers)
            and not self.no_reply
            and all(isinstance(a, PruneResult) and a.error is None for a in self.answers)
        )

    def to_json(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for answer in self.answers:
            if isinstance(answer, PruneResult):
                rows.append(answer.to_json())
            else:
                rows.append(
                    {
                        "node": answer.node,
                        "error": report_row(answer)["error"],
                        "older_worker": older_worker(answer),
                    }
                )
        return {
            "request_id": self.request_id,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "bytes_freed": self.bytes_freed,
            "nodes": rows,
            "no_reply": list(self.no_reply),
            "notes": list(self.notes),
        }
