"""What the fleet page shows, kept by the gateway: the images to show, the survey of the fleet
(cached, so that any number of open pages cost one survey every :data:`FLEET_MAX_AGE`
seconds), and the page's actions.

The board talks to RabbitMQ over a publisher of its own (its own connection and reply
book), made on first use: its checks never queue behind, or push out, the answers that
``/pull_images`` and ``GET /pulls/{id}`` rely on. A page's poll never waits for a survey
once one exists: it gets the last one, and starts the next in the background if it is old.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from contract import (
    BrokerUnavailable,
    ImageReference,
    NodeProgress,
    NodeResult,
    NodeState,
    Pulling,
    Status,
)
from gateway.fleet_matrix import fleet_matrix
from publisher import Publisher
from publisher.client import MAX_WARM_IMAGES, Survey
from publisher.report import StatusReport

log = structlog.get_logger("gateway.fleet")

FLEET_MAX_AGE = 2.0
"""Seconds a survey is served for before a poll starts the next one."""
SURVEY_TIMEOUT = 1.5
"""Seconds a survey waits for the nodes' answers (a node that misses it shows "no answer")."""
MAX_IMAGES = 100
"""Images in a survey at most: those named by pages first, then the most recently asked."""
HISTORY_WINDOW = 3600.0
"""Seconds back that the history is read for the images asked lately."""
ASKED_FRESH = 600.0
"""Seconds after it was asked that a node without the image shows "asked, not there yet"
rather than "absent" (a failure is answered to whoever asked, not to the page)."""
NAMED_FOR = 60.0
"""Seconds an image a page named stays in the survey without being named again."""
MAX_ACTIONS = 4
"""Actions (a warm-up, a refresh, a check) running at once; more get 503."""
PULLING_FORGOTTEN = 300.0
"""Seconds after which a pull the page started and heard nothing of is no longer shown."""
FAILURE_FORGOTTEN = 600.0
"""Seconds a failure of a pull the page started stays shown (unless the image arrives)."""
ACTION_TIMEOUT = 600.0
"""Seconds a warm-up or refresh started from the page waits for its answers at most."""
CHECK_TIMEOUT = 5.0
MAX_TRACKED = 100_000
"""(image, node) pairs of the page's own pulls followed at most (progress, failures)."""
SETTLED_RECHECK = 10.0
"""Seconds between checks of an image every node that is up has (settled: only a tag moved
by hand, or a prune, changes that); the others are checked at every survey."""
SOON = 0.5
"""Seconds after an action's answer that a poll starts a survey to show it."""


