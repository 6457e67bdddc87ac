"""History entries a worker started replaying and did not finish, counted over restarts, so
that no entry can keep a node from ever catching up.

A worker that dies while it replays (killed for memory, a crash in a library, ``kill -9``)
starts again and replays the same entries: one that kills it every time would do so for
good. So before working an entry the worker writes it down, in
``PULLER_STATE_DIR/replay-attempts.json``, with how many runs have started it, and crosses
it off when done with it. At the next start an entry written down is a suspect: catch-up
works it alone (so that nothing in hand beside it is blamed with it), and one that
:data:`MAX_STARTS` runs started without an end is skipped (see :mod:`worker.catch_up.replay`).

A stop the worker chose (SIGTERM, draining) does not count: :meth:`ReplayAttempts.forgive`
takes back what this run started. The file is written at each change, not flushed to the
disk (a process that dies leaves it to the kernel; after a power cut an attempt may be lost,
which only gives an entry one more try).

Used on the connection's thread only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import structlog

from worker.state_files import parse_state, write_whole

log = structlog.get_logger("worker.replay_attempts")

ATTEMPTS_FILE = "replay-attempts.json"
MAX_STARTS = 2
"""Runs that may start an entry and die before it is done; the next one skips it."""
MAX_ENTRIES = 1000
"""Entries written down at most (a few are in hand at a time): a bound on the file."""


@dataclass
class _Started:
    identity: str
    starts: int


class ReplayAttempts:
    """The entries started and not finished, by stream offset; ``state_dir`` ``None``: kept
    in memory only (tests, and a worker that cannot write its state)."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else state_dir / ATTEMPTS_FILE
        self._entries: dict[int, _Started] = self._load()
        self._in_hand: Counter[int] = Counter()
        """Copies of each entry in hand in this run (a new reading delivers it again)."""
        self._counted: set[int] = set()
        """Entries whose start this run has counted."""

    def starts(self, offset: int, identity: str) -> int:
        """How many earlier runs started the entry at ``offset`` and died before it was done."""
        entry = self._entries.get(offset)
        return entry.starts if entry is not None and entry.identity == identity else 0

    def begin(self, offset: int, identity: str) -> None:
        """The entry is about to be worked: written down (once per run) before this returns."""
        self._in_hand[offset] += 1
        if offset in self._counted:
            return
        self._counted.add(offset)
        self._entries[offset] = _Started(identity, self.starts(offset, identity) + 1)
        while len(self._entries) > MAX_ENTRIES:
            del self._entries[min(self._entries)]
        self._save()

    def end(self, offset: int) -> None:
        """A copy of the entry is done with (whatever its outcome): once no copy is in hand,
        it is crossed off."""
        self._in_hand[offset] -= 1
        if self._in_hand[offset] > 0:
            return
        del self._in_hand[offset]
        self._counted.discard(offset)
        if self._entries.pop(offset, None) is not None:
            self._save()

    def skip(self, offset: int) -> None:
        """The entry is skipped: crossed off."""
        if self._entries.pop(offset, None) is not None:
            self._save()

    def forgive(self) -> None:
        """The worker stops of its own accord: what this run started and did not finish does
        not count against those entries."""
        changed = False
        for offset in self._counted:
            entry = self._entries.get(offset)
            if entry is None:
                continue
            entry.starts -= 1
            if entry.starts <= 0:
                del self._entries[offset]
            changed = True
        self._counted.clear()
        self._in_hand.clear()
        if changed:
            self._save()

    @property
    def suspects(self) -> int:
        """Entries written down now."""
        return len(self._entries)

    def _save(self) -> None:
        if self.path is None:
            return
        content = {
            "version": 1,
            "entries": [
                {"offset": offset, "identity": entry.identity, "starts": entry.starts}
                for offset, entry in sorted(self._entries.items())
            ],
        }
        try:
            write_whole(self.path, json.dumps(content, allow_nan=False), durable=False)
        except (OSError, ValueError) as error:
            log.warning(
                "cannot write down the history entries in hand; an entry that kills the "
                "worker may kill it again",
                path=str(self.path),
                error=str(error),
            )

    def _load(self) -> dict[int, _Started]:
        if self.path is None:
            return {}
        try:
            listed = parse_state(self.path.read_text(encoding="utf-8"))["entries"]
            if not isinstance(listed, list):
                raise TypeError("'entries' is not a list")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning(
                "unreadable list of history entries in hand; none is treated as suspect",
                path=str(self.path),
                error=str(error),
            )
            return {}
        entries: dict[int, _Started] = {}
        for item in listed[:MAX_ENTRIES]:
            offset = item.get("offset") if isinstance(item, dict) else None
            identity = item.get("identity") if isinstance(item, dict) else None
            starts = item.get("starts") if isinstance(item, dict) else None
            if (
                isinstance(offset, int)
                and not isinstance(offset, bool)
                and isinstance(identity, str)
                and isinstance(starts, int)
                and not isinstance(starts, bool)
                and starts > 0
            ):
                entries[offset] = _Started(identity, starts)
            else:
                log.warning("skipped an unreadable history entry in hand", entry=repr(item)[:200])
        return entries
