"""The cache's HTTP side: a WSGI application served by waitress.

waitress gives the connection cap (``connection_limit``), the idle timeout
(``channel_timeout``: a connection with no request in progress and nothing sent or
received for that long is closed), and sends kept blobs from their files without a
thread (``wsgi.file_wrapper``). The listening socket carries ``TCP_USER_TIMEOUT``
(inherited by every accepted connection), so a client that stops reading mid-blob is cut
by the kernel after the same timeout, which frees the thread that was streaming to it.
waitress's output buffers stay below its overflow size, so nothing spills to temporary
files: the process writes only under ``--dir``.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from waitress.server import create_server

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

log = structlog.get_logger("blob_cache.server")

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN", 429: "TOOMANYREQUESTS"}
TLS_HANDSHAKE = 0x16
"""The first byte of a TLS ClientHello (a handshake record)."""
OUTBUF_HIGH_WATERMARK = 256 * 1024
"""Bytes waitress holds for one connection before the thread streaming to it waits."""


@dataclass(frozen=True)
class CacheSettings:
    upstream: str
    directory: Path
    host: str = "127.0.0.1"
    port: int = 5001
    max_bytes: int = 10 * 1000**3
    idle_timeout: int = 30
    max_connections: int = 128


class BlobCacheApp:
    """The WSGI application: routes a request, authorises blobs upstream, serves them."""

    def __init__(self, settings: CacheSettings, metrics: CacheMetrics) -> None:
        self.metrics = metrics
        self.upstream = Upstream(settings.upstream)
        self.store = Store(settings.directory, settings.max_bytes, metrics)
        self.fetches = Fetches(self.store, self.upstream, metrics)
        self.memory = AuthMemory()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
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
        self, environ: Environ, start_response: StartResponse, route: Ping | Manifest, method: str
    ) -> list[bytes]:
        headers = {
            name: value
            for name, key in (("Authorization", "HTTP_AUTHORIZATION"), ("Accept", "HTTP_ACCEPT"))
            if (value := environ.get(key)) is not None
        }
        try:
            answer = self.upstream.forward(method, route, headers)
        except UpstreamUnreachable as error:
            self.metrics.count(Outcome.UPSTREAM_ERROR)
            return _error(start_response, 502, "UNAVAILABLE", str(error), method == "HEAD")
        self.metrics.count(Outcome.FORWARDED)
        passed = [(k, v) for k, v in answer.headers.items() if k != "Content-Length"]
        length = answer.headers.get("Content-Length", "0") if method == "HEAD" else None
        return _respond(
            start_response, answer.status, passed, answer.body, method == "HEAD", length
        )

    def _blob(
        self, environ: Environ, start_response: StartResponse, blob: Blob, head: bool
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
        self.metrics.count(Outcome.UPSTREAM_ERROR)
        return _error(start_response, 502, "UNAVAILABLE", why, head)

    def _serve_blob(
        self,
        environ: Environ,
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
            length = [] if size is None else [("Content-Length", str(size))]
            start_response("200 OK", [*_blob_headers(blob), *length])
            return []
        opened = self.fetches.open(blob, authorization, hint)
        if isinstance(opened, KeptFile):
            return self._kept(environ, start_response, blob, opened)
        if opened is None:
            return self._pass_through(environ, start_response, blob, authorization, hint)
        return self._from_fetch(environ, start_response, blob, authorization, opened)

    def _from_fetch(
        self,
        environ: Environ,
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
            self.metrics.count(Outcome.UPSTREAM_ERROR)
            return _error(start_response, 502, "UNAVAILABLE", follower.fetch.reason, head=False)
        return self._follow(environ, start_response, blob, follower, size)

    def _kept(
        self, environ: Environ, start_response: StartResponse, blob: Blob, kept: KeptFile
    ) -> Iterable[bytes]:
        kept.on_end = self.metrics.count
        start_response("200 OK", [*_blob_headers(blob), ("Content-Length", str(kept.size))])
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(kept, CHUNK)  # type: ignore[no-any-return]
        return _chunks(kept)

    def _follow(
        self,
        environ: Environ,
        start_response: StartResponse,
        blob: Blob,
        follower: Follower,
        size: int | None,
    ) -> Iterable[bytes]:
        gone = environ.get("waitress.client_disconnected")
        if callable(gone):
            follower.client_gone = gone
        follower.on_end = self.metrics.count
        length = [] if size is None else [("Content-Length", str(size))]
        start_response("200 OK", [*_blob_headers(blob), *length])
        return follower

    def _pass_through(
        self,
        environ: Environ,
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
            self.metrics.count(Outcome.UPSTREAM_ERROR)
            return _error(start_response, 502, "UNAVAILABLE", str(error), head=False)
        if response.status_code != 200:
            response.close()
            self.metrics.count(Outcome.UPSTREAM_ERROR)
            why = f"the upstream answered {response.status_code}"
            return _error(start_response, 502, "UNAVAILABLE", why, head=False)
        size = content_length(response)
        size = hint if size is None else size
        if size is None and environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
            response.close()  # neither a length nor chunks: a cut would look whole
            self.metrics.count(Outcome.UPSTREAM_ERROR)
            why = "no length from upstream for an HTTP/1.0 client"
            return _error(start_response, 502, "UNAVAILABLE", why, head=False)
        length = [] if size is None else [("Content-Length", str(size))]
        start_response("200 OK", [*_blob_headers(blob), *length])
        return PassThrough(blob, response, self.metrics, self.metrics.count)


def _chunks(kept: KeptFile) -> Iterable[bytes]:
    try:
        while data := kept.read(CHUNK):
            yield data
    finally:
        kept.close()


def _blob_headers(blob: Blob) -> list[tuple[str, str]]:
    return [
        ("Content-Type", "application/octet-stream"),
        ("Docker-Content-Digest", blob.digest),
        ("Docker-Distribution-API-Version", "registry/2.0"),
    ]


def _status(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


def _respond(
    start_response: StartResponse,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    head: bool,
    length: str | None = None,
) -> list[bytes]:
    start_response(_status(status), [*headers, ("Content-Length", length or str(len(body)))])
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


class _Listener(socket.socket):
    """The listening socket: the connections it accepts are :class:`_PlainConnection`."""

    def accept(self) -> tuple[socket.socket, Any]:
        connection, address = super().accept()
        plain = _PlainConnection(
            connection.family, connection.type, connection.proto, fileno=connection.detach()
        )
        return plain, address


class _PlainConnection(socket.socket):
    """A connection that ends at once if it opens with a TLS handshake. A Docker Engine
    tries HTTPS first even on an insecure registry, and waits up to 10 s for an answer
    before it tries plain HTTP; waitress would wait for the end of a request's headers."""

    _first = True

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if self._first and data:
            self._first = False
            if data[0] == TLS_HANDSHAKE:
                return b""  # read as the client closing: waitress closes the connection
        return data


