"""The publisher library: what the session service and the ``puller`` CLI call."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TypeVar

import structlog

from contract import (
    PRESENCE_INTERVAL,
    BrokerUnavailable,
    ImageReference,
    InvalidMessage,
    NodePresence,
    NodeProgress,
    NodeResult,
    PullRequest,
    RosterMarker,
    Status,
    decode_presence_stream,
    decode_reply,
    parse_reference,
)
from contract.messages import DEFAULT_AMQP_URL
from publisher.broker import PublisherBroker
from publisher.report import PullReport
from publisher.roster import NodeInfo, build_roster

log = structlog.get_logger("publisher")

DEFAULT_TIMEOUT = 60.0
DEFAULT_ROSTER_MAX_AGE = 3 * PRESENCE_INTERVAL
REQUESTS_REMEMBERED = 1000

ProgressCallback = Callable[[NodeProgress], None]
ResultCallback = Callable[[NodeResult], None]
_T = TypeVar("_T")


class Publisher:
    """Publishes pull requests to every node and collects the nodes' answers.

    ``amqp_url`` defaults to ``PULLER_AMQP_URL``, then to the local broker. The
    connection opens on first use and is re-opened once if it was lost. One
    instance may be shared by threads: calls take turns on its one connection.
    ``roster_max_age``: a node that has not announced itself for this many
    seconds is no longer in the roster.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        connect_timeout: float = 5.0,
        roster_max_age: float = DEFAULT_ROSTER_MAX_AGE,
    ) -> None:
        self.amqp_url = amqp_url or os.environ.get("PULLER_AMQP_URL") or DEFAULT_AMQP_URL
        self.roster_max_age = roster_max_age
        self._connect_timeout = connect_timeout
        self._broker = PublisherBroker(self.amqp_url, connect_timeout)
        self._lock = threading.RLock()
        self._results: OrderedDict[str, dict[str, NodeResult]] = OrderedDict()
        self._progress_callbacks: dict[str, ProgressCallback] = {}
        self._result_callbacks: dict[str, ResultCallback] = {}

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        _kind: type[BaseException] | None,
        _error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._broker.close()

    def nodes(self) -> list[NodeInfo]:
        """The live nodes: those whose worker announced itself within ``roster_max_age``."""
        since = time.time() - self.roster_max_age
        with self._lock:
            bodies = self._reconnecting_once(
                lambda: self._broker.read_presence(since, timeout=self._connect_timeout)
            )
        announcements: list[NodePresence] = []
        for body in bodies:
            try:
                message = decode_presence_stream(body)
            except InvalidMessage as error:
                log.warning("ignored a presence message that breaks the contract", error=str(error))
                continue
            if not isinstance(message, RosterMarker):
                announcements.append(message)
        return build_roster(announcements)

    def request(self, image: str | ImageReference) -> str:
        """Asks every node to have ``image``; returns the request id at once.

        Returns as soon as RabbitMQ has confirmed the message. Raises
        :class:`InvalidReference` (nothing published), :class:`NoNodes` (no worker
        was there to receive it) or :class:`BrokerUnavailable`. Collect the
        answers later, if at all, with :meth:`results`.
        """
        reference = image if isinstance(image, ImageReference) else parse_reference(image)
        request = PullRequest.new(reference)
        body = request.encode()
        with self._lock:
            self._remember(request.request_id)
            self._reconnecting_once(lambda: self._broker.publish_request(body, request.request_id))
        log.debug("requested", request_id=request.request_id, image=str(reference))
        return request.request_id

    def pull(
        self,
        image: str | ImageReference,
        *,
        expect: int | None = None,
        nodes: Iterable[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> PullReport:
        """Requests ``image`` and waits, at most ``timeout`` seconds, for the nodes' answers.

        Waits for ``expect`` nodes, or for the ``nodes`` named, or (neither given)
        for every node in the roster. An expected node that does not answer in
        time is in the report with status ``no_reply``. ``on_progress`` is called
        with each :class:`NodeProgress` of a pull, and ``on_result`` with each
        node's :class:`NodeResult` as it arrives, both on the calling thread.
        """
        if expect is not None and nodes is not None:
            raise ValueError("give expect or nodes, not both")
        if expect is not None and expect < 1:
            raise ValueError("expect must be at least 1")
        reference = image if isinstance(image, ImageReference) else parse_reference(image)
        wanted: set[str] | None = None
        if nodes is not None:
            wanted = set(nodes)
            if not wanted:
                raise ValueError("nodes names no node")
        elif expect is None:
            wanted = {info.node for info in self.nodes()}
        started = time.monotonic()
        request_id = self.request(reference)
        if on_progress is not None:
            self._progress_callbacks[request_id] = on_progress
        if on_result is not None:
            self._result_callbacks[request_id] = on_result
        try:
            answered = self._wait(request_id, expect, wanted, timeout)
        finally:
            self._progress_callbacks.pop(request_id, None)
            self._result_callbacks.pop(request_id, None)
        waited = round(time.monotonic() - started, 6)
        silent = sorted((wanted or set()) - {r.node for r in answered})
        no_reply = tuple(
            NodeResult(request_id, node, str(reference), Status.NO_REPLY, waited) for node in silent
        )
        return PullReport(
            request_id=request_id,
            image=str(reference),
            nodes=tuple(sorted(answered + no_reply, key=lambda r: r.node)),
            expected=expect if expect is not None else (len(wanted) if wanted else None),
        )

    def results(
        self, request_id: str, *, expect: int | None = None, timeout: float = 0.0
    ) -> tuple[NodeResult, ...]:
        """The answers so far to an earlier request, waiting up to ``timeout`` for ``expect``.

        Answers to the last 1,000 requests of this publisher are kept.
        """
        return self._wait(request_id, expect, None, timeout)

    def _wait(
        self, request_id: str, expect: int | None, wanted: set[str] | None, timeout: float
    ) -> tuple[NodeResult, ...]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                answered = self._results.get(request_id, {})
                if expect is not None and len(answered) >= expect:
                    break
                if wanted and wanted <= answered.keys():
                    break
                remaining = deadline - time.monotonic()
                wait = max(0.0, min(remaining, 0.25))
                self._reconnecting_once(functools.partial(self._broker.process_events, wait))
                if remaining <= 0:
                    break
            answered = self._results.get(request_id, {})
            return tuple(answered[node] for node in sorted(answered))

    def _reconnecting_once(self, action: Callable[[], _T]) -> _T:
        """Runs ``action`` on the connection; if the connection turns out lost, opens one
        fresh connection and runs it once more. Never waits longer than the connect timeout
        for a broker that is down: the caller must not hang here."""
        if not self._broker.connected:
            self._broker.connect(self._on_reply)
            return action()
        try:
            return action()
        except BrokerUnavailable as error:
            log.info("connection lost; reconnecting once", error=str(error))
            self._broker.connect(self._on_reply)
            return action()

    def _remember(self, request_id: str) -> None:
        self._results[request_id] = {}
        while len(self._results) > REQUESTS_REMEMBERED:
            self._results.popitem(last=False)

    def _on_reply(self, correlation_id: str | None, body: bytes) -> None:
        try:
            message = decode_reply(body)
        except InvalidMessage as error:
            log.warning(
                "ignored a reply that breaks the contract",
                error=str(error),
                correlation_id=correlation_id,
            )
            return
        if isinstance(message, NodeProgress):
            callback = self._progress_callbacks.get(message.request_id)
            if callback is not None:
                callback(message)
            return
        answered = self._results.get(message.request_id)
        if answered is None and correlation_id is not None:
            answered = self._results.get(correlation_id)
        if answered is None:
            log.debug(
                "ignored a reply to a request this publisher does not know",
                request_id=message.request_id,
                node=message.node,
            )
            return
        answered[message.node] = message
        on_result = self._result_callbacks.get(message.request_id)
        if on_result is not None:
            on_result(message)
