"""Pulls a node owes itself: they failed only because the node's own image store was away,
and are made again, with no one to answer, once it answers. Kept on the node's disk, so
that a worker restarted meanwhile still makes them: the request may be behind the node's
catch-up place already (it was answered), so the history would not bring it back.

Each owed pull is made again as the publisher that asked (checked again, as the request
was). One that meets the store away again stays owed; it is given up after
:data:`OWED_MAX_TRIES` such pulls (a pull that takes the store down) or :data:`OWED_MAX_AGE`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog

from contract import ErrorKind, Lane, NodeResult, PullerError, PullRequest, parse_reference
from contract.reference import ImageReference
from worker.state_files import NotFinite, is_finite_number, parse_state, write_whole

log = structlog.get_logger("worker.owed_pulls")

OWED_FILE = "deferred-pulls.json"
"""The file in ``PULLER_STATE_DIR``: the name every version has written, so that a worker
upgraded in place makes what the one before it owed."""
OWED_LIMIT = 1000
"""Owed pulls kept at most; beyond that a pull failed because the store was away is not."""
OWED_MAX_TRIES = 20
"""Times an owed pull is made again and meets the store away once more (while the store
answers questions) before it is given up: an image whose pull takes the store down."""
OWED_MAX_AGE = 24 * 3600.0
"""Seconds an owed pull is kept, over restarts: older ones are given up."""
ENGINE_WATCH_INTERVAL = 5.0
"""Seconds between looks at a store that was away, while pulls are owed."""
MAX_FILE_BYTES = 4_000_000
"""Far above what :data:`OWED_LIMIT` entries take; a bigger file is not one a worker wrote."""

Remake = Callable[[PullRequest, Callable[[NodeResult], None], str | None], None]
"""Makes a pull again: the request, where its one result goes, and who asked for it."""


@dataclass(frozen=True)
class OwedPull:
    """How to make the pull again: its lane, who asked (checked again as that publisher),
    since when it is owed, and how often it was made again and met the store away again."""

    lane: Lane
    asked_by: str | None
    since: float
    tries: int = 0


class OwedPulls:
    """The pulls one node owes itself (see the module's docstring). Thread-safe.

    ``path``: the file they are kept in (``None``: memory only); ``engine_answers``: raises
    while the store is away; ``remake``: submits a pull made again."""

    def __init__(
        self, path: Path | None, engine_answers: Callable[[], object], remake: Remake
    ) -> None:
        self._path = path
        self._engine_answers = engine_answers
        self._remake = remake
        self._lock = threading.Lock()
        self._waiting: dict[ImageReference, OwedPull] = {}
        """Owed and waiting for the store to answer."""
        self._owed: dict[ImageReference, OwedPull] = {}
        """Waiting, or made again and not answered yet: what the file keeps."""
        self._remade: dict[ImageReference, int] = {}
        """The token of each owed pull's latest remaking: only its answer settles it."""
        self._remakings = 0
        self._tried_again: set[ImageReference] = set()
        """Images given their one more try after an engine error (see :meth:`owe`)."""
        self._timer: threading.Timer | None = None
        self._stopped = False
        self._dirty = False
        self._writing = False

    @property
    def waiting(self) -> int:
        """Pulls waiting for the store to answer again."""
        with self._lock:
            return len(self._waiting)

    def owe(
        self, image: ImageReference, lane: Lane, asked_by: str | None, once: bool = False
    ) -> bool:
        """Owes the pull of ``image`` (it failed because the store was away), to make it
        again once the store answers. ``False`` when too many are owed already; with
        ``once``, also when this image had its one more try already."""
        with self._lock:
            if len(self._waiting) >= OWED_LIMIT and image not in self._waiting:
                return False
            if once:
                if image in self._tried_again:
                    self._tried_again.discard(image)
                    return False
                if len(self._tried_again) >= OWED_LIMIT:
                    return False
                self._tried_again.add(image)
            before = self._owed.get(image)
            owed = (
                OwedPull(lane, asked_by, time.time())
                if before is None
                else dataclasses.replace(before, lane=lane, asked_by=asked_by or before.asked_by)
            )
            self._waiting[image] = owed
            self._owed[image] = owed
        if before != owed:
            self._save()
        self._watch_engine()
        return True

    def pulled(self, image: ImageReference) -> None:
        """``image`` was pulled: a later engine error gets its one more try again."""
        with self._lock:
            self._tried_again.discard(image)

    def resume(self) -> int:
        """Takes back what the file keeps (a previous run's), to make once the store
        answers; how many are owed then."""
        if self._path is None:
            return 0
        kept = read_owed_file(self._path)
        if len(kept) > OWED_LIMIT:
            log.warning("more pulls owed than are kept; the rest are given up", owed=len(kept))
        with self._lock:
            for image, owed in list(kept.items())[:OWED_LIMIT]:
                self._waiting.setdefault(image, owed)
                self._owed.setdefault(image, owed)
            taken = len(self._waiting)
        if kept:
            self._watch_engine()
        return taken

    def stop(self) -> None:
        """No more looks at the store (the worker is stopping); one under way finishes."""
        with self._lock:
            self._stopped = True

    def close(self) -> None:
        """Stops, and drops the next look at the store."""
        with self._lock:
            self._stopped = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _watch_engine(self) -> None:
        """Looks at the store in a few seconds (if nobody looks already)."""
        with self._lock:
            if self._timer is not None or self._stopped:
                return
            timer = self._timer = threading.Timer(ENGINE_WATCH_INTERVAL, self._engine_back)
            timer.daemon = True
        timer.start()

    def _engine_back(self) -> None:
        """Timer thread: if the store answers now, makes the owed pulls again; else looks
        again later."""
        try:
            self._engine_answers()
            back = True
        except Exception:
            back = False
        with self._lock:
            self._timer = None
            if not back:
                again = bool(self._waiting)
            else:
                waiting, self._waiting = self._waiting, {}
                remaking, given_up = self._take(waiting)
        if not back:
            if again:
                self._watch_engine()
            return
        for image, owed in given_up.items():
            log.warning(
                "gave up a pull owed since the engine was away",
                image=str(image),
                owed_since=owed.since,
                tries=owed.tries,
            )
        if given_up or remaking:
            self._save()  # the tries counted, over restarts too
        if remaking:
            log.info(
                "the engine answers again; pulling what failed while it was away",
                images=len(remaking),
            )
        for image, (owed, token) in remaking.items():
            request = PullRequest.new(image, lane=owed.lane)
            self._remake(request, partial(self._answered, image, token), owed.asked_by)

    def _take(
        self, waiting: dict[ImageReference, OwedPull]
    ) -> tuple[dict[ImageReference, tuple[OwedPull, int]], dict[ImageReference, OwedPull]]:
        """Under the lock: the owed pulls to make again now (each with a token of its own,
        and counted as tried), and those given up (too old, or tried too often)."""
        now = time.time()
        remaking: dict[ImageReference, tuple[OwedPull, int]] = {}
        given_up: dict[ImageReference, OwedPull] = {}
        for image, owed in waiting.items():
            if owed.tries >= OWED_MAX_TRIES or now - owed.since > OWED_MAX_AGE:
                given_up[image] = owed
                self._owed.pop(image, None)
                self._remade.pop(image, None)
                continue
            tried = dataclasses.replace(owed, tries=owed.tries + 1)
            self._owed[image] = tried
            self._remakings += 1
            self._remade[image] = self._remakings
            remaking[image] = (tried, self._remakings)
        return remaking, given_up

    def _answered(self, image: ImageReference, token: int, result: NodeResult) -> None:
        """A pull made again has its answer: no longer owed, unless made again since (then
        that one's answer settles it), owed once more, or cut short by the worker stopping
        (the next run makes it)."""
        log.info(
            "pulled what failed while the engine was away"
            if result.has_image
            else "what failed while the engine was away failed again",
            image=str(image),
            status=result.status.value,
            error=result.error.message if result.error else None,
        )
        if result.error is not None and result.error.kind is ErrorKind.CANCELLED:
            return
        with self._lock:
            if self._remade.get(image) != token:
                return
            del self._remade[image]
            done = image not in self._waiting and self._owed.pop(image, None) is not None
        if done:
            self._save()

    def _save(self) -> None:
        """Writes the file. One thread writes at a time; changes made meanwhile are written
        by it, once, when it is done (a burst of owed pulls is a few writes)."""
        if self._path is None:
            return
        with self._lock:
            self._dirty = True
            if self._writing:
                return
            self._writing = True
        try:
            while True:
                with self._lock:
                    if not self._dirty:
                        return
                    self._dirty = False
                    owed = dict(self._owed)
                write_owed_file(self._path, owed)
        finally:
            with self._lock:
                self._writing = False


def read_owed_file(path: Path) -> dict[ImageReference, OwedPull]:
    """What ``path`` keeps. An entry that cannot be read is skipped (and said); a file that
    cannot be read at all gives nothing (and a warning)."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        entries = parse_state(path.read_text(encoding="utf-8"))["pulls"]
        if not isinstance(entries, list):
            raise TypeError("'pulls' is not a list")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        log.warning(
            "unreadable list of pulls owed since the engine was away; they are not made",
            path=str(path),
            error=str(error),
        )
        return {}
    kept: dict[ImageReference, OwedPull] = {}
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


def write_owed_file(path: Path, pulls: Mapping[ImageReference, OwedPull]) -> None:
    """Replaces ``path`` whole (removes it when nothing is owed); a failure is logged."""
    try:
        if not pulls:
            path.unlink(missing_ok=True)
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
        write_whole(path, json.dumps({"pulls": entries}))
    except OSError as error:
        log.warning("could not keep the pulls owed on disk", path=str(path), error=str(error))


def _entry(entry: dict[str, object]) -> tuple[ImageReference, OwedPull]:
    """One owed pull; raises ``ValueError`` (and the like) for one that cannot be read."""
    now = time.time()
    for name, value in entry.items():
        if isinstance(value, NotFinite):
            raise TypeError(f"{name!r} is {value!r}, not a finite number")
    asked_by, since, tries = entry.get("asked_by"), entry.get("since"), entry.get("tries")
    lane = entry.get("lane")
    return parse_reference(entry["image"]), OwedPull(
        # A lane this version does not know is read as a session's, as the contract does.
        Lane(lane) if lane in {member.value for member in Lane} else Lane.SESSION,
        asked_by if isinstance(asked_by, str) else None,
        # Owed since no later than now: a clock that was ahead must not keep it for good.
        min(float(since), now)
        if isinstance(since, int | float) and is_finite_number(since)
        else now,
        tries if isinstance(tries, int) and not isinstance(tries, bool) and tries >= 0 else 0,
    )
