"""The cache's HTTP side: a WSGI application on puller's hardened HTTP server
(``serving.wsgi_server``, the one module that imports waitress; docs/http-servers.md).

That server gives the cache what it gives the gateway: strict request framing (400 and a
close for what a proxy could frame differently), a deadline for a request's head (408), a
bound on the bytes of unfinished requests, ``poll()`` (no limit of 1,024 descriptors), the
oldest idle connection closed for each new one at the limit, a connection that opens with a
TLS handshake closed at once. An idle connection is closed after the idle timeout; one whose
client leaves sent data unacknowledged that long is cut by the kernel (``TCP_USER_TIMEOUT``),
which frees the thread streaming to it. Kept blobs are sent from their files without a
thread (``wsgi.file_wrapper``); a blob followed as it is fetched holds a thread, hence as
many threads as connections. At most :data:`OUTBUF_HIGH_WATERMARK` bytes are buffered for a
client before its stream waits, never in a temporary file: the process writes only under
``--dir``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from blob_cache.fetch import CHUNK, Fetches, FetchState, Follower, PassThrough
from blob_cache.metrics import CacheMetrics, Outcome
from blob_cache.routes import Alive, Blob, Manifest, Metrics, Ping, Refused, parse_target
from blob_cache.store import KeptFile, Store
from blob_cache.upstream import (
    Answer,
    AuthMemory,
    Upstream,
    UpstreamUnreachable,
    content_length,
)
from contract import puller_version
from serving.wsgi_server import WsgiServer, status_line, usable_connections

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = structlog.get_logger("blob_cache.server")

ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN", 429: "TOOMANYREQUESTS"}
OUTBUF_HIGH_WATERMARK = 256 * 1024
"""Bytes held for one connection before the thread streaming to it waits."""
MAX_HEADER_BYTES = 64 * 1024
"""A request's line and headers (a registry token can be long); more is answered 431."""
HELD_ALLOWANCE = 16 * 1024
"""Bytes of each request's head not counted against :data:`MAX_HELD_BYTES`."""
MAX_HELD_BYTES = 8 * 2**20
"""Bytes of unfinished requests beyond their allowance, over all connections (past it, 503)."""
FILES_PER_CONNECTION = 2
"""A connection's socket, and the blob file it reads."""


@dataclass(frozen=True)
class CacheSettings:
    upstream: str
    directory: Path
    host: str = "127.0.0.1"
    port: int = 5001
    max_bytes: int = 10 * 1000**3
    idle_timeout: int = 30
    request_timeout: int = 30
    max_connections: int = 128


