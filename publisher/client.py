"""The publisher library: what the session service, the HTTP gateway and the CLI call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog

from contract import (
    DEFAULT_AMQP_URL,
    PRESENCE_INTERVAL,
    BrokerUnavailable,
    Forbidden,
    ImageReference,
    InvalidMessage,
    Misconfigured,
    NodePresence,
    NodeProgress,
    NodeResult,
    NoNodes,
    PullRequest,
    RosterMarker,
    Status,
    decode_presence_stream,
    parse_reference,
)
from contract.connection import BrokerTls
from contract.policy import ImagePolicy
from publisher.broker import PublisherBroker
from publisher.replies import Event, ReplyBook
from publisher.report import PullReport
from publisher.roster import NodeInfo, build_roster
from publisher.settings import PublisherSettings
from serving.settings import image_policy

# A library logs through the standard logging module: silent unless the host application
# configures logging, and then at the host's levels, through the host's handlers.
log = structlog.wrap_logger(
    logging.getLogger("puller.publisher"),
    wrapper_class=structlog.stdlib.BoundLogger,
    processors=[structlog.contextvars.merge_contextvars, structlog.stdlib.render_to_log_kwargs],
)

DEFAULT_TIMEOUT = 60.0
DEFAULT_ROSTER_MAX_AGE = 3 * PRESENCE_INTERVAL
WAKE_INTERVAL = 0.5
"""Seconds between looks at the connection while waiting for answers."""

ProgressCallback = Callable[[NodeProgress], None]
ResultCallback = Callable[[NodeResult], None]


@dataclass(frozen=True)
class KnownRequest:
    request_id: str
    image: str | None
    results: tuple[NodeResult, ...]
    """One per node that answered so far, sorted by node."""


class Publisher:
    """Publishes pull requests to every node and collects the nodes' answers.

    ``amqp_url`` defaults to ``PULLER_AMQP_URL`` (or the file named by
    ``PULLER_AMQP_URL_FILE``), then to the local broker; ``tls`` (for ``amqps://``) to the
    ``PULLER_TLS_*`` files; ``policy`` to ``PULLER_ALLOWED_IMAGES`` and
    ``PULLER_REQUIRE_DIGEST`` (see :mod:`contract.policy`). The connection
    opens on first use, on a thread of its own, and is opened again when lost. One
    instance may be shared by threads: nothing waits while holding the connection, so a
    :meth:`request` returns in milliseconds whatever other threads wait for.
    ``roster_max_age``: a node that has not announced itself for this many seconds is no
    longer in the roster.
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        connect_timeout: float = 5.0,
        roster_max_age: float = DEFAULT_ROSTER_MAX_AGE,
        tls: BrokerTls | None = None,
        policy: ImagePolicy | None = None,
    ) -> None:
        env = PublisherSettings.from_env() if None in (amqp_url, tls, policy) else None
        self.amqp_url = amqp_url or (env.amqp_url if env else DEFAULT_AMQP_URL)
        if tls is None and env is not None:
            tls = BrokerTls(env.tls_ca_file, env.tls_cert_file, env.tls_key_file)
        problem = (tls or BrokerTls()).problem(self.amqp_url)
        if problem is not None:
            raise Misconfigured(problem)
        self.policy: ImagePolicy = policy or (image_policy(env) if env else ImagePolicy())
        """Checked before anything is published: a refused image raises :class:`Forbidden`."""
        self.roster_max_age = roster_max_age
        self._connect_timeout = connect_timeout
        self._replies = ReplyBook()
        self._broker = PublisherBroker(
            self.amqp_url, connect_timeout, self._replies.receive, tls=tls
        )

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
        self._broker.close()

    @property
    def connected(self) -> bool:
        """Whether the connection to RabbitMQ is open now."""
        return self._broker.connected

    @property
    def connection_problem(self) -> str:
        """Why the last attempt to connect failed, or the connection was lost."""
        return self._broker.last_error

    def connect(self, timeout: float) -> bool:
        """Opens the connection now (it opens on first use otherwise); whether it is open
        within ``timeout`` seconds."""
        return self._broker.wait_connected(timeout)

    def known_request(self, request_id: str) -> KnownRequest | None:
        """An earlier request of this publisher (the last 1,000 are kept): its image and
        the answers so far; ``None`` if it is not one of them."""
        found = self._replies.lookup(request_id)
        if found is None:
            return None
        image, results = found
        ordered = tuple(results[node] for node in sorted(results))
        return KnownRequest(request_id, image, ordered)

    def nodes(self) -> list[NodeInfo]:
        """The live nodes: those whose worker announced itself within ``roster_max_age``."""
        return self._roster(since=time.time() - self.roster_max_age)

    def _roster(self, since: float) -> list[NodeInfo]:
        """The nodes whose latest announcement since ``since`` (Unix time) is not "leaving"."""
        bodies = self._broker.read_presence(since, timeout=self._connect_timeout)
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

    def check(self, image: str | ImageReference) -> ImageReference:
        """``image`` parsed and normalised, if :attr:`policy` allows it; raises
        :class:`InvalidReference` or :class:`Forbidden` (naming the rule) if not."""
        reference = _reference(image)
        refusal = self.policy.refusal(reference)
        if refusal is not None:
            raise Forbidden(refusal)
        return reference

    def request(self, image: str | ImageReference, *, session_id: str | None = None) -> str:
        """Asks every node to have ``image``; returns the request id at once.

        Returns as soon as RabbitMQ has confirmed the message. Raises
        :class:`InvalidReference` or :class:`Forbidden` (nothing published; the latter when
        :attr:`policy` refuses the image), :class:`NoNodes` (no worker
        was there to receive it) or :class:`BrokerUnavailable`. Collect the
        answers later, if at all, with :meth:`results`. ``session_id`` travels with
        the request into the workers' logs.
        """
        request = PullRequest.new(self.check(image), session_id)
        self._publish(request)
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

        Waits for ``expect`` nodes, or for the ``nodes`` named, or (neither given) for
        every node in the roster. An expected node that does not answer in time is in the
        report with status ``no_reply`` (with ``expect``, the roster's nodes that did not
        answer are named). ``on_progress`` and ``on_result`` are called on this thread.

        Once published, the request survives a lost connection: within ``timeout`` the
        publisher reconnects and publishes the request again (same id), so that nodes
        whose answers were lost answer again; the report's ``notes`` say so.
        """
        if expect is not None and nodes is not None:
            raise ValueError("give expect or nodes, not both")
        if expect is not None and expect < 1:
            raise ValueError("expect must be at least 1")
        reference = self.check(image)
        wanted: set[str] | None = None
        if nodes is not None:
            wanted = set(nodes)
            if not wanted:
                raise ValueError("nodes names no node")
        elif expect is None:
            wanted = {info.node for info in self.nodes()}
        began = time.time()
        started = time.monotonic()
        request = PullRequest.new(reference)
        self._publish(request, watch=True)
        try:
            answered, notes = self._collect(
                request, expect, wanted, started + timeout, on_progress, on_result
            )
        finally:
            self._replies.unwatch(request.request_id)
        waited = round(time.monotonic() - started, 6)
        missing = (expect - len(answered)) if expect is not None else 0
        silent = set(wanted or ())
        if expect is not None and missing > 0:
            # Who was there when the pull began? Asked only now, and only when someone
            # is missing: the roster costs a stream read the common case need not pay.
            silent = self._roster_names(since=began - self.roster_max_age)
            if not silent - answered.keys():
                notes.append(
                    f"only a count was known: {missing} of {expect} expected node(s) did not "
                    "answer, and the roster named none that was silent"
                )
        no_reply = [
            NodeResult(request.request_id, node, str(reference), Status.NO_REPLY, waited)
            for node in sorted(silent - answered.keys())
        ]
        return PullReport(
            request_id=request.request_id,
            image=str(reference),
            nodes=tuple(sorted([*answered.values(), *no_reply], key=lambda r: r.node)),
            expected=expect if expect is not None else (len(wanted) if wanted else None),
            notes=tuple(notes),
            wanted=frozenset(wanted) if wanted is not None else None,
        )

    def results(
        self, request_id: str, *, expect: int | None = None, timeout: float = 0.0
    ) -> tuple[NodeResult, ...]:
        """The answers so far to an earlier request, waiting up to ``timeout`` for ``expect``.

        Answers to the last 1,000 requests of this publisher are kept.
        """

        def enough(results: dict[str, NodeResult]) -> bool:
            return expect is not None and len(results) >= expect

        answered = self._replies.wait(request_id, enough, time.monotonic() + timeout)
        return tuple(answered[node] for node in sorted(answered))

    def _publish(self, request: PullRequest, watch: bool = False) -> None:
        self._replies.track(request.request_id, str(request.image), watch=watch)
        try:
            self._broker.publish_request(request.encode(), request.request_id)
        except NoNodes as error:
            if watch:
                self._replies.unwatch(request.request_id)
            raise NoNodes(str(error), request.request_id) from None
        log.debug("requested", request_id=request.request_id, image=str(request.image))

    def _roster_names(self, since: float) -> set[str]:
        try:
            return {info.node for info in self._roster(since)}
        except BrokerUnavailable:
            return set()

    def _collect(
        self,
        request: PullRequest,
        expect: int | None,
        wanted: set[str] | None,
        deadline: float,
        on_progress: ProgressCallback | None,
        on_result: ResultCallback | None,
    ) -> tuple[dict[str, NodeResult], list[str]]:
        """Waits for the answers, reconnecting and asking again if the connection is lost."""

        def done(results: dict[str, NodeResult]) -> bool:
            if expect is not None:
                return len(results) >= expect
            return bool(wanted) and wanted is not None and wanted <= results.keys()

        def hand_over(event: Event) -> None:
            if isinstance(event, NodeProgress):
                if on_progress is not None:
                    on_progress(event)
            elif on_result is not None:
                on_result(event)

        epoch, asked_again, lost_at = self._broker.epoch, 0, None
        while True:
            results = self._replies.wait(
                request.request_id, done, deadline, hand_over, wake_every=WAKE_INTERVAL
            )
            if done(results) or time.monotonic() >= deadline:
                break
            if not self._broker.connected:
                lost_at = lost_at or time.monotonic()
                self._broker.wait_connected(min(WAKE_INTERVAL, deadline - time.monotonic()))
            elif self._broker.epoch != epoch:
                epoch, lost_at = self._broker.epoch, None
                asked_again += 1
                log.info("reconnected while waiting; asking again", request_id=request.request_id)
                try:
                    self._broker.publish_request(request.encode(), request.request_id)
                except (NoNodes, BrokerUnavailable) as error:
                    log.info("asking again failed", error=str(error))
        notes = []
        if asked_again:
            notes.append(
                f"the connection to RabbitMQ was lost during the wait and opened again "
                f"({asked_again} time(s)); the request was published again (same id) so that "
                "nodes whose answers were lost answered again: a node that already had the "
                "image then answers 'present'"
            )
        if lost_at is not None:
            notes.append(
                f"the connection to RabbitMQ was down for the last "
                f"{time.monotonic() - lost_at:.1f}s of the wait: answers sent then are lost"
            )
        return results, notes


def _reference(image: str | ImageReference) -> ImageReference:
    return image if isinstance(image, ImageReference) else parse_reference(image)
