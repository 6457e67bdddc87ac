"""``GET /alive``, ``/ready`` and ``/metrics`` on ``PULLER_HEALTH_PORT``.

Alive while the worker's main loop keeps turning, connected or not: a broker outage is
not a reason to restart the worker (that would cut its pulls). Ready once it is
connected, has caught up on the history it missed, and is not draining. Both answer JSON
saying why. The server runs on threads of its own and only reads state the loop publishes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from serving.http import HttpServer, Request, Response, json_response

LOOP_SILENCE_LIMIT = 30.0
"""Seconds without a turn of the main loop after which the worker is not alive."""
UNFINISHED_BYTES = 4 * 2**20
"""Bytes of requests read and not yet handled, over all connections (their first 4 KB
each aside): probes and scrapes send none beyond that."""


class Liveness:
    """The main loop calls :meth:`tick` on every turn, connected or waiting to reconnect."""

    def __init__(self) -> None:
        self._last_tick = time.monotonic()

    def tick(self) -> None:
        self._last_tick = time.monotonic()

    def silence(self) -> float:
        return time.monotonic() - self._last_tick

    def answer(self) -> Response:
        silence = round(self.silence(), 3)
        alive = silence < LOOP_SILENCE_LIMIT
        reason = "the worker's loop is running" if alive else "the worker's loop is stuck"
        body = {"alive": alive, "loop_silent_seconds": silence, "reason": reason}
        return json_response(200 if alive else 503, body)


class HealthServer:
    """Answers ``GET`` on fixed paths from ``routes``; anything else is a 404 naming them."""

    def __init__(
        self,
        port: int,
        routes: Mapping[str, Callable[[], Response]],
        max_connections: int = 4000,
    ) -> None:
        self._routes = dict(routes)
        self._server = HttpServer(
            port,
            self.answer,
            name="health",
            threads=2,  # a probe, a scrape: each answered from memory
            max_connections=max_connections,
            max_held_bytes=UNFINISHED_BYTES,
        )
        self.port = self._server.port

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def answer(self, request: Request) -> Response:
        route = self._routes.get(request.path) if request.method == "GET" else None
        if route is None:
            paths = ", ".join(f"GET {path}" for path in sorted(self._routes))
            return json_response(404, {"error": f"no such path {request.path!r}; try {paths}"})
        return route()
