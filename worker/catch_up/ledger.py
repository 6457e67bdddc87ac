"""How far this node has got through the history stream, kept on the node's own disk.

The ledger records, for the last history entry the node is done with, its offset and
the entry's identity (a hash of its body). The identity tells the worker, on its next
start, whether that offset still holds the same entry: a stream deleted and declared
again (to change its retention, or by a broker that lost its disk) starts its offsets
again from 0, and a saved place from the old stream means nothing in the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog

from contract import InvalidMessage, PullRequest, decode_history
from worker.state_files import parse_state, write_whole

log = structlog.get_logger("worker.history_ledger")

STATE_FILE = "history-offset.json"


class CannotKeepState(Exception):
    """``PULLER_STATE_DIR`` cannot be created or written."""


def entry_identity(body: bytes) -> str:
    """What identifies a history entry: a short hash of its body (every entry is unique:
    requests carry a request id, markers a marker id)."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def lost_entries(saved: int, first_delivered: int, identity_match: bool) -> int | None:
    """How many history entries after ``saved`` (the offset of the last entry this node is
    done with) the history lost, from the first offset a reading from ``saved`` delivered
    and whether that entry, if at ``saved``, is the one saved. ``None``: the stream was
    deleted and declared again, so everything after ``saved`` is gone (how much is unknown).

    Every segment of a stream starts with one chunk of its own that takes an offset and is
    never delivered, so the entry after ``saved`` may sit at ``saved + 2`` with nothing lost.
    When several segments went, the count is an upper bound (their own chunks count too).
    """
    if first_delivered == saved:
        return 0 if identity_match else None
    if first_delivered < saved:
        return None
    return max(0, first_delivered - saved - 2)


@dataclass(frozen=True)
class Place:
    """The last entry done: its offset, and its identity when known (older state files
    kept only the offset)."""

    offset: int
    identity: str | None = None
    requested_at: float | None = None
    """When its request was made (``None``: unknown: a marker, or an older state file)."""


class OffsetStore:
    """The :class:`Place` of the last history entry this node is done with, in a file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            probe = state_dir / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise CannotKeepState(
                f"PULLER_STATE_DIR={str(state_dir)!r} cannot be written ({error.strerror}); "
                "point it at a directory on the node's disk this worker can write"
            ) from None

    def load(self) -> Place | None:
        try:
            state = parse_state(self.path.read_text())
            offset, identity = state["offset"], state.get("identity")
            requested_at = state.get("requested_at")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning(
                "unreadable catch-up state; replaying the whole window",
                path=str(self.path),
                error=str(error),
            )
            return None
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            log.warning("invalid catch-up state; replaying the whole window", offset=offset)
            return None
        return Place(
            offset,
            identity if isinstance(identity, str) else None,
            requested_at if _is_time(requested_at) else None,
        )

    def save(self, place: Place) -> None:
        state = {
            "offset": place.offset,
            "identity": place.identity,
            "requested_at": place.requested_at,
            "saved_at": time.time(),
        }
        try:
            write_whole(self.path, json.dumps(state))
        except OSError as error:  # a full disk must not stop the node serving live requests
            log.warning("could not save the catch-up state", error=str(error))

    def clear(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("could not clear the catch-up state", error=str(error))


class Ledger:
    """Which history entries are in hand and which are done. Done ones advance the saved
    place only when every entry before them is done too, so a restart never skips one."""

    def __init__(self, store: OffsetStore) -> None:
        self._store = store
        self.committed: Place | None = store.load()
        self._in_order: deque[tuple[int, str]] = deque()
        self._done: set[int] = set()
        self._times: dict[int, float] = {}
        """When the requests in hand were made, by offset."""

    def restart(self) -> None:
        """A new reading redelivers everything not committed: forget what was in hand."""
        self._in_order.clear()
        self._done.clear()
        self._times.clear()

    def forget_place(self) -> None:
        """The saved place belongs to another stream: start again from the beginning."""
        self.restart()
        self.committed = None
        self._store.clear()

    def delivered(self, offset: int, identity: str) -> None:
        self._in_order.append((offset, identity))

    def requested(self, offset: int, requested_at: float) -> None:
        """When the request of the entry in hand at ``offset`` was made."""
        self._times[offset] = requested_at

    def done(self, offset: int) -> None:
        self._done.add(offset)
        advanced: tuple[int, str] | None = None
        requested_at: float | None = None
        while self._in_order and self._in_order[0][0] in self._done:
            advanced = self._in_order.popleft()
            self._done.discard(advanced[0])
            requested_at = self._times.pop(advanced[0], None)
        if advanced is not None:
            self.jump(Place(*advanced, requested_at))

    def jump(self, place: Place) -> None:
        """Everything up to ``place`` is done (never moves back)."""
        if self.committed is None or place.offset > self.committed.offset:
            self.committed = place
            self._store.save(place)

    @property
    def in_hand(self) -> int:
        return len(self._in_order)

    @property
    def committed_offset(self) -> int | None:
        return None if self.committed is None else self.committed.offset


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def requested_at(body: bytes) -> float | None:
    """When a history entry's request was made (``None``: not a request, or unreadable)."""
    try:
        entry = decode_history(body)
    except InvalidMessage:
        return None
    return entry.requested_at if isinstance(entry, PullRequest) else None
