"""Pruning by itself: the engine's data disk, watched (:class:`DiskWatch`), and the worker's
housekeeping thread that runs the watch and writes the usage log (:class:`Housekeeping`).

When the engine's data disk is at least ``PULLER_DISK_HIGH_WATER`` percent used, candidates
with no age rule but ``PULLER_PRUNE_MIN_IDLE`` (:data:`worker.pruning.pruner.DEFAULT_MIN_IDLE`)
are removed, oldest-unused first (:mod:`worker.pruning.pruner`), until the disk is below
``PULLER_DISK_LOW_WATER`` (by default 10 points under the high mark).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from contract import PullFailed
from worker.pruning.pruner import (
    DEFAULT_MIN_IDLE,
    KeepListError,
    PruneOutcome,
    Pruner,
    PruneRule,
    Usage,
    read_keep_file,
)
from worker.stores.contract import DiskUsage, PrunableStore

log = structlog.get_logger("worker.pruning")

DEFAULT_LOW_WATER_MARGIN = 10.0
"""Percentage points under the high-water mark the automatic mode prunes down to."""


class DiskUnreadable(Exception):
    """The engine's data disk cannot be read from here; the message says what to set."""


def disk_usage(path: str | Path) -> DiskUsage:
    """The file system holding ``path``; raises :class:`DiskUnreadable`."""
    try:
        total, used, free = shutil.disk_usage(path)
    except OSError as error:
        raise DiskUnreadable(f"cannot read the disk of {path}: {error.strerror}") from None
    return DiskUsage(str(path), total, used, free)


def engine_disk(
    store: PrunableStore, data_root: Path | None, setting: str = "PULLER_DOCKER_DATA_ROOT"
) -> DiskUsage:
    """The disk of the engine's data: ``data_root`` (the path as this worker sees it, from
    ``setting``) or else the engine's own ``DockerRootDir``, which is only right when the
    worker sees the same file system there (no container, or that path mounted)."""
    if data_root is not None:
        try:
            return disk_usage(data_root)
        except DiskUnreadable as error:
            raise DiskUnreadable(f"{setting}: {error}") from None
    try:
        path = store.data_root()
    except PullFailed as failure:
        raise DiskUnreadable(f"cannot ask the engine for its data root: {failure}") from None
    if not path:
        raise DiskUnreadable("the engine does not say where its data root is")
    try:
        return disk_usage(path)
    except DiskUnreadable as error:
        raise DiskUnreadable(
            f"{error} (the engine's DockerRootDir, not visible to this worker): mount it "
            "into the worker, or set PULLER_DOCKER_DATA_ROOT to where this worker sees it"
        ) from None


class DiskWatch:
    """The automatic mode: :meth:`check` prunes when the disk is at or over ``high_water``
    percent, oldest-unused first, until it is under ``low_water``."""

    def __init__(
        self,
        pruner: Pruner,
        read_disk: Callable[[], DiskUsage],
        high_water: float,
        low_water: float | None = None,
        keep_file: Path | None = None,
        min_idle: float = DEFAULT_MIN_IDLE,
        on_disk: Callable[[DiskUsage], None] | None = None,
    ) -> None:
        self._pruner = pruner
        self._read_disk = read_disk
        self.high_water = high_water
        self.low_water = (
            max(0.0, high_water - DEFAULT_LOW_WATER_MARGIN) if low_water is None else low_water
        )
        self._keep_file = keep_file
        self._min_idle = min_idle
        self._on_disk = on_disk
        self._problem: str | None = None

    def check(self) -> PruneOutcome | None:
        """Reads the disk; prunes when it is over the mark. ``None``: nothing to do, or the
        disk or keep list cannot be read (logged, once while the reason stays the same)."""
        try:
            disk = self._read_disk()
        except DiskUnreadable as error:
            self._report(f"the disk high-water mark is not checked: {error}")
            return None
        self._report(None)
        if self._on_disk is not None:
            self._on_disk(disk)
        if disk.used_percent < self.high_water:
            return None
        try:
            keep = read_keep_file(self._keep_file) if self._keep_file is not None else ()
        except KeepListError as error:  # never prune without the keep list it was given
            self._report(f"not pruning: PULLER_PRUNE_KEEP_FILE: {error}")
            return None
        log.warning(
            "the engine's disk is over the high-water mark; removing unused images",
            used_percent=round(disk.used_percent, 1),
            high_water=self.high_water,
            low_water=self.low_water,
            path=disk.path,
        )
        rule = PruneRule(keep=keep, min_idle=self._min_idle)
        try:
            outcome = self._pruner.prune(rule, enough=self._under_low_water)
        except PullFailed as failure:
            log.warning("cannot prune: the engine cannot list its images", error=str(failure))
            return None
        with contextlib.suppress(DiskUnreadable):
            after = self._read_disk()
            if self._on_disk is not None:
                self._on_disk(after)
            log.info(
                "disk after pruning",
                used_percent=round(after.used_percent, 1),
                under_low_water=after.used_percent < self.low_water,
            )
        return outcome

    def _under_low_water(self, _freed: int) -> bool:
        try:
            return self._read_disk().used_percent < self.low_water
        except DiskUnreadable:
            return True  # cannot tell: stop rather than remove blindly

    def _report(self, problem: str | None) -> None:
        if problem is not None and problem != self._problem:
            log.warning(problem)
        self._problem = problem


class Housekeeping:
    """The worker's thread for pruning's bookkeeping: at start it notes the images the engine
    holds (their age counts from then), then writes the usage log when due and, with a
    :class:`DiskWatch`, checks the disk every ``interval`` seconds."""

    def __init__(
        self,
        usage: Usage,
        pruner: Pruner | None,
        watch: DiskWatch | None,
        interval: float,
        flush_interval: float = 30.0,
    ) -> None:
        self._usage = usage
        self._pruner = pruner
        self._watch = watch
        self._interval = interval
        self._tick = min(interval, flush_interval)
        self._flush_interval = flush_interval
        self._problem: str | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the thread (a pass under way ends first, up to ``timeout``) and writes the
        usage log."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._usage.flush()

    def _run(self) -> None:
        noted = self._pruner is None
        last_check = last_flush = float("-inf")
        while not self._stopping.is_set():
            now = time.monotonic()
            if not noted and self._pruner is not None:
                noted = self._step(self._pruner.note_images)
            if self._watch is not None and now - last_check >= self._interval:
                last_check = now
                self._step(self._watch.check)
            if now - last_flush >= self._flush_interval:
                last_flush = now
                self._step(self._usage.flush)
            self._stopping.wait(self._tick)

    def _step(self, work: Callable[[], object]) -> bool:
        """Runs ``work``; ``False`` when it failed (logged once while the reason stays)."""
        try:
            work()
        except PullFailed as failure:
            if str(failure) != self._problem:
                log.info("housekeeping: the engine is not reachable", error=str(failure))
            self._problem = str(failure)
            return False
        except Exception:  # a bug must not end the thread, nor the worker
            log.exception("housekeeping failed; trying again later")
            return False
        self._problem = None
        return True
