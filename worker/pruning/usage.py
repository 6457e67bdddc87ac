"""When this node last used each image, as far as puller knows: what pruning calls
"last used".

Docker records no such thing, so the worker keeps it, per image id, in a small JSON file in
``PULLER_STATE_DIR`` (``image-usage.json``):

* ``used``: when the worker last answered ``pulled`` or ``present`` for the image (a
  request for it, live or replayed), fed by :meth:`UsageLog.answered` as a pull observer;
* ``seen``: when the worker first saw the image on its engine (recorded at every listing
  pruning makes, and once when the worker starts): the age of an image puller never
  answered for counts from then, never from its build time (a pulled image's only other
  date), which says nothing of when it came to the node.

Keyed by image id, not name: a tag moved to a new image leaves the old image unused. The
file is written whole (a new file renamed into place), when it changed, every 30 seconds by
the worker's housekeeping (:class:`worker.pruning.disk_watch.Housekeeping`), after each
prune and at shutdown; a missing file starts empty, an unreadable one too, with a warning;
an entry whose time is no finite number (``Infinity``, ``NaN``) is skipped, with a warning,
and the rest kept. Entries of images the engine no longer holds are dropped at each listing.

Times only count up to now: a time later than the listing's ``now`` (written while the
clock was ahead, even for a moment) is brought back to ``now`` at that listing, with a
warning; kept as it was, it would make the image look used until the clock caught up.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from contract import NodeResult
from worker.pulls.observers import PullObserver
from worker.state_files import is_finite_number, parse_state, write_whole

log = structlog.get_logger("worker.usage")

USAGE_FILE = "image-usage.json"
FORMAT_VERSION = 1
MAX_ENTRIES = 100_000
"""More than any engine holds; a bound on the file whatever happens."""


class UsageLog(PullObserver):
    """Per image id: last answered ``pulled``/``present`` (``used``) and first seen on the
    engine (``seen``), both seconds since the epoch. Thread-safe; a pull observer
    (``answered``) that never blocks on the disk."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}
        self._seen: dict[str, float] = {}
        self._dirty = False
        self._load()

    # -- the pull service's observer ---------------------------------------------------------

    def answered(self, result: NodeResult, from_memory: bool) -> None:
        if result.has_image and result.image_id:
            self.record(result.image_id, self._clock())

    # -- what pruning reads and writes -------------------------------------------------------

    def record(self, image_id: str, when: float) -> None:
        """The image was used (answered for) at ``when``."""
        if not is_finite_number(when):
            return
        with self._lock:
            if when > self._used.get(image_id, float("-inf")):
                self._used[image_id] = when
                self._seen.setdefault(image_id, when)
                self._dirty = True

    def used_now(self, image_id: str) -> None:
        """The image was claimed for an answer just now (:mod:`worker.pulls.image_guard`)."""
        self.record(image_id, self._clock())

    def last_used(self, image_id: str) -> float | None:
        with self._lock:
            return self._used.get(image_id)

    def first_seen(self, image_id: str) -> float | None:
        with self._lock:
            return self._seen.get(image_id)

    def saw(self, image_ids: Iterable[str], now: float) -> None:
        """The engine holds exactly ``image_ids`` now: new ones are first seen at ``now``,
        entries of the others are dropped, times after ``now`` are brought back to it."""
        present = set(image_ids)
        with self._lock:
            before = (len(self._used), len(self._seen))
            self._used = {i: t for i, t in self._used.items() if i in present}
            self._seen = {i: t for i, t in self._seen.items() if i in present}
            future = _bring_back(self._used, now) + _bring_back(self._seen, now)
            if future:
                self._dirty = True
                log.warning(
                    "image usage times later than now (the clock was ahead); counted from now",
                    entries=future,
                    now=now,
                )
            for image_id in present:
                if image_id not in self._seen:
                    self._seen[image_id] = now
                    self._dirty = True
            if (len(self._used), len(self._seen)) != before:
                self._dirty = True

    def forget(self, image_id: str) -> None:
        """The image was removed."""
        with self._lock:
            if image_id in self._used or image_id in self._seen:
                self._used.pop(image_id, None)
                self._seen.pop(image_id, None)
                self._dirty = True

    # -- the file ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Writes the file whole if anything changed; a failure is logged, never raised (the
        log is kept in memory and written at the next flush)."""
        with self._lock:
            if not self._dirty:
                return
            images = {
                image_id: {"used": self._used.get(image_id), "seen": seen}
                for image_id, seen in self._newest(self._seen)
            }
            self._dirty = False
        content = json.dumps({"version": FORMAT_VERSION, "images": images}, sort_keys=True)
        try:
            write_whole(self.path, content)
        except OSError as error:
            with self._lock:
                self._dirty = True
            log.warning("cannot write the image usage log", path=str(self.path), error=str(error))

    def _newest(self, seen: dict[str, float]) -> list[tuple[str, float]]:
        """At most :data:`MAX_ENTRIES`, the most recently used or seen first."""
        entries = sorted(
            seen.items(), key=lambda item: max(item[1], self._used.get(item[0], item[1]))
        )
        return entries[-MAX_ENTRIES:]

    def _load(self) -> None:
        try:
            content = parse_state(self.path.read_text(encoding="utf-8"))
            images = content["images"]
            if not isinstance(images, dict):
                raise TypeError("'images' is not an object")
            skipped = [
                image_id for image_id, entry in images.items() if not self._take(image_id, entry)
            ]
            if skipped:
                log.warning(
                    "ignored times in the image usage log that are not finite numbers of "
                    "seconds (Infinity, NaN, negative); the rest of the file is kept",
                    path=str(self.path),
                    entries=len(skipped),
                    first=repr(skipped[0])[:100],
                )
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self._used.clear()
            self._seen.clear()
            log.warning(
                "unreadable image usage log; starting empty (images count as first seen now)",
                path=str(self.path),
                error=str(error),
            )

    def _take(self, image_id: object, entry: Any) -> bool:
        """Keeps one entry of the file; ``False`` when its times are unreadable (a ``used``
        that is unreadable beside a good ``seen`` loses only ``used``)."""
        if not isinstance(entry, dict):
            return False
        seen, used = _time(entry.get("seen")), entry.get("used")
        if not isinstance(image_id, str) or seen is None:
            return False
        self._seen[image_id] = seen
        if used is None:
            return True
        used_at = _time(used)
        if used_at is None:
            return False
        self._used[image_id] = used_at
        return True


def _time(value: object) -> float | None:
    """Seconds since the epoch, if ``value`` is a finite number of them (0 or more)."""
    if isinstance(value, int | float) and is_finite_number(value) and value >= 0:
        return float(value)
    return None


def _bring_back(times: dict[str, float], now: float) -> int:
    """Sets every time after ``now`` to ``now``; how many there were."""
    later = [image_id for image_id, moment in times.items() if moment > now]
    for image_id in later:
        times[image_id] = now
    return len(later)
