"""puller's pull-through blob cache: each blob crosses the uplink once, however many nodes
ask for it at the same moment.

Why not only Debian's ``docker-registry`` in proxy mode: on a miss, distribution 2.8 fetches
a blob from upstream twice (once to store, once to answer), and once more for every
request that arrives while it is fetching, so K nodes pulling at once cost about K + 1
times the image across the uplink (``bench/uplink.py`` measures it). This cache fetches a
blob once and streams the file it is writing to every client that asks, as it grows.

It serves one upstream registry (``--upstream``), as an engine pulls
``CACHE/PATH@DIGEST``:

- ``/v2/`` and manifests: forwarded to the upstream with the client's ``Authorization``
  and ``Accept`` headers, answers (login challenges included) passed back; not stored. An
  engine pulling through it logs in to the upstream's token service itself, with the
  login the worker gives it (see :mod:`worker.pull_through`), so this cache holds no
  credentials.
- blobs (``/v2/NAME/blobs/DIGEST``): each request is first authorised by a ``HEAD`` of
  the same blob upstream with the client's ``Authorization`` (a few hundred bytes), so a
  client sees only what the upstream would show it; then served from the cache's
  directory, fetched once (redirects followed), its sha256 checked before it is kept.

Blobs are kept until the directory is removed (an ``emptyDir`` of bounded size in a
cluster); nothing is evicted.

    python -m worker.blob_cache --upstream http://registry:5000 --listen 0.0.0.0:5001 --dir /cache
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import requests

CHUNK = 256 * 1024
BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[a-f0-9]{64})$")
PASSED_HEADERS = ("Content-Type", "Docker-Content-Digest", "WWW-Authenticate", "Location")
UPSTREAM_TIMEOUT = (10.0, 120.0)


class _Fetch:
    """One blob being fetched from upstream into ``partial``; readers follow the file as it
    grows."""

    def __init__(self, partial: Path) -> None:
        self.partial = partial
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.failed: str | None = None
        self.changed = threading.Condition()

    def wait_started(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.size is not None or self.failed is not None, timeout)


class BlobCache:
    """The cache's state: where blobs are kept, and the fetches under way."""

    def __init__(self, upstream: str, directory: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.directory = directory
        self.blobs = directory / "blobs"
        self.partials = directory / "partial"
        self.blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.partials, ignore_errors=True)
        self.partials.mkdir(parents=True)
        self._lock = threading.Lock()
        self._fetches: dict[str, _Fetch] = {}
        self.upstream_fetches = 0

    def path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")

    def fetch(self, name: str, digest: str, authorization: str | None) -> _Fetch | None:
        """The fetch under way for ``digest``, started now if none is; ``None`` when the
        blob is already kept."""
        with self._lock:
            if self.path(digest).exists():
                return None
            fetch = self._fetches.get(digest)
            if fetch is None:
                fetch = _Fetch(self.partials / digest.replace(":", "-"))
                self._fetches[digest] = fetch
                self.upstream_fetches += 1
                threading.Thread(
                    target=self._fetch,
                    args=(fetch, name, digest, authorization),
                    name="blob-fetch",
                    daemon=True,
                ).start()
            return fetch

    def _fetch(self, fetch: _Fetch, name: str, digest: str, authorization: str | None) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        hasher = hashlib.sha256()
        try:
            with (
                requests.get(
                    f"{self.upstream}/v2/{name}/blobs/{digest}",
                    headers=headers,
                    stream=True,
                    timeout=UPSTREAM_TIMEOUT,
                ) as response,
                fetch.partial.open("wb") as out,
            ):
                if response.status_code != 200:
                    raise OSError(f"upstream answered {response.status_code}")
                with fetch.changed:
                    fetch.size = int(response.headers.get("Content-Length", "-1"))
                    fetch.changed.notify_all()
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    out.flush()
                    hasher.update(chunk)
                    with fetch.changed:
                        fetch.written += len(chunk)
                        fetch.changed.notify_all()
            if f"sha256:{hasher.hexdigest()}" != digest:
                raise OSError("the blob's content does not match its digest")
            fetch.partial.replace(self.path(digest))
            with fetch.changed:
                fetch.done = True
                fetch.changed.notify_all()
        except (OSError, requests.RequestException, ValueError) as error:
            with fetch.changed:
                fetch.failed = str(error) or type(error).__name__
                fetch.changed.notify_all()
        finally:
            with self._lock:
                self._fetches.pop(digest, None)
            if not fetch.done:
                fetch.partial.unlink(missing_ok=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        try:
            matched = BLOB_PATH.match(self.path.split("?", 1)[0])
            if matched is None:
                self._forward(head)
            else:
                self._blob(matched["name"], matched["digest"], head)
        except (requests.RequestException, OSError) as error:
            with contextlib.suppress(OSError):
                self._answer(502, {}, f"upstream: {type(error).__name__}\n".encode(), head)

    def _upstream_headers(self) -> dict[str, str]:
        return {
            key: value
            for key in ("Authorization", "Accept")
            if (value := self.headers.get(key)) is not None
        }

    def _forward(self, head: bool) -> None:
        """Passes the request to the upstream and its answer back."""
        cache = self.server.cache
        response = requests.request(
            "HEAD" if head else "GET",
            cache.upstream + self.path,
            headers=self._upstream_headers(),
            timeout=UPSTREAM_TIMEOUT,
        )
        headers = {k: v for k in PASSED_HEADERS if (v := response.headers.get(k)) is not None}
        if head and "Content-Length" in response.headers:
            headers["Content-Length"] = response.headers["Content-Length"]
        self._answer(response.status_code, headers, response.content, head)

    def _blob(self, name: str, digest: str, head: bool) -> None:
        cache = self.server.cache
        allowed = requests.head(
            f"{cache.upstream}/v2/{name}/blobs/{digest}",
            headers=self._upstream_headers(),
            timeout=UPSTREAM_TIMEOUT,
            allow_redirects=False,
        )
        if not 200 <= allowed.status_code < 400:
            headers = {k: v for k in PASSED_HEADERS if (v := allowed.headers.get(k)) is not None}
            self._answer(allowed.status_code, headers, b"", head)
            return
        fetch = cache.fetch(name, digest, self.headers.get("Authorization"))
        if fetch is None:
            self._kept(digest, head)
            return
        fetch.wait_started(UPSTREAM_TIMEOUT[1])
        if fetch.failed is not None or fetch.size is None or fetch.size < 0:
            if fetch.done or cache.path(digest).exists():
                self._kept(digest, head)
                return
            self._answer(502, {}, f"upstream: {fetch.failed}\n".encode(), head)
            return
        self._start_blob(digest, fetch.size)
        if not head:
            self._follow(fetch, digest)

    def _kept(self, digest: str, head: bool) -> None:
        path = self.server.cache.path(digest)
        self._start_blob(digest, path.stat().st_size)
        if not head:
            with path.open("rb") as blob:
                shutil.copyfileobj(blob, self.wfile, CHUNK)

    def _start_blob(self, digest: str, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("Docker-Content-Digest", digest)
        self.end_headers()

    def _follow(self, fetch: _Fetch, digest: str) -> None:
        """Sends the blob as the fetch writes it; cuts the connection if the fetch fails."""
        sent = 0
        for chunk in _growing(fetch, self.server.cache.path(digest)):
            self.wfile.write(chunk)
            sent += len(chunk)
        if fetch.size is not None and sent < fetch.size:
            self.close_connection = True  # the client sees a short blob and retries

    def _answer(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key != "Content-Length":
                self.send_header(key, value)
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _moved(fetch: _Fetch, offset: int) -> bool:
    return fetch.written > offset or fetch.done or fetch.failed is not None


def _growing(fetch: _Fetch, kept: Path) -> Iterator[bytes]:
    """The blob's bytes as ``fetch`` writes them (from the file it is writing, or the kept
    file once it is done); ends early if the fetch fails."""
    offset = 0
    while True:
        with fetch.changed:
            fetch.changed.wait_for(partial(_moved, fetch, offset), 30)
            done, failed, written = fetch.done, fetch.failed, fetch.written
        if failed is not None:
            return
        path = kept if done else fetch.partial
        try:
            with path.open("rb") as blob:
                blob.seek(offset)
                while offset < written or done:
                    chunk = blob.read(CHUNK)
                    if not chunk:
                        break
                    offset += len(chunk)
                    yield chunk
        except FileNotFoundError:
            continue  # renamed or removed between the check and the open: look again
        if done:
            return


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], cache: BlobCache, verbose: bool) -> None:
        self.cache = cache
        self.verbose = verbose
        super().__init__(address, _Handler)


def serve(upstream: str, listen: str, directory: Path, verbose: bool = False) -> _Server:
    """Starts the cache on ``listen`` (``HOST:PORT``) in a thread; returns its server (call
    ``shutdown()`` to stop it)."""
    host, _, port = listen.rpartition(":")
    server = _Server((host or "0.0.0.0", int(port)), BlobCache(upstream, directory), verbose)
    threading.Thread(target=server.serve_forever, name="blob-cache", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the registry's URL (http[s]://...)")
    parser.add_argument("--listen", default="0.0.0.0:5001", help="HOST:PORT")
    parser.add_argument("--dir", required=True, type=Path, help="where blobs are kept")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = serve(args.upstream, args.listen, args.dir, args.verbose)
    print(f"blob cache for {args.upstream} on {args.listen}, blobs in {args.dir}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
