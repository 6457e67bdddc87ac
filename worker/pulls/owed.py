"""Images a node still owes itself: their pulls failed only because the node's own image
store was away, and are made again once it answers (:mod:`worker.pulls.service`). Kept on the
node's disk, so that a worker restarted meanwhile still makes them: the request itself
may be behind the node's catch-up place already (it was answered), so the history would
not bring it back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from contract import Lane, PullerError, parse_reference
from contract.reference import ImageReference
from worker.state_files import NotFinite, is_finite_number, parse_state, write_whole

log = structlog.get_logger("worker.deferred_pulls")

DEFERRED_FILE = "deferred-pulls.json"
MAX_FILE_BYTES = 4_000_000
"""Far above what :data:`worker.pulls.service.DEFERRED_LIMIT` entries take; a bigger file is not
one this worker wrote."""


@dataclass(frozen=True)
class DeferredPull:
    """How to make the pull again: its lane, who asked (checked again as that publisher,
    as the request was), since when it is owed, and how often it was made again and met
    the store away once more."""

    lane: Lane
    asked_by: str | None
    since: float
    tries: int = 0


class DeferredFile:
    """``deferred-pulls.json`` in the state directory: written whole on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[ImageReference, DeferredPull]:
        """What was kept. An entry that cannot be read is skipped (and said); a file that
        cannot be read at all gives nothing (and a warning)."""
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            entries = parse_state(self.path.read_text(encoding="utf-8"))["pulls"]
            if not isinstance(entries, list):
                raise TypeError("'pulls' is not a list")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            log.warning(
                "unreadable list of pulls owed since the engine was away; they are not made",
                path=str(self.path),
                error=str(error),
            )
            return {}
        kept: dict[ImageReference, DeferredPull] = {}
        for entry in entries:
            try:
                image, pull = _entry(entry)
            except (PullerError, ValueError, KeyError, TypeError, AttributeError) as error:
                log.warning(
                    "skipped an unreadable owed pull", entry=repr(entry)[:200], error=str(error)
                )
                continue
            kept[image] = pull
        return kept

    def save(self, pulls: Mapping[ImageReference, DeferredPull]) -> None:
        """Replaces the file (or removes it when nothing is owed); a failure is logged."""
        try:
            if not pulls:
                self.path.unlink(missing_ok=True)
                return
            entries = [
                {
                    "image": str(image),
                    "lane": pull.lane.value,
                    "asked_by": pull.asked_by,
                    "since": pull.since,
                    "tries": pull.tries,
                }
                for image, pull in pulls.items()
            ]
            write_whole(self.path, json.dumps({"pulls": entries}))
        except OSError as error:
            log.warning(
                "could not keep the pulls owed on disk", path=str(self.path), error=str(error)
            )


def _entry(entry: dict[str, object]) -> tuple[ImageReference, DeferredPull]:
    """One owed pull; raises ``ValueError`` (and the like) for one that cannot be read."""
    now = time.time()
    for name, value in entry.items():
        if isinstance(value, NotFinite):
            raise TypeError(f"{name!r} is {value!r}, not a finite number")
    asked_by, since, tries = entry.get("asked_by"), entry.get("since"), entry.get("tries")
    lane = entry.get("lane")
    return parse_reference(entry["image"]), DeferredPull(
        # A lane this version does not know is read as a session's, as the contract does.
        Lane(lane) if lane in {member.value for member in Lane} else Lane.SESSION,
        asked_by if isinstance(asked_by, str) else None,
        # Owed since no later than now: a clock that was ahead must not keep it for good.
        min(float(since), now)
        if isinstance(since, int | float) and is_finite_number(since)
        else now,
        tries if isinstance(tries, int) and not isinstance(tries, bool) and tries >= 0 else 0,
    )
