"""``GET /alive`` and ``GET /ready`` for a Kubernetes probe, on ``PULLER_HEALTH_PORT``.

Alive while the connection's loop keeps turning; ready once the worker is connected
and has caught up on the history it missed. Both answer JSON saying why. The server
runs on threads of its own and only reads state the loop publishes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

from worker.catch_up import CatchUpStatus

log = structlog.get_logger("worker.health")

LOOP_SILENCE_LIMIT = 30.0
"""Seconds without a turn of the connection's loop after which the worker is not alive."""


class Liveness:
    """The connection's loop calls :meth:`tick` on every turn."""

    def __init__(self) -> None:
        self._last_tick = time.monotonic()

    def tick(self) -> None:
        self._last_tick = time.monotonic()

    def silence(self) -> float:
        return time.monotonic() - self._last_tick


class HealthServer:
    def __init__(
        self, port: int, liveness: Liveness, catch_up: Callable[[], CatchUpStatus]
    ) -> None:
        self._liveness = liveness
        self._catch_up = catch_up
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = owner.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
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
        log.info("health endpoints", port=self.port, paths=["/alive", "/ready"])

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever, so only once it runs
        self._server.server_close()

    def answer(self, path: str) -> tuple[int, dict[str, object]]:
        silence = round(self._liveness.silence(), 3)
        alive = silence < LOOP_SILENCE_LIMIT
        route = path.split("?", 1)[0]
        if route == "/alive":
            reason = "the worker's loop is running" if alive else "the worker's loop is stuck"
            return (200 if alive else 503), {
                "alive": alive,
                "loop_silent_seconds": silence,
                "reason": reason,
            }
        if route == "/ready":
            status = self._catch_up()
            ready = alive and status.connected and status.caught_up
            if not alive:
                reason = "the worker's loop is stuck"
            elif not status.connected:
                reason = "not connected to RabbitMQ"
            elif not status.caught_up:
                reason = f"catching up on missed pulls ({status.pending} in hand)"
            else:
                reason = "connected and caught up"
            return (200 if ready else 503), {"ready": ready, "reason": reason, **status.to_json()}
        return 404, {"error": f"no such path {route!r}; try /alive or /ready"}