class BlobCacheApp:
    """The WSGI application: routes a request, authorises blobs upstream, serves them."""

    def __init__(self, settings: CacheSettings, metrics: CacheMetrics) -> None:
        self.metrics = metrics
        self.upstream = Upstream(settings.upstream)
        self.store = Store(settings.directory, settings.max_bytes, metrics)
        self.fetches = Fetches(self.store, self.upstream, metrics)
        self.memory = AuthMemory()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        head = method == "HEAD"
        route = parse_target(environ.get("REQUEST_URI", ""))
        if isinstance(route, Refused):
            self.metrics.count(Outcome.REFUSED)
            return _error(start_response, route.status, route.code, route.message, head)
        if method not in ("GET", "HEAD"):
            self.metrics.count(Outcome.REFUSED)
            return _error(
                start_response,
                405,
                "UNSUPPORTED",
                "the cache serves GET and HEAD only",
                head,
                [("Allow", "GET, HEAD")],
            )
        if isinstance(route, Alive):
            self.metrics.count(Outcome.OWN)
            return self._alive(start_response, head)
        if isinstance(route, Metrics):
            self.metrics.count(Outcome.OWN)
            body = self.metrics.text()
            return _respond(
                start_response, 200, [("Content-Type", CONTENT_TYPE_LATEST)], body, head
            )
        if isinstance(route, Blob):
            return self._blob(environ, start_response, route, head)
        return self._forward(environ, start_response, route, method)

    def _alive(self, start_response: StartResponse, head: bool) -> list[bytes]:
        body = json.dumps(
            {
                "status": "serving",
                "version": puller_version(),
                "upstream": self.upstream.base,
                "kept_bytes": self.store.kept_bytes,
                "limit_bytes": self.store.max_bytes,
            }
        ).encode()
        return _respond(start_response, 200, [("Content-Type", "application/json")], body, head)

    def _forward(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        route: Ping | Manifest,
        method: str,
    ) -> list[bytes]:
        headers = {
            name: value
            for name, key in (("Authorization", "HTTP_AUTHORIZATION"), ("Accept", "HTTP_ACCEPT"))
            if (value := environ.get(key)) is not None
        }
        try:
            answer = self.upstream.forward(method, route, headers)
        except UpstreamUnreachable as error:
            return self._unavailable(start_response, str(error), method == "HEAD")
        self.metrics.count(Outcome.FORWARDED)
        passed = [(k, v) for k, v in answer.headers.items() if k != "Content-Length"]
        length = answer.headers.get("Content-Length", "0") if method == "HEAD" else None
        return _respond(
            start_response, answer.status, passed, answer.body, method == "HEAD", length
        )

    def _blob(
        self, environ: WSGIEnvironment, start_response: StartResponse, blob: Blob, head: bool
    ) -> Iterable[bytes]:
        authorization: str | None = environ.get("HTTP_AUTHORIZATION")
        answer: Answer | None
        try:
            answer = self.upstream.check_blob(blob, authorization)
        except UpstreamUnreachable as error:
            answer, why = None, str(error)
        if answer is not None and answer.status < 500:
            if not 200 <= answer.status < 400:
                self.memory.forget(authorization, blob.name, blob.digest)
                self.metrics.count(Outcome.DENIED)
                challenge = [(k, v) for k, v in answer.headers.items() if k == "WWW-Authenticate"]
                code = ERROR_CODES.get(answer.status, "DENIED")
                return _error(
                    start_response, answer.status, code, "the upstream refused", head, challenge
                )
            self.memory.remember(authorization, blob.name, blob.digest)
            length = answer.headers.get("Content-Length", "")
            hint = int(length) if answer.status == 200 and length.isdigit() else None
            return self._serve_blob(environ, start_response, blob, authorization, hint, head)
        if answer is not None:
            why = f"the upstream answered {answer.status}"
        kept = self.store.kept(blob.digest)
        if kept is not None and self.memory.recalls(authorization, blob.name, blob.digest):
            # The upstream cannot be asked; it allowed this client this blob a moment ago.
            return self._serve_blob(environ, start_response, blob, authorization, kept, head)
        return self._unavailable(start_response, why, head)

    def _unavailable(
        self, start_response: StartResponse, why: str, head: bool = False
    ) -> list[bytes]:
        """502: the upstream cannot be asked, or its answer cannot be passed on."""
        self.metrics.count(Outcome.UPSTREAM_ERROR)
        return _error(start_response, 502, "UNAVAILABLE", why, head)

    def _serve_blob(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        blob: Blob,
        authorization: str | None,
        hint: int | None,
        head: bool,
    ) -> Iterable[bytes]:
        if head:
            self.metrics.count(Outcome.HEAD)
            size = self.store.kept(blob.digest)
            size = hint if size is None else size
            start_response("200 OK", _blob_headers(blob, size))
            return []
        opened = self.fetches.open(blob, authorization, hint)
        if isinstance(opened, KeptFile):
            return self._kept(environ, start_response, blob, opened)
        if opened is None:
            return self._pass_through(environ, start_response, blob, authorization, hint)
        return self._from_fetch(environ, start_response, blob, authorization, opened)

    def _from_fetch(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        blob: Blob,
        authorization: str | None,
        follower: Follower,
    ) -> Iterable[bytes]:
        """Follows the fetch of ``blob`` once it streams; passes it through if there is no
        room for it after all; 502 if the fetch failed before its first byte."""
        state = follower.wait_started()
        if state is FetchState.NO_ROOM:
            follower.close()
            return self._pass_through(environ, start_response, blob, authorization, None)
        size = follower.fetch.size
        if size is None and environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
            # No length and no chunked encoding: only a whole, verified blob can be sent.
            state = follower.wait_kept()
            size = follower.fetch.written
        if state is FetchState.FAILED:
            follower.close()
            return self._unavailable(start_response, follower.fetch.reason)
        return self._follow(environ, start_response, blob, follower, size)

    def _kept(
        self, environ: WSGIEnvironment, start_response: StartResponse, blob: Blob, kept: KeptFile
    ) -> Iterable[bytes]:
        kept.on_end = self.metrics.count
        start_response("200 OK", _blob_headers(blob, kept.size))
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(kept, CHUNK)  # type: ignore[no-any-return]
        return _chunks(kept)

    def _follow(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        blob: Blob,
        follower: Follower,
        size: int | None,
    ) -> Iterable[bytes]:
        gone = environ.get("waitress.client_disconnected")
        if callable(gone):
            follower.client_gone = gone
        follower.on_end = self.metrics.count
        start_response("200 OK", _blob_headers(blob, size))
        return follower

    def _pass_through(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        blob: Blob,
        authorization: str | None,
        hint: int | None,
    ) -> Iterable[bytes]:
        """No room to keep ``blob``: streams it from upstream to this client alone (``hint``:
        its size, if the upstream's GET does not say)."""
        try:
            response = self.upstream.open_blob(blob, authorization)
        except UpstreamUnreachable as error:
            return self._unavailable(start_response, str(error))
        if response.status_code != 200:
            response.close()
            return self._unavailable(
                start_response, f"the upstream answered {response.status_code}"
            )
        size = content_length(response)
        size = hint if size is None else size
        if size is None and environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
            response.close()  # neither a length nor chunks: a cut would look whole
            return self._unavailable(
                start_response, "no length from upstream for an HTTP/1.0 client"
            )
        start_response("200 OK", _blob_headers(blob, size))
        return PassThrough(blob, response, self.metrics, self.metrics.count)


