"""The publisher library: what the session service, the HTTP gateway and the CLI call."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

import structlog

from contract import (
    DEFAULT_AMQP_URL,
    MAX_KEEP_IMAGES,
    MAX_PRESENCE_INTERVAL,
    PRESENCE_INTERVAL,
    PRESENCE_MISSES,
    BrokerUnavailable,
    CheckRequest,
    Forbidden,
    ImageReference,
    Lane,
    Misconfigured,
    NodeProgress,
    NodeResult,
    NodeState,
    NoNodes,
    PruneRequest,
    PruneResult,
    PullRequest,
    Status,
    parse_reference,
)
from contract.connection import BrokerTls
from contract.policy import ImagePolicy
from publisher.answer_wait import (
    WAKE_INTERVAL,
    AnswerWait,
    ProgressCallback,
    ResultCallback,
    pull_results,
)
from publisher.broker import PublisherBroker
from publisher.history_reader import RecentRequests
from publisher.replies import (
    DEFAULT_ANSWER_MEMORY,
    REQUESTS_REMEMBERED,
    AnswerMemory,
    AnswersForgotten,
    Event,
    ReplyBook,
)
from publisher.report import PruneReport, PullReport, StatusReport, WarmReport
from publisher.roster import NodeInfo, Roster, RosterBook
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
MAX_WARM_IMAGES = REQUESTS_REMEMBERED
"""At most this many images in one :meth:`Publisher.warm` (their answers are all kept)."""


@dataclass(frozen=True)
class Survey:
    """What :meth:`Publisher.survey` found: the roster, and a report per image asked."""

    roster: Roster
    """Every node seen lately, those leaving included."""
    reports: tuple[StatusReport, ...]


@dataclass(frozen=True)
class KnownRequest:
    request_id: str
    image: str | None
    results: tuple[NodeResult, ...]
    """One per node that answered so far, sorted by node."""
    status_only: int = 0
    """How many of them were kept as node and status only (the answer memory was full)."""


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
    longer in the roster. ``answer_memory``: bytes of answers kept (estimated), defaults to
    ``PULLER_ANSWER_MEMORY_MB`` (see :mod:`publisher.replies`).
    """

    def __init__(
        self,
        amqp_url: str | None = None,
        *,
        connect_timeout: float = 5.0,
        roster_max_age: float = DEFAULT_ROSTER_MAX_AGE,
        tls: BrokerTls | None = None,
        policy: ImagePolicy | None = None,
        answer_memory: int | None = None,
    ) -> None:
        unsaid = (amqp_url, tls, policy, answer_memory)
        env = PublisherSettings.from_env() if None in unsaid else None
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
        if answer_memory is None:
            answer_memory = env.answer_memory_mb * 2**20 if env else DEFAULT_ANSWER_MEMORY
        self._replies = ReplyBook(budget=answer_memory)
        self._roster_book = RosterBook()
        self._invalid_presence = 0
        self._broker = PublisherBroker(
            self.amqp_url, connect_timeout, self._replies.receive, tls=tls
        )
        self._history: RecentRequests | None = None
        self._history_lock = threading.Lock()
        self._wait = AnswerWait(self._replies, self._broker, self.roster, self._roster_names)

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
    def history_unrouted(self) -> int:
        """Requests since this publisher started that reached the live nodes but not the
        history (RabbitMQ could not route the copy, however often it was sent again): a
        node away then does not catch up on them. Each is also logged, with its id."""
        return self._broker.history_unrouted

    @property
    def history_resent(self) -> int:
        """History copies RabbitMQ could not route at first (as just after a broker restart)
        and that were sent again."""
        return self._broker.history_resent

    @property
    def connection_problem(self) -> str:
        """Why the last attempt to connect failed, or the connection was lost."""
        return self._broker.last_error

    def connect(self, timeout: float) -> bool:
        """Opens the connection now (it opens on first use otherwise); whether it is open
        within ``timeout`` seconds."""
        return self._broker.wait_connected(timeout)

    def known_request(self, request_id: str) -> KnownRequest | None:
        """An earlier request of this publisher: its image and the answers so far; ``None``
        if it is not one. Raises :class:`AnswersForgotten` if its answers were forgotten
        (the last 1,000 requests are kept, within ``answer_memory`` bytes)."""
        found = self._replies.lookup(request_id)
        if found is None:
            if self._replies.forgot(request_id):
                raise AnswersForgotten(request_id, self._replies.memory().budget)
            return None
        image, results = found
        pulled = pull_results(results)
        ordered = tuple(pulled[node] for node in sorted(pulled))
        return KnownRequest(request_id, image, ordered, self._replies.status_only(request_id))

    def answer_memory(self) -> AnswerMemory:
        """What the memory of answers holds now (bytes, requests) and gave up since start."""
        return self._replies.memory()

    def nodes(self) -> list[NodeInfo]:
        """The live nodes: those whose worker announced itself within ``roster_max_age``, or
        within the longer interval it declared (a node of a large cluster announces rarely)."""
        return self.roster().nodes

    def roster(self, *, leaving: bool = False) -> Roster:
        """:meth:`nodes`, and whether the list is complete: a flooded presence stream is
        answered from what was read of it, with a note saying so, rather than not at all.
        With ``leaving``, the nodes whose latest word is "leaving" are in it too."""
        return self._roster(at=time.time(), leaving=leaving)

    def _roster(self, at: float, leaving: bool = False) -> Roster:
        """The nodes alive at ``at`` (Unix time) whose latest announcement is not "leaving"
        (with ``leaving``: whatever it is): announced within ``roster_max_age`` before, or
        within the longer wait a node of a large cluster declares (see
        :meth:`NodePresence.silent_after`).

        The presence stream is followed into memory from the first call on, first from as
        far back as the longest wait a node may declare; each call waits for what was
        announced before it (see :meth:`PublisherBroker.sync_presence`)."""
        book = self._roster_book
        back = max(self.roster_max_age, PRESENCE_MISSES * MAX_PRESENCE_INTERVAL)
        sync = self._broker.sync_presence(book, at - back, timeout=self._connect_timeout)
        invalid = self._broker.invalid_presence()
        if invalid > self._invalid_presence:
            log.warning(
                "ignored presence messages that break the contract",
                count=invalid - self._invalid_presence,
            )
            self._invalid_presence = invalid
        since, max_age = at - self.roster_max_age, self.roster_max_age
        nodes = book.announcements(since, max_age) if leaving else book.roster(since, max_age)
        notes = []
        if not sync.complete:
            busiest = book.busiest()
            by = f"; most from user {busiest[0]!r}" if busiest and busiest[0] else ""
            notes.append(
                f"the presence stream is flooded ({sync.read} messages in {sync.seconds:.1f}s"
                f"{by}): these are the nodes "
                + (
                    "followed until a moment ago"
                    if sync.live
                    else "read from it so far, which may miss some"
                )
            )
        if book.turned_away:
            notes.append(
                f"{book.turned_away} announcement(s) of yet more nodes were not kept: the "
                f"roster holds at most {book.max_nodes} nodes"
            )
        if not notes:
            return Roster(nodes)
        note = "; ".join(notes)
        log.warning("the roster may be incomplete", reason=note)
        return Roster(nodes, complete=False, note=note)

    def asked_lately(self, window: float) -> tuple[list[tuple[str, float]], str | None]:
        """The images any publisher asked the fleet for in the last ``window`` seconds, read
        from the history stream: ``(image, requested_at)``, the most recent first; and why
        the history cannot be read, if it cannot (its user may not read the stream, say).
        The first call starts the reading (from ``window`` back): it returns what was read
        so far, later calls the rest."""
        with self._history_lock:
            if self._history is None:
                self._history = RecentRequests(self._broker, window)
            history = self._history
        return history.images(), history.problem

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
        the request into the workers' logs. Nodes send no progress reports for it.
        """
        request = PullRequest.new(self.check(image), session_id, progress=False)
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
        refresh: bool = False,
    ) -> PullReport:
        """Requests ``image`` and waits, at most ``timeout`` seconds, for the nodes' answers.

        With ``refresh``, nodes that have an image of that name pull it again, so that a
        tag moved in the registry is followed: a node whose image did not change answers
        ``present``, one that got the new image ``pulled``.

        Waits for ``expect`` nodes, or for the ``nodes`` named, or (neither given) for
        every node in the roster. An expected node that does not answer in time is in the
        report with status ``no_reply`` (with ``expect``, the roster's nodes that did not
        answer are named). ``on_progress`` and ``on_result`` are called on this thread;
        nodes send progress reports only when ``on_progress`` is given.

        Once published, the request survives a lost connection: within ``timeout`` the
        publisher reconnects and publishes the request again (same id), so that nodes
        whose answers were lost answer again; the report's ``notes`` say so.
        """
        reference = self.check(image)
        wanted, roster_notes = self._wait.wanted(expect, nodes)
        began = time.time()
        started = time.monotonic()
        request = PullRequest.new(reference, refresh=refresh, progress=on_progress is not None)
        epoch = self._publish(request, watch=True)
        try:
            collected, notes = self._wait.collect(
                request, epoch, expect, wanted, started + timeout, on_progress, on_result
            )
        finally:
            self._replies.unwatch(request.request_id)
        rows = self._wait.rows(request, collected, expect, wanted, began, started, notes)
        return PullReport(
            request_id=request.request_id,
            image=str(reference),
            nodes=rows,
            expected=expect if expect is not None else (len(wanted) if wanted else None),
            notes=(*roster_notes, *notes),
            wanted=frozenset(wanted) if wanted is not None else None,
        )

    def status(
        self,
        image: str | ImageReference,
        *,
        expect: int | None = None,
        nodes: Iterable[str] | None = None,
        timeout: float = 10.0,
    ) -> StatusReport:
        """Asks every node whether it has ``image``, pulling nothing: per node ``present``
        (image id, digest), ``absent``, ``failed`` or ``no_reply``. Nodes whose digests
        differ for the same name are the report's :attr:`~StatusReport.drift`. Which nodes
        are waited for: as :meth:`pull`."""
        reference = self.check(image)
        wanted, roster_notes = self._wait.wanted(expect, nodes)
        began = time.time()
        started = time.monotonic()
        request = CheckRequest.new(reference)
        epoch = self._publish(request, history=False, hold=True)
        try:
            collected, notes = self._wait.collect(request, epoch, expect, wanted, started + timeout)
        finally:
            self._replies.release(request.request_id)
        rows = self._wait.rows(request, collected, expect, wanted, began, started, notes)
        return StatusReport(
            request_id=request.request_id,
            image=str(reference),
            nodes=rows,
            notes=(*roster_notes, *notes),
        )

    def survey(self, images: Iterable[str | ImageReference], *, timeout: float = 2.0) -> Survey:
        """Asks every node about each of ``images`` at once (a check each, pulling nothing),
        and waits at most ``timeout`` seconds in all for the nodes that are up: a status
        report per image (as :meth:`status`), from one roster read, which keeps the nodes
        that are leaving too. Every image is checked first (raises as :meth:`check`)."""
        references = list(dict.fromkeys(self.check(image) for image in images))
        roster = self.roster(leaving=True)
        wanted = {info.node for info in roster.nodes if info.state is NodeState.UP}
        requests = [CheckRequest.new(reference) for reference in references]
        started = time.monotonic()
        published = set()
        try:
            for request in requests if wanted else ():
                try:
                    self._publish(request, history=False, hold=True)
                except NoNodes:
                    break  # every worker is gone: nobody can answer the rest either
                published.add(request.request_id)
            answers = {
                request_id: self._replies.wait(
                    request_id, lambda r: wanted <= r.keys(), started + timeout
                )
                for request_id in published
            }
        finally:
            for request_id in published:
                self._replies.release(request_id)
        reports = []
        for request in requests:
            answered = pull_results(answers.get(request.request_id, {}))
            waited = round(time.monotonic() - started, 6)
            silent = [
                NodeResult(request.request_id, node, str(request.image), Status.NO_REPLY, waited)
                for node in sorted(wanted - answered.keys())
            ]
            rows = tuple(sorted([*answered.values(), *silent], key=lambda r: r.node))
            reports.append(StatusReport(request.request_id, str(request.image), rows))
        return Survey(roster, tuple(reports))

    def warm(
        self,
        images: Iterable[str | ImageReference],
        *,
        expect: int | None = None,
        nodes: Iterable[str] | None = None,
        timeout: float = 3600.0,
        on_update: Callable[[WarmReport], None] | None = None,
        progress: bool = True,
        on_event: Callable[[NodeProgress | NodeResult], None] | None = None,
    ) -> WarmReport:
        """Puts every image of ``images`` on every node, behind any session's pull: each
        node works through them at its ``PULLER_MAX_CONCURRENT_PULLS``, and starts a
        session's pull (:meth:`request`, :meth:`pull`) before any warm-up still queued.

        Every image is checked before anything is published (an invalid or forbidden one
        raises, nothing is sent). Waits at most ``timeout`` seconds for every node to
        answer for every image; ``on_update`` gets the report so far about twice a second
        (progress per node: images answered, bytes). Which nodes are waited for: as
        :meth:`pull`. With ``progress=False`` nodes send no progress reports (a few a second
        each while they pull) and the report's bytes stay 0. ``on_event`` gets each progress
        report and answer as it is handed over (on this thread).
        """
        references = list(dict.fromkeys(self.check(image) for image in images))
        if not references:
            raise ValueError("no image to warm up")
        if len(references) > MAX_WARM_IMAGES:
            raise ValueError(
                f"{len(references)} images; at most {MAX_WARM_IMAGES} in one warm-up "
                "(split the list)"
            )
        wanted, roster_notes = self._wait.wanted(expect, nodes)
        began = time.time()
        started = time.monotonic()
        deadline = started + timeout
        requests = [
            PullRequest.new(reference, lane=Lane.WARM, progress=progress)
            for reference in references
        ]
        report = WarmReport.start(tuple(str(r) for r in references), expect, wanted)

        def take(event: Event) -> None:
            report.take(event)
            if on_event is not None and not isinstance(event, PruneResult):
                on_event(event)

        try:
            for request in requests:
                self._publish(request, watch=True)
            pending = [request.request_id for request in requests]
            while pending:
                self._replies.wait(pending[0], lambda _: False, deadline, wake_every=WAKE_INTERVAL)
                for request_id in pending:
                    # Hands over what came (progress and answers) without waiting.
                    self._replies.wait(request_id, lambda _: True, 0.0, take)
                pending = [request_id for request_id in pending if not report.finished(request_id)]
                if on_update is not None:
                    on_update(report)
                if time.monotonic() >= deadline:
                    break
        finally:
            for request in requests:
                self._replies.unwatch(request.request_id)
        notes: list[str] = []
        silent, _ = self._wait.silent(
            expect, wanted, report.nodes_answered(), began, started, notes
        )
        return report.finish(
            requests=tuple(request.request_id for request in requests),
            silent=frozenset(silent),
            notes=(*roster_notes, *notes),
        )

    def prune(
        self,
        unused_for: float,
        *,
        keep: Iterable[str | ImageReference] = (),
        dry_run: bool = False,
        expect: int | None = None,
        nodes: Iterable[str] | None = None,
        timeout: float = 120.0,
    ) -> PruneReport:
        """Asks every node to remove the images it has not used for ``unused_for`` seconds,
        oldest-unused first, never one a container (running or stopped) uses, never one in
        ``keep``; with ``dry_run``, each node only says what it would remove. Which nodes
        are waited for: as :meth:`pull`."""
        if unused_for < 0:
            raise ValueError("unused_for must be 0 or more seconds")
        kept = tuple(dict.fromkeys(_reference(image) for image in keep))
        if len(kept) > MAX_KEEP_IMAGES:
            raise ValueError(f"{len(kept)} images to keep; at most {MAX_KEEP_IMAGES}")
        wanted, roster_notes = self._wait.wanted(expect, nodes)
        began = time.time()
        started = time.monotonic()
        request = PruneRequest.new(unused_for, kept, dry_run)
        epoch = self._publish(request, history=False, hold=True)
        try:
            collected, notes = self._wait.collect(request, epoch, expect, wanted, started + timeout)
        finally:
            self._replies.release(request.request_id)
        silent, _ = self._wait.silent(expect, wanted, collected.keys(), began, started, notes)
        return PruneReport(
            request_id=request.request_id,
            dry_run=dry_run,
            answers=tuple(collected[node] for node in sorted(collected)),
            no_reply=tuple(sorted(silent)),
            notes=(*roster_notes, *notes),
        )

    def results(
        self, request_id: str, *, expect: int | None = None, timeout: float = 0.0
    ) -> tuple[NodeResult, ...]:
        """The answers so far to an earlier request, waiting up to ``timeout`` for ``expect``.

        Answers to the last 1,000 requests of this publisher are kept, within
        ``answer_memory`` bytes; raises :class:`AnswersForgotten` for one whose answers were
        forgotten.
        """

        def enough(results: Mapping[str, object]) -> bool:
            return expect is not None and len(results) >= expect

        answered = pull_results(self._replies.wait(request_id, enough, time.monotonic() + timeout))
        return tuple(answered[node] for node in sorted(answered))

    def _publish(
        self,
        request: PullRequest | CheckRequest | PruneRequest,
        watch: bool = False,
        history: bool = True,
        hold: bool = False,
    ) -> int:
        """Publishes ``request``; returns the connection's epoch it was published in: a
        reconnection after that may have lost its answers."""
        image = None if isinstance(request, PruneRequest) else str(request.image)
        self._replies.track(request.request_id, image, watch=watch, hold=hold)
        try:
            epoch = self._broker.publish_request(
                request.encode(), request.request_id, history=history
            )
        except NoNodes as error:
            if watch:
                self._replies.unwatch(request.request_id)
            if hold:
                self._replies.release(request.request_id)
            raise NoNodes(str(error), request.request_id) from None
        log.debug("requested", request_id=request.request_id, type=request.TYPE, image=image)
        return epoch

    def _roster_names(self, at: float) -> set[str]:
        try:
            return {info.node for info in self._roster(at).nodes}
        except BrokerUnavailable:
            return set()


def _reference(image: str | ImageReference) -> ImageReference:
    return image if isinstance(image, ImageReference) else parse_reference(image)
