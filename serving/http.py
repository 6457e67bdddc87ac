"""A small threaded HTTP/1.1 server: the standard library's, behind one handler function.

Both HTTP surfaces of puller use it: the worker's health port (``/alive``, ``/ready``,
``/metrics``) and the gateway (``puller-http``). Why the standard library and not an
ASGI/WSGI server: the work behind every request is a blocking call into puller's own
thread-safe code (a confirmed publish, a wait on a condition), which a thread per
connection serves directly; it adds no dependency to the worker image; and keep-alive
connections make its per-request cost small next to the broker round trip (measured in
``bench/http_gateway.py``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

log = structlog.get_logger("serving.http")

MAX_BODY_BYTES = 64 * 1024


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


class _Server(ThreadingHTTPServer):
    # The standard library listens with a backlog of 5: a burst of callers connecting at
    # once (32 measured) had connections reset. The kernel caps this at somaxconn.
    request_queue_size = 1024


class HttpServer:
    """Serves ``handler`` on ``host:port`` (port 0: any free one), a thread per connection."""

    def __init__(
        self,
        port: int,
        handler: Handler,
        host: str = "",
        name: str = "http",
        idle_timeout: float = 60.0,
    ) -> None:
        """``idle_timeout``: seconds a connection may stay silent (mid-request, or between
        keep-alive requests) before it is closed, so a client that stops sending does not
        hold a thread for ever."""
        self._handler = handler
        self._name = name
        owner = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection, many requests
            # Buffered output: headers and body leave in one write when the handler is done,
            # so a client never sees the headers of an answer without its body (the process
            # may exit between two writes), and Nagle's algorithm has no second write to hold
            # back for the client's delayed ACK (40 ms on every call).
            wbufsize = 64 * 1024
            disable_nagle_algorithm = True
            timeout = idle_timeout
            server_version = "puller"
            sys_version = ""

            def __getattr__(self, name: str) -> Callable[[], None]:
                # Every method is served (do_GET, do_POST, do_TRACE, ...): the handler says
                # which it takes, so an unexpected one gets a JSON answer, never a 501.
                if name.startswith("do_"):
                    return lambda: owner._serve(self, name.removeprefix("do_"))
                raise AttributeError(name)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes and callers every second would drown the log

        self._server = _Server((host, port), RequestHandler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever, so only once it runs
        self._server.server_close()

    def _serve(self, exchange: BaseHTTPRequestHandler, method: str) -> None:
        path, _, query = exchange.path.partition("?")
        length_text = exchange.headers.get("Content-Length") or "0"
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._send(
                exchange,
                json_response(
                    413 if length > MAX_BODY_BYTES else 400,
                    {"error": f"a body of at most {MAX_BODY_BYTES} bytes, with a valid length"},
                ),
            )
            exchange.close_connection = True
            return
        body = exchange.rfile.read(length) if length else b""
        request = Request(method, path, query, dict(exchange.headers.items()), body)
        try:
            response = self._handler(request)
        except Exception:
            log.exception("the HTTP handler failed", server=self._name, path=path)
            response = json_response(500, {"error": "internal error; see the server's log"})
        self._send(exchange, response)

    @staticmethod
    def _send(exchange: BaseHTTPRequestHandler, response: Response) -> None:
        exchange.send_response(response.status)
        exchange.send_header("Content-Type", response.content_type)
        exchange.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            exchange.send_header(name, value)
        exchange.end_headers()
        if exchange.command != "HEAD":
            exchange.wfile.write(response.body)
