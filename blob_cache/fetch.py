"""Blob fetches from upstream: one per blob however many clients ask, each client following
the file as it is written; and the pass-through stream for a blob there is no room for.

No client ever gets a blob's last byte before its digest was checked: a follower stays
:data:`HOLD_BACK` bytes behind the fetch until the blob is verified and kept, and a
pass-through stream holds its last chunk until the digest matched. A blob that fails its
digest ends in an error raised mid-stream, which the HTTP server turns into a cut
connection: the client sees a short body, never a whole one.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import requests
import structlog

from blob_cache.metrics import CacheMetrics, Outcome
from blob_cache.routes import Blob
from blob_cache.store import KeptFile, NoRoom, Store
from blob_cache.upstream import Upstream, UpstreamUnreachable, content_length

log = structlog.get_logger("blob_cache.fetch")

CHUNK = 64 * 1024
HOLD_BACK = 1
"""Bytes a follower stays behind an unverified fetch."""
WAKE = 5.0
"""Seconds a follower waits for the fetch before checking whether its client left."""


class BlobCut(OSError):
    """A blob stream that must end before its last byte (raised mid-stream: the server then
    closes the connection without completing the response)."""


class FetchState(StrEnum):
    STARTING = "starting"
    STREAMING = "streaming"
    KEPT = "kept"
    NO_ROOM = "no_room"
    FAILED = "failed"


class Fetch:
    """One blob being fetched into ``partial``; followers wait on ``changed``."""

    def __init__(self, digest: str, partial: Path) -> None:
        self.digest = digest
        self.partial = partial
        self.file: BinaryIO = partial.open("xb")
        self.size: int | None = None
        self.written = 0
        self.state = FetchState.STARTING
        self.reason = ""
        self.token: int | None = None
        """The room :class:`Store` reserved for it."""
        self.changed = threading.Condition()

    def update(self, **changes: object) -> None:
        with self.changed:
            for name, value in changes.items():
                setattr(self, name, value)
            self.changed.notify_all()


class Fetches:
    """The fetches under way, by digest."""

    def __init__(self, store: Store, upstream: Upstream, metrics: CacheMetrics) -> None:
        self._store = store
        self._upstream = upstream
        self._metrics = metrics
        self._lock = threading.Lock()
        self._running: dict[str, Fetch] = {}

    def open(
        self, blob: Blob, authorization: str | None, size_hint: int | None
    ) -> KeptFile | Follower | None:
        """``blob`` kept (open, pinned), or a follower of its fetch (started now if none
        is under way, with the client's ``authorization``), or ``None`` when there is no
        room to keep it (``size_hint``, the upstream's HEAD size, does not fit, or no file
        can be made)."""
        served = self._metrics.served_bytes.inc
        with self._lock:
            kept = self._store.open_kept(blob.digest, served)
            if kept is not None:
                return kept
            fetch = self._running.get(blob.digest)
            if fetch is None:
                if size_hint is not None and not self._store.could_fit(size_hint):
                    return None
                try:
                    fetch = Fetch(blob.digest, self._store.new_partial())
                except OSError as error:  # not even an empty file fits
                    log.warning("cannot start a fetch", digest=blob.digest, reason=str(error))
                    return None
                self._running[blob.digest] = fetch
                threading.Thread(
                    target=self._run,
                    args=(fetch, blob, authorization, size_hint),
                    name="blob-fetch",
                    daemon=True,
                ).start()
            self._store.pin(blob.digest)
            reader = fetch.partial.open("rb", buffering=0)
        return Follower(fetch, reader, served, lambda: self._store.unpin(blob.digest))

    def _run(self, fetch: Fetch, blob: Blob, authorization: str | None, hint: int | None) -> None:
        kept = False
        try:
            self._download(fetch, blob, authorization, hint)
            with self._lock:
                self._store.keep(fetch.token, fetch.partial, blob.digest, fetch.written)
                self._running.pop(blob.digest, None)
            kept = True
            self._metrics.upstream_fetches.labels("kept").inc()
            fetch.update(state=FetchState.KEPT)
        except NoRoom as why:
            log.warning(
                "no room to keep a blob; passing it through", digest=blob.digest, why=str(why)
            )
            fetch.update(state=FetchState.NO_ROOM, reason=str(why))
        except (UpstreamUnreachable, requests.RequestException, OSError, ValueError) as error:
            reason = str(error) or type(error).__name__
            log.warning("blob fetch failed", digest=blob.digest, reason=reason)
            self._metrics.upstream_fetches.labels("failed").inc()
            fetch.update(state=FetchState.FAILED, reason=reason)
        except Exception:  # a bug: its followers must not wait for ever
            log.exception("blob fetch failed", digest=blob.digest)
            self._metrics.upstream_fetches.labels("failed").inc()
            fetch.update(state=FetchState.FAILED, reason="internal error")
        finally:
            if not kept:
                with self._lock:
                    if self._running.get(blob.digest) is fetch:
                        del self._running[blob.digest]
                fetch.file.close()
                fetch.partial.unlink(missing_ok=True)
                self._store.release(fetch.token)

    def _download(
        self, fetch: Fetch, blob: Blob, authorization: str | None, hint: int | None
    ) -> None:
        """Writes ``blob`` from upstream into the fetch's file, room reserved first, and
        checks it: its length, its digest; synced to the disk."""
        hasher = hashlib.new(blob.algorithm)
        with self._upstream.open_blob(blob, authorization) as response:
            if response.status_code != 200:
                raise UpstreamUnreachable(f"the upstream answered {response.status_code}")
            size = content_length(response)
            size = hint if size is None else size
            fetch.token = self._store.reserve(size or 0, fetch.file)
            fetch.update(size=size, state=FetchState.STREAMING)
            for chunk in response.iter_content(CHUNK):
                fetch.file.write(chunk)
                fetch.file.flush()
                hasher.update(chunk)
                self._metrics.upstream_bytes.inc(len(chunk))
                fetch.update(written=fetch.written + len(chunk))
        if size is not None and fetch.written != size:
            raise UpstreamUnreachable(f"the upstream sent {fetch.written} of {size} bytes")
        if f"{blob.algorithm}:{hasher.hexdigest()}" != blob.digest:
            self._metrics.digest_mismatches.inc()
            raise UpstreamUnreachable("the blob from upstream does not match its digest")
        os.fsync(fetch.file.fileno())
        fetch.file.close()


class Follower:
    """A client's stream of a blob being fetched: the fetch's file as it grows, never past
    ``written - HOLD_BACK`` until the blob is verified and kept. An iterator of chunks
    (WSGI); ``close`` unpins the blob."""

    def __init__(
        self,
        fetch: Fetch,
        reader: BinaryIO,
        on_read: Callable[[int], None],
        on_close: Callable[[], None],
    ) -> None:
        self.fetch = fetch
        self._reader = reader
        self._on_read = on_read
        self._on_close: Callable[[], None] | None = on_close
        self.offset = 0
        self.client_gone: Callable[[], bool] = lambda: False
        self.on_end: Callable[[Outcome], None] = lambda _outcome: None

    def wait_started(self) -> FetchState:
        """Waits until the fetch streams, or ended; its state then."""
        fetch = self.fetch
        with fetch.changed:
            while fetch.state is FetchState.STARTING:
                fetch.changed.wait(WAKE)
            return fetch.state

    def wait_kept(self) -> FetchState:
        fetch = self.fetch
        with fetch.changed:
            while fetch.state in (FetchState.STARTING, FetchState.STREAMING):
                fetch.changed.wait(WAKE)
            return fetch.state

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        fetch = self.fetch
        while True:
            with fetch.changed:
                state, written = fetch.state, fetch.written
                limit = written if state is FetchState.KEPT else written - HOLD_BACK
                waiting = self.offset >= limit and state in (
                    FetchState.STARTING,
                    FetchState.STREAMING,
                )
                if waiting:
                    fetch.changed.wait(WAKE)
            if waiting:
                if self.client_gone():
                    self._end(Outcome.CUT)
                    raise BlobCut("the client went away")
                continue
            if state in (FetchState.FAILED, FetchState.NO_ROOM):
                self._end(Outcome.CUT)
                raise BlobCut(f"blob fetch failed: {fetch.reason}")
            if self.offset < limit:
                data = self._reader.read(min(CHUNK, limit - self.offset))
                if not data:
                    self._end(Outcome.CUT)
                    raise BlobCut("the fetched file is shorter than written")
                self.offset += len(data)
                self._on_read(len(data))
                return data
            self._end(Outcome.FETCHED)  # kept, and every byte sent
            raise StopIteration

    def _end(self, outcome: Outcome) -> None:
        end, self.on_end = self.on_end, lambda _outcome: None
        end(outcome)

    def close(self) -> None:
        self._reader.close()
        release, self._on_close = self._on_close, None
        if release is not None:
            release()
            self._end(Outcome.CUT)  # no-op when the stream already ended


class PassThrough:
    """A blob streamed from upstream to one client without keeping it: the last chunk is held
    until the digest matched. An iterator of chunks (WSGI)."""

    def __init__(
        self,
        blob: Blob,
        response: requests.Response,
        metrics: CacheMetrics,
        on_end: Callable[[Outcome], None],
    ) -> None:
        self._digest = blob.digest
        self._hasher = hashlib.new(blob.algorithm)
        self._response = response
        self._metrics = metrics
        self._on_end: Callable[[Outcome], None] | None = on_end
        self._chunks = response.iter_content(CHUNK)
        self._held: bytes | None = None
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        try:
            while True:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._hasher.update(chunk)
                self._metrics.upstream_bytes.inc(len(chunk))
                held, self._held = self._held, chunk
                if held:
                    return self._sent(held)
        except (requests.RequestException, OSError) as error:
            self._finish(Outcome.CUT, "failed")
            raise BlobCut(f"upstream: {type(error).__name__}") from None
        if f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}" != self._digest:
            self._metrics.digest_mismatches.inc()
            self._finish(Outcome.CUT, "failed")
            raise BlobCut("the blob from upstream does not match its digest")
        self._done = True
        self._finish(Outcome.PASSED_THROUGH, "passed_through")
        held, self._held = self._held, None
        if held:
            return self._sent(held)
        raise StopIteration

    def _sent(self, data: bytes) -> bytes:
        self._metrics.served_bytes.inc(len(data))
        return data

    def _finish(self, outcome: Outcome, fetch_result: str) -> None:
        end, self._on_end = self._on_end, None
        if end is not None:
            self._metrics.upstream_fetches.labels(fetch_result).inc()
            end(outcome)

    def close(self) -> None:
        self._response.close()
        if self._on_end is not None:
            self._finish(Outcome.CUT, "failed")