def _chunks(kept: KeptFile) -> Iterable[bytes]:
    try:
        while data := kept.read(CHUNK):
            yield data
    finally:
        kept.close()


def _blob_headers(blob: Blob, size: int | None) -> list[tuple[str, str]]:
    """A blob's answer headers; its length when known (else chunked, or to the close)."""
    length = [] if size is None else [("Content-Length", str(size))]
    return [
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", blob.digest),
        ("Docker-Distribution-API-Version", "registry/2.0"),
        *length,
    ]


def _respond(
    start_response: StartResponse,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    head: bool,
    length: str | None = None,
) -> list[bytes]:
    start_response(status_line(status), [*headers, ("Content-Length", length or str(len(body)))])
    return [] if head else [body]


def _error(
    start_response: StartResponse,
    status: int,
    code: str,
    message: str,
    head: bool,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """A registry-style error (``{"errors": [{"code", "message"}]}``)."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return _respond(
        start_response,
        status,
        [("Content-Type", "application/json"), *(headers or [])],
        body,
        head,
    )


def _registry_error(status: int, message: str) -> object:
    """A registry-style body for the errors answered before a request reaches the cache."""
    code = {408: "UNKNOWN", 503: "UNAVAILABLE"}.get(status, "UNSUPPORTED")
    return {"errors": [{"code": code, "message": message}]}


class RunningCache:
    """A cache listening on ``settings.host:port`` (port 0: any free one, see :attr:`port`),
    serving once :meth:`start` is called, on threads of its own (daemon threads: the cache
    stops with its process) until :meth:`stop`."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.metrics = CacheMetrics()
        self.app = BlobCacheApp(settings, self.metrics)
        self.max_connections = usable_connections(
            settings.max_connections, "blob-cache", FILES_PER_CONNECTION
        )
        self._server = WsgiServer(
            self.app,
            host=settings.host,
            port=settings.port,
            name="blob-cache",
            threads=self.max_connections,
            connection_limit=self.max_connections,
            idle_timeout=settings.idle_timeout,
            request_timeout=settings.request_timeout,
            max_header_bytes=MAX_HEADER_BYTES,
            max_body_bytes=0,
            max_held_bytes=MAX_HELD_BYTES,
            held_allowance=HELD_ALLOWANCE,
            send_timeout=settings.idle_timeout,
            output_buffer=OUTBUF_HIGH_WATERMARK,
            error_document=_registry_error,
            ident="puller-blob-cache",
        )

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> RunningCache:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
