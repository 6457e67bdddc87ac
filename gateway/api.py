"""The gateway's routes: the original puller's, answered exactly as it did, and puller's own.

The original's contract (cyber-dojo's Ruby services depend on it): any HTTP method; the
body is a JSON object of arguments (empty: none), parsed before the path is looked at, so
a broken body wins over an unknown path; a success is a JSON object with one key, the
path's name (``{"alive?": true}``); a failure is ``{"exception": {"path", "body",
"class", "message"}}`` with 400 (the caller's mistake), 503 (RabbitMQ unreachable) or 500
(anything else; never a stack trace in the body).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from contract import BrokerUnavailable, Forbidden, InvalidReference, NoNodes
from contract.fields import MAX_ID_LENGTH
from gateway.metrics import ROSTER_SCRAPE_MAX_AGE, GatewayMetrics
from gateway.openapi import openapi_document
from gateway.settings import GatewaySettings
from publisher import AnswersForgotten, Publisher
from publisher.report import report_row
from serving.http import Request, Response

log = structlog.get_logger("gateway")

EXCEPTION_CLASS = "Puller"
"""The ``class`` of every error, as the original service named itself."""
DEFAULT_PULL_TIMEOUT = 60.0


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Arguments:
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


class Gateway:
    """Answers one HTTP request; safe from every server thread at once."""

    def __init__(
        self,
        publisher: Publisher,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publisher = publisher
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._scraped_roster: tuple[float, float] | None = None
        """When the roster was last counted for a scrape (``clock()``), and the count."""
        self._scraping = threading.Lock()
        self._waiting = threading.BoundedSemaphore(settings.max_waiting)
        self._drop_in: dict[str, tuple[Arguments, Callable[[dict[str, Any]], object]]] = {
            "/sha": (Arguments(), lambda _args: self._settings.sha),
            "/alive": (Arguments(), lambda _args: True),
            "/ready": (Arguments(), self._ready),
            "/pull_images": (Arguments(("id", "image_name")), self._pull_images),
            "/pull_image": (Arguments(("id", "image_name")), self._pull_images),
        }
        self._own: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("POST", "/pulls"): self._pulls,
            ("GET", "/nodes"): self._nodes,
            ("GET", "/openapi.json"): lambda _request: _json(200, openapi_document()),
            ("GET", "/metrics"): lambda _request: self._metrics.exposition(self._refresh),
        }

    def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = self._route(request)
        except _NotReady as error:  # the original's key, false, and why
            response = _json(503, {"ready?": False, "reason": error.message})
        except ApiError as error:
            response = _exception(request, error.status, error.message)
        except Exception as error:  # a bug: the caller gets a 500, the log the traceback
            log.exception("the gateway failed", path=request.path)
            response = _exception(
                request, 500, f"internal error ({type(error).__name__}); see puller-http's log"
            )
        self._metrics.observe(request.path, response.status, time.perf_counter() - started)
        return response

    def _route(self, request: Request) -> Response:
        own = self._own.get((request.method, request.path))
        if own is not None:
            return own(request)
        if request.path.startswith("/pulls/") and request.method == "GET":
            return self._pull_status(request.path.removeprefix("/pulls/"))
        if request.path in ("/pulls", "/nodes", "/openapi.json", "/metrics") or (
            request.path.startswith("/pulls/")
        ):
            allowed = sorted(m for m, p in self._own if p == request.path) or ["GET"]
            raise ApiError(405, f"method not allowed: use {' or '.join(allowed)}")
        arguments = _arguments(request.body)  # first, as the original: a bad body wins
        route = self._drop_in.get(request.path)
        if route is None:
            raise ApiError(400, "unknown path")
        signature, handler = route
        _check(signature, arguments)
        name = request.path.removeprefix("/")
        key = f"{name}?" if name in ("alive", "ready") else name
        return _json(200, {key: handler(arguments)})

    # -- the original's ------------------------------------------------------------------------

    def _ready(self, _arguments: dict[str, Any]) -> object:
        if self._publisher.connected or self._publisher.connect(timeout=0.5):
            return True
        raise _NotReady(self._publisher.connection_problem)

    def _pull_images(self, arguments: dict[str, Any]) -> object:
        session_id = _string(arguments, "id")
        if not session_id.isascii() or not session_id.isprintable() or not session_id:
            raise ApiError(400, "invalid argument: :id must be 1 to 128 printable ASCII")
        if len(session_id) > MAX_ID_LENGTH:
            raise ApiError(400, "invalid argument: :id must be 1 to 128 printable ASCII")
        try:
            image = self._publisher.check(_string(arguments, "image_name"))
        except InvalidReference as error:
            self._metrics.publish_failures.labels("invalid_image").inc()
            raise ApiError(400, f"invalid argument: :image_name: {error}") from None
        except Forbidden as error:
            self._metrics.publish_failures.labels("forbidden").inc()
            raise ApiError(403, f"forbidden: {error}") from None
        answer: dict[str, object] = {"id": session_id, "image": str(image)}
        try:
            answer["request_id"] = self._publisher.request(image, session_id=session_id)
            answer["reached_nodes"] = True
        except NoNodes as error:
            # Not the session's failure: the request is in the history, and nodes that start
            # within its window will pull the image. Said, not raised.
            self._metrics.publish_failures.labels("no_nodes").inc()
            answer["request_id"] = error.request_id
            answer["reached_nodes"] = False
            answer["note"] = str(error)
        except BrokerUnavailable as error:
            self._metrics.publish_failures.labels("broker_unavailable").inc()
            raise ApiError(503, str(error)) from None
        log.info("pull requested", **answer)
        return answer

    # -- puller's own --------------------------------------------------------------------------

    def _pulls(self, request: Request) -> Response:
        arguments = _arguments(request.body)
        _check(Arguments(("image",), ("expect", "nodes", "timeout")), arguments)
        try:
            image = self._publisher.check(_string(arguments, "image"))
        except InvalidReference as error:
            raise ApiError(400, f"invalid argument: :image: {error}") from None
        except Forbidden as error:
            self._metrics.publish_failures.labels("forbidden").inc()
            raise ApiError(403, f"forbidden: {error}") from None
        expect, nodes, timeout = self._pull_options(arguments)
        if not self._waiting.acquire(blocking=False):
            raise ApiError(
                503,
                f"{self._settings.max_waiting} callers are waiting in POST /pulls already "
                "(PULLER_HTTP_MAX_WAITING); try again later, or use /pull_images and "
                "GET /pulls/{request_id}",
            )
        try:
            self._metrics.waiting.inc()
            report = self._publisher.pull(image, expect=expect, nodes=nodes, timeout=timeout)
        except NoNodes as error:
            return _json(
                200,
                {
                    "request_id": error.request_id,
                    "image": str(image),
                    "ok": False,
                    "nodes": [],
                    "error": str(error),
                },
            )
        except BrokerUnavailable as error:
            raise ApiError(503, str(error)) from None
        finally:
            self._metrics.waiting.dec()
            self._waiting.release()
        return _json(200, report.to_json())

    def _pull_options(
        self, arguments: dict[str, Any]
    ) -> tuple[int | None, list[str] | None, float]:
        expect = arguments.get("expect")
        nodes = arguments.get("nodes")
        timeout = arguments.get("timeout", min(DEFAULT_PULL_TIMEOUT, self._settings.max_timeout))
        if "expect" in arguments and "nodes" in arguments:
            raise ApiError(400, "invalid arguments: give :expect or :nodes, not both")
        if "expect" in arguments and (
            isinstance(expect, bool) or not isinstance(expect, int) or expect < 1
        ):
            raise ApiError(400, "invalid argument: :expect must be a whole number, at least 1")
        if "nodes" in arguments and (
            not isinstance(nodes, list)
            or not nodes
            or not all(isinstance(n, str) and n for n in nodes)
        ):
            raise ApiError(400, "invalid argument: :nodes must be a non-empty array of names")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout <= self._settings.max_timeout
        ):
            raise ApiError(
                400,
                f"invalid argument: :timeout must be a number of seconds, more than 0 and at "
                f"most {self._settings.max_timeout:g} (PULLER_HTTP_MAX_TIMEOUT)",
            )
        return expect, nodes, float(timeout)

    def _pull_status(self, request_id: str) -> Response:
        try:
            known = self._publisher.known_request(request_id)
        except AnswersForgotten as error:
            raise ApiError(410, str(error)) from None
        if known is None:
            raise ApiError(
                404,
                f"no request {request_id!r} is known here: this gateway keeps its last 1,000 "
                "requests (since it started)",
            )
        answer: dict[str, object] = {
            "request_id": known.request_id,
            "image": known.image,
            "answered": len(known.results),
            "nodes": [report_row(r) for r in known.results],
        }
        if known.status_only:
            answer["notes"] = [
                f"{known.status_only} answer(s) were kept as node and status only (no image id, "
                "digest, seconds or error message): the answer memory (PULLER_ANSWER_MEMORY_MB) "
                "was full"
            ]
        return _json(200, answer)

    def _nodes(self, _request: Request) -> Response:
        try:
            roster = self._publisher.roster()
        except BrokerUnavailable as error:
            raise ApiError(503, str(error)) from None
        answer: dict[str, object] = {"nodes": [info.to_json() for info in roster.nodes]}
        if roster.note is not None:
            answer["notes"] = [roster.note]
        return _json(200, answer)

    def _refresh(self) -> None:
        with self._scraping:  # scrapes at once wait for one roster read, then share it
            now, last = self._clock(), self._scraped_roster
            if last is None or now - last[0] >= ROSTER_SCRAPE_MAX_AGE:
                try:
                    count = float(len(self._publisher.nodes()))
                except BrokerUnavailable:
                    count = float("nan")
                last = self._scraped_roster = (now, count)
            self._metrics.live_nodes.set(last[1])
            self._metrics.answer_memory(self._publisher.answer_memory())
        self._metrics.connected.set(1 if self._publisher.connected else 0)


class _NotReady(ApiError):
    def __init__(self, reason: str) -> None:
        super().__init__(503, f"not connected to RabbitMQ: {reason}")
        self.reason = reason


def _arguments(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "body is not JSON") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "body is not JSON Hash")
    return parsed


def _check(signature: Arguments, arguments: dict[str, Any]) -> None:
    missing = [name for name in signature.required if name not in arguments]
    if missing:
        raise ApiError(400, f"missing {_plural('argument', missing)}")
    known = set(signature.required) | set(signature.optional)
    unknown = [name for name in arguments if name not in known]
    if unknown:
        raise ApiError(400, f"unknown {_plural('argument', unknown)}")


def _plural(word: str, names: list[str]) -> str:
    listed = ", ".join(f":{name}" for name in names)
    return f"{word}{'s' if len(names) > 1 else ''}: {listed}"


def _string(arguments: dict[str, Any], name: str) -> str:
    value = arguments[name]
    if not isinstance(value, str):
        kind = {bool: "a boolean", int: "a number", float: "a number", type(None): "null"}.get(
            type(value), "an object or array"
        )
        raise ApiError(400, f"invalid argument: :{name} must be a string, not {kind}")
    return value


def _json(status: int, document: object) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


def _exception(request: Request, status: int, message: str) -> Response:
    body = request.body.decode("utf-8", errors="replace")
    document: dict[str, object] = {
        "exception": {
            "path": request.path,
            "body": body,
            "class": EXCEPTION_CLASS,
            "message": message,
        }
    }
    return _json(status, document)
