"""Waiting for the nodes' answers to one request: which nodes to wait for, the wait itself
(asking again when the connection was lost and opened again), and the rows of a report,
``no_reply`` for an expected node that did not answer. :class:`publisher.client.Publisher`
publishes; this waits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from contract import (
    BrokerUnavailable,
    CheckRequest,
    NodeProgress,
    NodeResult,
    NoNodes,
    PruneRequest,
    PullRequest,
    Status,
)
from publisher.broker import PublisherBroker
from publisher.replies import Answer, Event, ReplyBook
from publisher.roster import Roster

log = logging.getLogger("puller.publisher.wait")

WAKE_INTERVAL = 0.5
"""Seconds between looks at the connection while waiting for answers."""

ProgressCallback = Callable[[NodeProgress], None]
ResultCallback = Callable[[NodeResult], None]


class AnswerWait:
    """Waits on ``replies`` for the answers that come through ``broker``. ``roster``: the
    nodes up now; ``roster_at``: the names of those that were up at a Unix time (empty when
    RabbitMQ cannot be asked)."""

    def __init__(
        self,
        replies: ReplyBook,
        broker: PublisherBroker,
        roster: Callable[[], Roster],
        roster_at: Callable[[float], set[str]],
    ) -> None:
        self._replies = replies
        self._broker = broker
        self._roster = roster
        self._roster_at = roster_at

    def wanted(
        self, expect: int | None, nodes: Iterable[str] | None
    ) -> tuple[set[str] | None, list[str]]:
        """The nodes to wait for by name (``None``: a count, or nobody), and notes about
        them for the report (an incomplete roster)."""
        if expect is not None and nodes is not None:
            raise ValueError("give expect or nodes, not both")
        if expect is not None and expect < 1:
            raise ValueError("expect must be at least 1")
        if nodes is not None:
            wanted = set(nodes)
            if not wanted:
                raise ValueError("nodes names no node")
            return wanted, []
        if expect is None:
            roster = self._roster()
            return {info.node for info in roster.nodes}, [roster.note] if roster.note else []
        return None, []

    def rows(
        self,
        request: PullRequest | CheckRequest,
        collected: dict[str, Answer],
        expect: int | None,
        wanted: set[str] | None,
        began: float,
        started: float,
        notes: list[str],
    ) -> tuple[NodeResult, ...]:
        """One row per node that answered, and a ``no_reply`` row per expected node that
        did not, sorted by node."""
        answered = pull_results(collected)
        silent, waited = self.silent(expect, wanted, answered.keys(), began, started, notes)
        image = str(request.image)
        no_reply = [
            NodeResult(request.request_id, node, image, Status.NO_REPLY, waited)
            for node in sorted(silent)
        ]
        return tuple(sorted([*answered.values(), *no_reply], key=lambda r: r.node))

    def silent(
        self,
        expect: int | None,
        wanted: set[str] | None,
        answered: Iterable[str],
        began: float,
        started: float,
        notes: list[str],
    ) -> tuple[set[str], float]:
        """The expected nodes that did not answer (by name, where known), and the seconds
        waited; a note when only a count was known."""
        answered = set(answered)
        waited = round(time.monotonic() - started, 6)
        missing = (expect - len(answered)) if expect is not None else 0
        silent = set(wanted or ())
        if expect is not None and missing > 0:
            # Who was there when the request began? Asked only now, and only when someone
            # is missing: the roster costs a stream read the common case need not pay.
            silent = self._roster_at(began)
            if not silent - answered:
                notes.append(
                    f"only a count was known: {missing} of {expect} expected node(s) did not "
                    "answer, and the roster named none that was silent"
                )
        return silent - answered, waited

    def collect(
        self,
        request: PullRequest | CheckRequest | PruneRequest,
        epoch: int,
        expect: int | None,
        wanted: set[str] | None,
        deadline: float,
        on_progress: ProgressCallback | None = None,
        on_result: ResultCallback | None = None,
    ) -> tuple[dict[str, Answer], list[str]]:
        """Waits for the answers, reconnecting and asking again if the connection is lost."""
        history = isinstance(request, PullRequest)

        def done(results: Mapping[str, object]) -> bool:
            if expect is not None:
                return len(results) >= expect
            return bool(wanted) and wanted is not None and wanted <= results.keys()

        def hand_over(event: Event) -> None:
            if isinstance(event, NodeProgress):
                if on_progress is not None:
                    on_progress(event)
            elif on_result is not None and isinstance(event, NodeResult):
                on_result(event)

        # Woken for every event only when there is someone to hand them to; else once, when
        # the answers are complete (a wake-up for each node's reply cost a thread switch each).
        on_event = hand_over if on_progress is not None or on_result is not None else None
        asked_again, lost_at = 0, None
        while True:
            results = self._replies.wait(
                request.request_id, done, deadline, on_event, wake_every=WAKE_INTERVAL
            )
            if done(results) or time.monotonic() >= deadline:
                break
            if not self._broker.connected:
                lost_at = lost_at or time.monotonic()
                self._broker.wait_connected(min(WAKE_INTERVAL, deadline - time.monotonic()))
            elif self._broker.epoch != epoch:
                epoch, lost_at = self._broker.epoch, None
                asked_again += 1
                log.info("reconnected while waiting; asking again (request %s)", request.request_id)
                try:
                    epoch = self._broker.publish_request(
                        request.encode(), request.request_id, history=history
                    )
                except (NoNodes, BrokerUnavailable) as error:
                    log.info("asking again failed (request %s): %s", request.request_id, error)
        return results, self._notes(request.request_id, asked_again, lost_at)

    def _notes(self, request_id: str, asked_again: int, lost_at: float | None) -> list[str]:
        notes = []
        status_only = self._replies.status_only(request_id)
        if status_only:
            notes.append(
                f"{status_only} answer(s) were kept as node and status only (no image id, "
                "digest, seconds or error message): this publisher's answer memory "
                f"(PULLER_ANSWER_MEMORY_MB, {self._replies.memory().budget / 2**20:g} MB) was full"
            )
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
        return notes


def pull_results(answers: dict[str, Answer]) -> dict[str, NodeResult]:
    """The answers that are results of a pull or check (a node that answers a pull with a
    prune's answer breaks the contract: it is left out)."""
    return {node: answer for node, answer in answers.items() if isinstance(answer, NodeResult)}