class RunningCache:
    """A cache listening on ``settings.host:port`` (port 0: any free one, see :attr:`port`).
    :meth:`run` serves in the calling thread; :meth:`start` in a thread of its own (a daemon
    thread: the cache stops with its process)."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self.metrics = CacheMetrics()
        self.app = BlobCacheApp(settings, self.metrics)
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self._socket = _Listener(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((settings.host, settings.port))
        self._socket.listen(1024)
        # Inherited by accepted connections: unacknowledged data for this long cuts one.
        self._socket.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, settings.idle_timeout * 1000
        )
        self._server = create_server(
            self.app,
            sockets=[self._socket],
            threads=settings.max_connections,
            # waitress counts its listening socket and its wake-up pipe as connections too.
            connection_limit=settings.max_connections + 2,
            channel_timeout=settings.idle_timeout,
            cleanup_interval=max(1, settings.idle_timeout // 4),
            outbuf_high_watermark=OUTBUF_HIGH_WATERMARK,
            # Above what one buffer can hold (the watermark and a chunk): never a temporary file.
            outbuf_overflow=4 * OUTBUF_HIGH_WATERMARK,
            max_request_header_size=64 * 1024,
            max_request_body_size=0,
            log_socket_errors=False,
            expose_tracebacks=False,
            ident="puller-blob-cache",
        )

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def run(self) -> None:
        self._server.run()

    def start(self) -> RunningCache:
        threading.Thread(target=self.run, name="blob-cache", daemon=True).start()
        return self