class ActionRefused(Exception):
    """An action that cannot run: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class FleetBoard:
    """Safe from every server thread at once."""

    def __init__(
        self,
        make_publisher: Callable[[], Publisher],
        *,
        actions: bool = False,
        max_age: float = FLEET_MAX_AGE,
        survey_timeout: float = SURVEY_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        on_survey: Callable[[int], None] | None = None,
    ) -> None:
        """``on_survey``: told how many images each survey checked (the gateway's metrics)."""
        self.actions = actions
        self._on_survey = on_survey
        self._make_publisher = make_publisher
        self._publisher: Publisher | None = None
        self._max_age = max_age
        self._survey_timeout = survey_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, float] = OrderedDict()
        """Images asked through this gateway, with when (Unix time)."""
        self._named: OrderedDict[str, float] = OrderedDict()
        """Images pages named, with when (``clock()``) they last did."""
        self._pulling: dict[tuple[str, str], tuple[Pulling, float]] = {}
        """The page's pulls in flight, by (image, node), with when last heard of."""
        self._failures: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._body: bytes | None = None
        self._made = 0.0
        self._refreshing = False
        self._first = threading.Event()
        self._running_actions = threading.BoundedSemaphore(MAX_ACTIONS)
        self._checked: dict[str, tuple[StatusReport, float]] = {}
        """The last report on each image shown, and when (``clock()``) its survey began."""
        self._up: set[str] = set()
        """The nodes up at the last survey."""
        self.surveys = 0
        """Surveys made since the start (what the page's polls cost RabbitMQ and the nodes)."""
        self.checks = 0
        """Images checked in them (each is a message to every node, and an answer from each)."""

    # -- what to show ----------------------------------------------------------------------------

    def asked(self, image: str) -> None:
        """An image someone asked the fleet for (``/pull_images``, ``POST /pulls``): cheap,
        called on the hot path."""
        now = time.time()
        with self._lock:
            self._recent[image] = now
            self._recent.move_to_end(image)
            if len(self._recent) > MAX_IMAGES:
                self._recent.popitem(last=False)

    def name(self, images: Iterable[ImageReference]) -> None:
        """Images a page asks to see (checked against the policy by the caller)."""
        now = self._clock()
        with self._lock:
            for image in images:
                self._named[str(image)] = now
                self._named.move_to_end(str(image))
            while len(self._named) > MAX_IMAGES:
                self._named.popitem(last=False)

    def _images(self, history: list[tuple[str, float]]) -> tuple[list[str], dict[str, float]]:
        """The images to survey (named ones, then the most recently asked, here or in
        ``history``), and when each asked one was last asked (Unix time)."""
        now = self._clock()
        with self._lock:
            for image, when in list(self._named.items()):
                if now - when > NAMED_FOR:
                    del self._named[image]
            named = list(self._named)  # in the order the pages name them
            asked = dict(self._recent)
        for image, when in history:
            asked[image] = max(when, asked.get(image, 0.0))
        recent = sorted(asked, key=lambda image: asked[image], reverse=True)
        return list(dict.fromkeys([*named, *recent]))[:MAX_IMAGES], asked

    # -- the survey ------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The page's JSON document: the last survey's, at most ``max_age`` old when a poll
        comes often enough (an older one starts the next survey, in the background). The
        first call waits for the first survey."""
        with self._lock:
            stale = self._body is None or self._clock() - self._made >= self._max_age
            if stale and not self._refreshing:
                self._refreshing = True
                threading.Thread(target=self._refresh, name="fleet-survey", daemon=True).start()
            body = self._body
        if body is None:
            self._first.wait(self._survey_timeout + 10.0)
            body = self._body
        return body or _document({"error": "the first survey of the fleet is not done yet"})

    def refresh_soon(self) -> None:
        """A poll from :data:`SOON` seconds on starts a survey (an action changed what the
        nodes have), not one every poll however many answers come."""
        with self._lock:
            self._made = min(self._made, self._clock() - self._max_age + SOON)

    def _refresh(self) -> None:
        started = self._clock()
        try:
            body = self._survey(started)
        except Exception as error:  # the page says why; the next poll tries again
            if not isinstance(error, BrokerUnavailable):
                log.exception("the fleet survey failed")
            body = _document({"error": f"the fleet could not be surveyed: {error}"})
        with self._lock:
            self._body, self._made, self._refreshing = body, started, False
        self._first.set()

    def _survey(self, started: float) -> bytes:
        publisher = self._publisher_now()
        history, problem = publisher.asked_lately(HISTORY_WINDOW)
        images, asked = self._images(history)
        with self._lock:
            due = [image for image in images if self._due(image, started)]
        fresh = publisher.survey(due, timeout=self._survey_timeout)
        self.surveys += 1
        self.checks += len(due)
        if self._on_survey is not None:
            self._on_survey(len(due))
        now = self._clock()
        with self._lock:
            for report in fresh.reports:
                self._checked[report.image] = (report, started)
            self._checked = {i: self._checked[i] for i in images if i in self._checked}
            self._up = {n.node for n in fresh.roster.nodes if n.state is NodeState.UP}
            checked = list(self._checked.values())
        survey = Survey(fresh.roster, tuple(report for report, _ in checked))
        present = {
            (report.image, r.node): when
            for report, when in checked
            for r in report.nodes
            if r.status in (Status.PRESENT, Status.PULLED)
        }
        with self._lock:
            for key, (_, heard) in list(self._pulling.items()):
                if present.get(key, -1.0) > heard or now - heard > PULLING_FORGOTTEN:
                    del self._pulling[key]
            for key, (_, _, when) in list(self._failures.items()):
                if present.get(key, -1.0) > when or now - when > FAILURE_FORGOTTEN:
                    del self._failures[key]
            pulling = {key: value for key, (value, _) in self._pulling.items()}
            failures = {key: (kind, message) for key, (kind, message, _) in self._failures.items()}
        wall = time.time()
        lately = {image: wall - when for image, when in asked.items() if wall - when <= ASKED_FRESH}
        document = fleet_matrix(survey, pulling, failures, asked=lately)
        if problem is not None:
            document["notes"].append(
                f"{problem}: the images shown are those asked through this gateway (give its "
                "user read on puller.history.stream to see everyone's, docs/security.md)"
            )
        document["actions"] = self.actions
        document["generated_at"] = time.time()
        return _document(document)

    def _due(self, image: str, now: float) -> bool:
        """Whether ``image`` is checked in this survey: always, unless every node that is
        up had it at the last check, less than :data:`SETTLED_RECHECK` ago."""
        known = self._checked.get(image)
        if known is None:
            return True
        report, when = known
        settled = bool(self._up) and self._up <= {r.node for r in report.present}
        return not settled or now - when >= SETTLED_RECHECK

    def _recheck(self, images: Iterable[ImageReference]) -> None:
        """The next survey checks ``images`` (an action on them may have changed them)."""
        with self._lock:
            for image in images:
                self._checked.pop(str(image), None)

    def _publisher_now(self) -> Publisher:
        with self._lock:
            if self._publisher is None:
                self._publisher = self._make_publisher()
            return self._publisher

    def close(self) -> None:
        with self._lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()

    # -- actions ---------------------------------------------------------------------------------

    def act(self, action: str, images: list[ImageReference]) -> tuple[int, dict[str, Any]]:
        """Runs an action on ``images`` (already checked against the image policy): ``warm``
        and ``refresh`` start in the background (202), ``check`` answers the nodes' status
        (200). Raises :class:`ActionRefused`."""
        if not self.actions:
            raise ActionRefused(
                403, "the fleet page's actions are off (PULLER_HTTP_FLEET_ACTIONS=false)"
            )
        if action not in ("warm", "refresh", "check"):
            raise ActionRefused(400, "invalid argument: :action must be warm, refresh or check")
        if not images:
            raise ActionRefused(400, "invalid argument: :images names no image")
        if action != "warm" and len(images) != 1:
            raise ActionRefused(400, f"invalid argument: {action} takes one image")
        if len(images) > MAX_WARM_IMAGES:
            raise ActionRefused(
                400, f"{len(images)} images; at most {MAX_WARM_IMAGES} in one warm-up"
            )
        if not self._running_actions.acquire(blocking=False):
            raise ActionRefused(
                503, f"{MAX_ACTIONS} actions are running already; try again when one ends"
            )
        for image in images:
            self.asked(str(image))
        self._recheck(images)
        if action == "check":
            try:
                report = self._publisher_now().status(images[0], timeout=CHECK_TIMEOUT)
            except BrokerUnavailable as error:
                raise ActionRefused(503, str(error)) from None
            finally:
                self._running_actions.release()
            self.refresh_soon()
            return 200, report.to_json()
        work = self._warm if action == "warm" else self._refresh_image
        threading.Thread(
            target=self._run_action, args=(work, images), name=f"fleet-{action}", daemon=True
        ).start()
        log.info("fleet page action started", action=action, images=[str(i) for i in images])
        return 202, {"action": action, "images": [str(image) for image in images]}

    def _run_action(
        self, work: Callable[[list[ImageReference]], None], images: list[ImageReference]
    ) -> None:
        try:
            work(images)
        except Exception:
            log.exception("a fleet page action failed")
        finally:
            self._running_actions.release()
            self._recheck(images)
            self.refresh_soon()

    def _warm(self, images: list[ImageReference]) -> None:
        self._publisher_now().warm(images, timeout=ACTION_TIMEOUT, on_event=self._heard)

    def _refresh_image(self, images: list[ImageReference]) -> None:
        self._publisher_now().pull(
            images[0],
            refresh=True,
            timeout=ACTION_TIMEOUT,
            on_progress=self._heard,
            on_result=self._heard,
        )

    def _heard(self, event: NodeProgress | NodeResult) -> None:
        """A progress report or answer to a pull the page started."""
        key, now = (event.image, event.node), self._clock()
        with self._lock:
            if key not in self._pulling and len(self._pulling) + len(self._failures) >= MAX_TRACKED:
                return
            if isinstance(event, NodeProgress):
                self._pulling[key] = (Pulling(event.done, event.total), now)
                return
            if event.status is Status.FAILED:
                self._pulling.pop(key, None)
                kind = event.error.kind.value if event.error else "unknown"
                self._failures[key] = (kind, event.error.message if event.error else "", now)
            elif key in self._pulling:  # done: shown full until a survey sees it present
                total = max(self._pulling[key][0].total, 1)
                self._pulling[key] = (Pulling(total, total), now)
        self.refresh_soon()


def _document(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
