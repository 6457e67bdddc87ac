"""The publisher library: what the session service and the ``puller`` CLI call."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from types import TracebackType

import structlog

from contract import (
    BrokerUnavailable,
    ImageReference,
    InvalidMessage,
    NodeResult,
    PullRequest,
    parse_reference,
)
from contract.messages import DEFAULT_AMQP_URL
from publisher.broker import PublisherBroker
from publisher.report import PullReport

log = structlog.get_logger("publisher")

DEFAULT_TIMEOUT = 60.0
REQUESTS_REMEMBERED = 1000


class Publisher:
    """Publishes pull requests to every node and collects the nodes' answers.

    ``amqp_url`` defaults to ``PULLER_AMQP_URL``, then to the local broker. The
    connection opens on first use and is re-opened once if it was lost. One
    instance may be shared by threads: calls take turns on its one connection.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        connect_timeout: float = 5.0,
    ) -> None:
        self.amqp_url = amqp_url or os.environ.get("PULLER_AMQP_URL") or DEFAULT_AMQP_URL
        self._broker = PublisherBroker(self.amqp_url, connect_timeout)
        self._lock = threading.RLock()
        self._results: OrderedDict[str, dict[str, NodeResult]] = OrderedDict()

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

    def request(self, image: str | ImageReference) -> str:
        """Asks every node to have ``image``; returns the request id at once.

        Returns as soon as RabbitMQ has confirmed the message. Raises
        :class:`InvalidReference` (nothing published), :class:`NoNodes` (no worker
        was there to receive it) or :class:`BrokerUnavailable`.
        """
        reference = image if isinstance(image, ImageReference) else parse_reference(image)
        request = PullRequest.new(reference)
        body = request.encode()
        with self._lock:
            self._remember(request.request_id)
            try:
                self._ensure_connected()
                self._broker.publish_request(body, request.request_id)
            except BrokerUnavailable:
                # One fresh connection, then give up: the caller must not hang here.
                log.info("publish failed; reconnecting once", request_id=request.request_id)
                self._broker.connect(self._on_reply)
                self._broker.publish_request(body, request.request_id)
        log.debug("requested", request_id=request.request_id, image=str(reference))
        return request.request_id

    def pull(
        self,
        image: str | ImageReference,
        *,
        expect: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> PullReport:
        """Requests ``image`` and waits for the nodes' answers.

        Waits until ``expect`` distinct nodes answered or ``timeout`` seconds
        passed; with no ``expect``, collects every answer that comes in ``timeout``.
        """
        if expect is not None and expect < 1:
            raise ValueError("expect must be at least 1")
        reference = image if isinstance(image, ImageReference) else parse_reference(image)
        request_id = self.request(reference)
        results = self.results(request_id, expect=expect, timeout=timeout)
        return PullReport(
            request_id=request_id, image=str(reference), nodes=results, expected=expect
        )

    def results(
        self, request_id: str, *, expect: int | None = None, timeout: float = 0.0
    ) -> tuple[NodeResult, ...]:
        """The answers to an earlier request, waiting up to ``timeout`` for ``expect`` of them.

        Answers to the last 1,000 requests of this publisher are kept.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                answered = self._results.get(request_id, {})
                if expect is not None and len(answered) >= expect:
                    break
                remaining = deadline - time.monotonic()
                self._ensure_connected()
                self._broker.process_events(max(0.0, min(remaining, 0.25)))
                if remaining <= 0:
                    break
            answered = self._results.get(request_id, {})
            return tuple(answered[node] for node in sorted(answered))

    def _ensure_connected(self) -> None:
        if not self._broker.connected:
            self._broker.connect(self._on_reply)

    def _remember(self, request_id: str) -> None:
        self._results[request_id] = {}
        while len(self._results) > REQUESTS_REMEMBERED:
            self._results.popitem(last=False)

    def _on_reply(self, correlation_id: str | None, body: bytes) -> None:
        try:
            result = NodeResult.decode(body)
        except InvalidMessage as error:
            log.warning(
                "ignored a reply that breaks the contract",
                error=str(error),
                correlation_id=correlation_id,
            )
            return
        answered = self._results.get(result.request_id)
        if answered is None and correlation_id is not None:
            answered = self._results.get(correlation_id)
        if answered is None:
            log.debug(
                "ignored a reply to a request this publisher does not know",
                request_id=result.request_id,
                node=result.node,
            )
            return
        answered[result.node] = result
