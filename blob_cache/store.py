"""The blobs kept under ``--dir``: which are there, which are in use, and eviction.

``DIR/blobs/ALGORITHM-HEX`` holds verified blobs only: a fetch writes
``DIR/partial/...`` and renames it there once its digest matched (after an fsync, so a
kept name never points at bytes a crash lost). Kept blobs are evicted least recently
used first when a new blob needs room, under ``max_bytes`` and the disk's free space
alike; a blob that is pinned (being served, or being followed as it is fetched) is never
evicted.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import structlog

from blob_cache.metrics import CacheMetrics, Outcome
from blob_cache.routes import valid_digest

log = structlog.get_logger("blob_cache.store")

DISK_MARGIN = 1 << 20
"""Bytes left free on the disk beyond every blob written there."""


class NoRoom(Exception):
    """A blob cannot be kept: it does not fit, even after evicting every blob not in use."""


class Store:
    """The kept blobs, the room reserved for fetches under way, and the pins."""

    def __init__(self, directory: Path, max_bytes: int, metrics: CacheMetrics) -> None:
        self.blobs = directory / "blobs"
        self.partials = directory / "partial"
        self.max_bytes = max_bytes
        self._metrics = metrics
        self.blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partials, ignore_errors=True)  # a stopped process's fetches
        self.partials.mkdir(parents=True)
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._pins: Counter[str] = Counter()
        self._reserved: dict[int, int] = {}
        self._tokens = itertools.count()
        metrics.limit_bytes.set(max_bytes)
        self._load()

    def path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")

    def new_partial(self) -> Path:
        return self.partials / f"fetch-{next(self._tokens)}"

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(self._kept.values())

    def kept(self, digest: str) -> int | None:
        """The size of ``digest`` if it is kept."""
        with self._lock:
            return self._kept.get(digest)

    def open_kept(self, digest: str, on_read: Callable[[int], None]) -> KeptFile | None:
        """``digest``'s kept file, open and pinned until the returned file is closed; ``None``
        if it is not kept. Marks it the most recently used."""
        with self._lock:
            size = self._kept.get(digest)
            if size is None:
                return None
            try:
                file = self.path(digest).open("rb")
            except FileNotFoundError:
                self._forget(digest)
                return None
            self._kept.move_to_end(digest)
            self._pins[digest] += 1
        with contextlib.suppress(OSError):
            os.utime(file.fileno())  # the order survives a restart
        return KeptFile(file, size, on_read, lambda: self.unpin(digest))

    def pin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] += 1

    def unpin(self, digest: str) -> None:
        with self._lock:
            self._pins[digest] -= 1
            if self._pins[digest] <= 0:
                del self._pins[digest]

    def reserve(self, size: int, file: BinaryIO) -> int:
        """Makes room for ``size`` bytes and allocates them to ``file`` (so that writing them
        cannot fail for want of space); returns a token for :meth:`keep` or :meth:`release`.
        Raises :class:`NoRoom`."""
        with self._lock:
            if size > self.max_bytes:
                raise NoRoom(f"a blob of {size:,} bytes is larger than --max-bytes")
            if not self._fits(size):
                raise NoRoom(
                    f"no room for {size:,} bytes: the kept blobs that could go are in use "
                    f"({sum(self._kept.values()):,} bytes kept, limit {self.max_bytes:,}, "
                    f"{shutil.disk_usage(self.blobs).free:,} bytes free on the disk)"
                )
            while sum(self._kept.values()) + sum(self._reserved.values()) + size > self.max_bytes:
                self._evict_one(size)
            while shutil.disk_usage(self.blobs).free < size + DISK_MARGIN:
                self._evict_one(size)
            if size:
                self._allocate(file, size)
            token = next(self._tokens)
            self._reserved[token] = size
            return token

    def could_fit(self, size: int) -> bool:
        """Whether :meth:`reserve` could make room for ``size`` bytes now, evicting every
        blob not in use if need be."""
        with self._lock:
            return self._fits(size)

    def _fits(self, size: int) -> bool:
        """Whether evicting every blob not in use would make room for ``size`` (lock held)."""
        evictable = sum(n for digest, n in self._kept.items() if digest not in self._pins)
        used = sum(self._kept.values()) + sum(self._reserved.values())
        free = shutil.disk_usage(self.blobs).free
        return used - evictable + size <= self.max_bytes and free + evictable >= size + DISK_MARGIN

    def release(self, token: int | None) -> None:
        if token is not None:
            with self._lock:
                self._reserved.pop(token, None)

    def keep(self, token: int | None, partial: Path, digest: str, size: int) -> None:
        """Renames the verified ``partial`` to ``digest``'s kept name."""
        with self._lock:
            partial.replace(self.path(digest))
            if token is not None:
                self._reserved.pop(token, None)
            self._kept[digest] = size
            self._kept.move_to_end(digest)
            self._update_gauges()
            # A blob of unknown size had no room reserved: evict down to the limit now.
            while sum(self._kept.values()) > self.max_bytes and self._evictable():
                self._evict_one(0)

    def _evictable(self) -> bool:
        return any(digest not in self._pins for digest in self._kept)

    def _allocate(self, file: BinaryIO, size: int) -> None:
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise NoRoom(f"no room on the disk for {size:,} bytes") from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # A file system without fallocate: the free-space check above has to do.

    def _evict_one(self, size: int) -> None:
        """Removes the least recently used blob that is not pinned (lock held)."""
        victim = next((digest for digest in self._kept if digest not in self._pins), None)
        if victim is None:  # another program took the disk's room meanwhile
            raise NoRoom(f"no room for {size:,} bytes on the disk")
        evicted = self._kept[victim]
        self.path(victim).unlink(missing_ok=True)
        self._forget(victim)
        self._metrics.evictions.inc()
        self._metrics.evicted_bytes.inc(evicted)
        log.info("blob evicted", digest=victim, size=evicted)

    def _forget(self, digest: str) -> None:
        self._kept.pop(digest, None)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.kept_bytes.set(sum(self._kept.values()))
        self._metrics.kept_blobs.set(len(self._kept))

    def _load(self) -> None:
        """Indexes the blobs a previous process kept, oldest use first, and evicts down to
        ``max_bytes``."""
        found: list[tuple[float, str, int]] = []
        for path in self.blobs.iterdir():
            digest = path.name.replace("-", ":", 1)
            if not valid_digest(digest) or not path.is_file():
                log.warning("not a kept blob; left alone", path=str(path))
                continue
            stat = path.stat()
            found.append((stat.st_mtime, digest, stat.st_size))
        with self._lock:
            for _, digest, size in sorted(found):
                self._kept[digest] = size
            self._update_gauges()
            while sum(self._kept.values()) > self.max_bytes:
                self._evict_one(0)


class KeptFile:
    """A kept blob open for reading, as ``wsgi.file_wrapper`` takes it: ``read``, ``seek``,
    ``tell``; ``close`` unpins it (once). ``on_read`` is told how many bytes each read
    returned; ``on_end`` once whether every byte was read (``kept``) or not (``cut``)."""

    def __init__(
        self,
        file: BinaryIO,
        size: int,
        on_read: Callable[[int], None],
        on_close: Callable[[], None],
    ) -> None:
        self._file = file
        self.size = size
        self._on_read = on_read
        self._on_close: Callable[[], None] | None = on_close
        self.on_end: Callable[[Outcome], None] | None = None
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._on_read(len(data))
        self._read += len(data)
        if self._read >= self.size:
            self._end(Outcome.KEPT)  # counted before the last bytes are sent
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def _end(self, outcome: Outcome) -> None:
        end, self.on_end = self.on_end, None
        if end is not None:
            end(outcome)

    def close(self) -> None:
        self._file.close()
        self._end(Outcome.KEPT if self._read >= self.size else Outcome.CUT)
        release, self._on_close = self._on_close, None
        if release is not None:
            release()
