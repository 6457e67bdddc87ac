"""Images a node still owes itself: their pulls failed only because the node's own image
store was away, and are made again once it answers (:mod:`worker.service`). Kept on the
node's disk, so that a worker restarted meanwhile still makes them: the request itself
may be behind the node's catch-up place already (it was answered), so the history would
not bring it back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from contract import Lane, parse_reference
from contract.reference import ImageReference

log = structlog.get_logger("worker.deferred_pulls")

DEFERRED_FILE = "deferred-pulls.json"


@dataclass(frozen=True)
class DeferredPull:
    """How to make the pull again: its lane, and who asked (checked again as that
    publisher, as the request was)."""

    lane: Lane
    asked_by: str | None


class DeferredFile:
    """``deferred-pulls.json`` in the state directory: written whole on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[ImageReference, DeferredPull]:
        """What was kept; empty (with a warning) when the file cannot be read."""
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))["pulls"]
            kept = {}
            for entry in entries:
                asked_by = entry.get("asked_by")
                kept[parse_reference(entry["image"])] = DeferredPull(
                    Lane(entry.get("lane", Lane.SESSION.value)),
                    asked_by if isinstance(asked_by, str) else None,
                )
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning(
                "unreadable list of pulls owed since the engine was away; they are not made",
                path=str(self.path),
                error=str(error),
            )
            return {}
        return kept

    def save(self, pulls: Mapping[ImageReference, DeferredPull]) -> None:
        """Replaces the file (or removes it when nothing is owed); a failure is logged."""
        try:
            if not pulls:
                self.path.unlink(missing_ok=True)
                return
            entries = [
                {"image": str(image), "lane": pull.lane.value, "asked_by": pull.asked_by}
                for image, pull in pulls.items()
            ]
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("w", encoding="utf-8") as file:
                file.write(json.dumps({"pulls": entries}))
                file.flush()
                os.fsync(file.fileno())
            partial.replace(self.path)
        except OSError as error:
            log.warning(
                "could not keep the pulls owed on disk", path=str(self.path), error=str(error)
            )
