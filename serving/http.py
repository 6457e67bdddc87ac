"""puller's HTTP server: waitress, behind one handler function.

Both HTTP surfaces of puller use it: the worker's health port (``/alive``, ``/ready``,
``/metrics``) and the gateway (``puller-http``). One I/O thread holds every connection, so
a client that sends slowly, or not at all, costs a socket and a few kilobytes, not a
thread; a request reaches one of a fixed number of threads once it has arrived whole, and
the handler behind it makes blocking calls into puller's own thread-safe code (a
confirmed publish, a wait on a condition). Why waitress, its settings, and what an
attacker can still do: docs/http-servers.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from serving.wsgi_server import WsgiServer, status_line, usable_connections

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = structlog.get_logger("serving.http")

MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 8 * 1024
"""The request line and headers together; more is answered 431."""
HELD_ALLOWANCE = 4 * 1024
"""Bytes of each request not counted against ``max_held_bytes``: a usual request is smaller."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Without the query string."""
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(status: int, document: object) -> Response:
    return Response(status, json.dumps(document).encode())


Handler = Callable[[Request], Response]


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0: any free one)."""

    def __init__(
        self,
        port: int,
        handler: Handler,
        host: str = "",
        name: str = "http",
        idle_timeout: float = 60.0,
        threads: int = 4,
        max_connections: int = 1000,
        request_timeout: float = 30.0,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_held_bytes: int = 16 * 2**20,
    ) -> None:
        """``idle_timeout``: seconds a connection may stay silent (mid-request, or between
        keep-alive requests) before it is closed. ``request_timeout``: seconds from a
        request's first byte to its last (a client that trickles is closed too).
        ``threads``: requests handled at once. ``max_connections``: connections held at
        once (past it the oldest idle one is closed for each new one), lowered to what the
        process's open-file limit allows. ``max_held_bytes``: bytes of requests read and
        not yet handled, each request's first ``HELD_ALLOWANCE`` aside, over all
        connections (past it, 503)."""
        self._handler = handler
        self._name = name
        self.max_connections = usable_connections(max_connections, name)
        self._server = WsgiServer(
            self._answer,
            host=host,
            port=port,
            name=name,
            threads=threads,
            connection_limit=self.max_connections,
            idle_timeout=idle_timeout,
            request_timeout=request_timeout,
            max_header_bytes=MAX_HEADER_BYTES,
            max_body_bytes=max_body_bytes,
            max_held_bytes=max_held_bytes,
            held_allowance=HELD_ALLOWANCE,
        )
        self.port: int = self._server.port

    @property
    def unfinished_bytes(self) -> int:
        """Bytes of requests read and not yet handled, past each one's first
        ``HELD_ALLOWANCE``: what counts against ``max_held_bytes``."""
        return self._server.held.total

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def _answer(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application: the whole request in, one :class:`Response` out."""
        # The request target as sent (waitress's PATH_INFO is percent-decoded).
        path, _, query = environ["REQUEST_URI"].partition("?")
        request = Request(
            environ["REQUEST_METHOD"], path, query, _headers(environ), environ["wsgi.input"].read()
        )
        try:
            response = self._handler(request)
        except Exception:
            log.exception("the HTTP handler failed", server=self._name, path=path)
            response = json_response(500, {"error": "internal error; see the server's log"})
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers.items(),
        ]
        start_response(status_line(response.status), headers)
        return [response.body]


def _headers(environ: WSGIEnvironment) -> dict[str, str]:
    """The request's headers, named as on the wire (``Content-Type``); repeated ones
    joined with commas."""
    found = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key.removeprefix("HTTP_")
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = key
        else:
            continue
        found[name.replace("_", "-").title()] = value
    return found
