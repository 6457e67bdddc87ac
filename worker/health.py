"""``GET /alive`` and ``GET /ready`` for a Kubernetes probe, on ``PULLER_HEALTH_PORT``.

Alive while the worker's main loop keeps turning, connected or not: a broker outage is
not a reason to restart the worker (that would cut its pulls). Ready once it is
connected, has caught up on the history it missed, and is not draining. Both answer JSON
saying why. The server runs on threads of its own and only reads state the loop publishes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

log = structlog.get_logger("worker.health")

LOOP_SILENCE_LIMIT = 30.0
"""Seconds without a turn of the main loop after which the worker is not alive."""

Answer = tuple[int, str, bytes]
"""Status, content type, body."""


class Liveness:
    """The main loop calls :meth:`tick` on every turn, connected or waiting to reconnect."""

    def __init__(self) -> None:
        self._last_tick = time.monotonic()

    def tick(self) -> None:
        self._last_tick = time.monotonic()

    def silence(self) -> float:
        return time.monotonic() - self._last_tick

    def answer(self) -> tuple[int, dict[str, object]]:
        silence = round(self.silence(), 3)
        alive = silence < LOOP_SILENCE_LIMIT
        reason = "the worker's loop is running" if alive else "the worker's loop is stuck"
        body = {"alive": alive, "loop_silent_seconds": silence, "reason": reason}
        return (200 if alive else 503), body


def json_answer(status: int, body: Mapping[str, object]) -> Answer:
    return status, "application/json", json.dumps(body).encode()


class HealthServer:
    """A small HTTP server answering ``GET`` on fixed paths from ``routes``."""

    def __init__(self, port: int, routes: Mapping[str, Callable[[], Answer]]) -> None:
        self._routes = dict(routes)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, data = owner.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the log

        self._server = ThreadingHTTPServer(("", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        log.info("health endpoints", port=self.port, paths=sorted(self._routes))

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever, so only once it runs
        self._server.server_close()

    def answer(self, path: str) -> Answer:
        route = path.split("?", 1)[0]
        handler = self._routes.get(route)
        if handler is None:
            paths = ", ".join(sorted(self._routes))
            return json_answer(404, {"error": f"no such path {route!r}; try {paths}"})
        try:
            return handler()
        except Exception as error:
            log.exception("a health endpoint failed", path=route)
            return json_answer(500, {"error": f"{type(error).__name__}: {error}"})
