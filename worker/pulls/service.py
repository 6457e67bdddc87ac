"""What a worker does with a pull request, free of pika and the docker SDK.

:meth:`PullService.submit` takes a decoded request and a callback; it answers with one
``NodeResult`` through that callback, whoever asked (a live request, a replay from the
history, a test). What is done with the result is the caller's business.

Where each step runs:

- the caller's thread (the connection's): images known from memory are answered at once
  (``present``, or ``not_found`` seen moments ago), with no engine call and no thread hop;
- an inspect thread: asks the engine whether the image is there;
- a pull thread: one of ``slots`` (see :mod:`worker.pulls.slots`), fair between registries; a
  request for an image already being pulled joins that pull. A transient failure gives
  its slot back while it waits to retry. A registry known to be down fails fast
  (:mod:`worker.pulls.registry_health`).

Every ``present`` and ``pulled`` is claimed first (:mod:`worker.pulls.image_guard`), so that it
never crosses a prune: an image being removed is pulled again and answered ``pulled``.

Nothing a request contains can raise out of this module: a worker never dies on a message.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import structlog

from contract import (
    CheckRequest,
    ErrorKind,
    ImageReference,
    Lane,
    NodeProgress,
    NodeResult,
    PullFailed,
    PullRequest,
    Status,
)
from worker.admission import Admission, RequestLimiter
from worker.pulls.image_guard import ImageGuard
from worker.pulls.observers import PullObserver
from worker.pulls.owed import DeferredFile, DeferredPull
from worker.pulls.registry_health import NotFoundMemory, RegistryBreaker, says_registry_silent
from worker.pulls.slots import PullSlots
from worker.stores.contract import ImageInfo, ImageStore, InterruptibleStore, PullProgress

log = structlog.get_logger("worker.service")

AnswerCallback = Callable[[NodeResult], None]
"""Receives a request's one result, on whatever thread produced it."""
ProgressCallback = Callable[[NodeProgress], None]

INSPECT_THREADS = 4
ENGINE_WATCH_INTERVAL = 5.0
"""Seconds between looks at an engine that was away, while images wait for it."""
DEFERRED_LIMIT = 1000
OWED_MAX_TRIES = 20
"""Times an owed pull is made again and meets the store away once more (while the store
answers questions) before it is given up: an image whose pull takes the store down."""
OWED_MAX_AGE = 24 * 3600.0
"""Seconds an owed pull is kept, over restarts: older ones are given up."""
"""Images that failed because the engine was away, kept to pull when it is back."""
PROGRESS_INTERVAL = 0.25
"""Seconds between progress messages for one pull: at most four a second per node."""
PULL_AGAIN_LIMIT = 5
"""Times a pull is made again because pruning removed the image as it came: then it fails."""

TRANSIENT_KINDS = frozenset(
    {
        ErrorKind.REGISTRY_UNREACHABLE,
        ErrorKind.REGISTRY_ERROR,
        ErrorKind.STALLED,
        ErrorKind.ENGINE_UNAVAILABLE,
    }
)
"""Failures that may pass by themselves, and so are retried; the others are answered at once.
An engine that cannot be reached is one being restarted, as often as not: answered at once,
the request was lost for this node (nothing asks again), found by the churn soak."""
REGISTRY_ANSWERED_KINDS = frozenset(
    {ErrorKind.NOT_FOUND, ErrorKind.UNAUTHORIZED, ErrorKind.REGISTRY_ERROR}
)
"""Failures that show the registry is up: it answered, if only to say no."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all. Between them a jittered wait (:meth:`wait`), so that the
    nodes that met the same failing registry do not all come back in the same instant."""

    attempts: int = 4
    first_delay: float = 1.0
    max_delay: float = 15.0
    uniform: Callable[[float, float], float] = field(
        default=random.uniform, compare=False, repr=False
    )
    """The random source: a number between its two arguments (a test passes its own)."""

    def delay(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1`` without jitter: ``first_delay`` seconds,
        doubling up to ``max_delay``."""
        return float(min(self.first_delay * 2 ** (attempt - 1), self.max_delay))

    def wait(self, previous: float | None) -> float:
        """The next wait, given the previous one of the same pull (``None`` for the first):
        decorrelated jitter, between ``first_delay`` and three times the previous wait, at
        most ``max_delay``. It grows about as the doubling does, never below the first."""
        low = min(self.first_delay, self.max_delay)
        high = max(low, 3 * (previous if previous is not None else low))
        return float(min(self.max_delay, self.uniform(low, high)))


class PullService:
    """Serves pull requests for one node."""

    def __init__(
        self,
        node: str,
        store: ImageStore,
        slots: int,
        retry: RetryPolicy | None = None,
        breaker: RegistryBreaker | None = None,
        not_found: NotFoundMemory | None = None,
        observer: PullObserver | None = None,
        admission: Admission | None = None,
        limiter: RequestLimiter | None = None,
        owed: DeferredFile | None = None,
        guard: ImageGuard | None = None,
    ) -> None:
        """``observer``: sees every outcome (none: nobody does); ``admission``: who may ask
        for what (every request); ``limiter``: a cap on live
        requests that would start a pull; ``owed``: where the pulls made again once the
        engine answers are kept, for a restart (see :meth:`resume_owed`); ``guard``: the
        one pruning uses too, so that answers and removals never cross."""
        self.node = node
        self._admission = admission or Admission()
        self._limiter = limiter
        self.observer: PullObserver = observer or PullObserver()
        self._store = store
        self._guard = guard or ImageGuard()
        self._retry = retry or RetryPolicy()
        self._breaker = breaker or RegistryBreaker(cooldown=0)
        self._not_found = not_found or NotFoundMemory(seconds=0)
        self._cancelling = threading.Event()
        self._inspectors = ThreadPoolExecutor(INSPECT_THREADS, thread_name_prefix="inspect")
        # Threads start only when a slot is granted; the extra room is for registries that
        # may start one pull while the others hold every slot (see worker.pulls.slots).
        self._pullers = ThreadPoolExecutor(slots + 8, thread_name_prefix="pull")
        self._slots: PullSlots[_Pull] = PullSlots(slots, self._start)
        self._lock = threading.Lock()
        self._pulls: dict[ImageReference, _Pull] = {}
        self._unfinished = 0
        self._warm_unfinished = 0
        self._deferred: dict[ImageReference, DeferredPull] = {}
        self._owed_file = owed
        self._owed: dict[ImageReference, DeferredPull] = {}
        """Deferred, or made again and not answered yet: what a restart must not lose."""
        self._remade: dict[ImageReference, int] = {}
        """The token of each owed pull's latest remaking: only its answer settles it."""
        self._remakings = 0
        self._owed_dirty = False
        self._owed_writing = False
        self._stopped = False
        self._tried_again: set[ImageReference] = set()
        """Images given one more try after an engine error (see ``_defer``)."""
        self._deferred_timer: threading.Timer | None = None

    @property
    def unfinished(self) -> int:
        """Requests taken but not yet answered."""
        with self._lock:
            return self._unfinished

    @property
    def warm_in_hand(self) -> int:
        """Warm-ups taken but not yet answered."""
        with self._lock:
            return self._warm_unfinished

    def submit(
        self,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None = None,
        *,
        asked_by: str | None = None,
        live: bool = True,
    ) -> None:
        """Serves ``request``; ``answer`` gets its one result, on this thread when it is known
        from memory or refused, else on a worker thread. Never raises.

        ``asked_by``: the AMQP user that published it (its ``user_id``); ``live``: from the
        node's queue, not replayed from the history (only a live request that would start a
        pull counts against the cap)."""
        with self._lock:
            self._unfinished += 1
            if request.lane is Lane.WARM:
                self._warm_unfinished += 1
        waiter = _Waiter(self, request, answer, progress, asked_by, live)
        refusal = self._admission.refusal(request.image, asked_by)
        if refusal is not None:
            log.warning("refused a request", reason=refusal.message, **waiter.context)
            waiter.finish(refusal)
            return
        try:
            known = (
                None
                if request.refresh
                else self._guard.known(
                    request.image, partial(self._store.known_image, request.image)
                )
            )
        except Exception:
            log.exception("the image index failed; asking the engine", **waiter.context)
            known = None
        if known is not None:
            waiter.finish(known, Status.PRESENT, from_memory=True)
            return
        remembered = self._not_found.recall(request.image)
        if remembered is not None:
            waiter.finish(_from_memory(remembered), from_memory=True)
            return
        try:
            self._inspectors.submit(self._inspect, waiter)
        except RuntimeError:  # shut down: the worker is stopping
            waiter.finish(_cancelled_before_start(request.image))

    def _find(self, image: ImageReference) -> ImageInfo | None:
        """The engine's answer; ``None`` also when it cannot be reached: the pull's attempts,
        retried, find out whether it comes back (see :data:`TRANSIENT_KINDS`)."""
        try:
            return self._store.find_image(image)
        except PullFailed as failure:
            if failure.kind is ErrorKind.ENGINE_UNAVAILABLE:
                return None
            raise

    def _inspect(self, waiter: _Waiter) -> None:
        """Inspect thread: answer ``present`` at once, or queue (or join) the image's pull."""
        image = waiter.request.image
        try:
            claimed, info = self._look(waiter)
        except PullFailed as failure:
            waiter.finish(failure)
            return
        except Exception as error:
            log.exception("checking the engine failed unexpectedly", **waiter.context)
            waiter.finish(_internal(error))
            return
        if claimed and info is not None:
            waiter.finish(info, Status.PRESENT)
            return
        waiter.had = info
        warm = waiter.request.lane is Lane.WARM
        refusal = self._breaker.refusal(image)
        hurry = False
        with self._lock:
            pull = self._pulls.get(image)
            if pull is not None:
                pull.waiters.append(waiter)
                joined = True
                if pull.warm and not warm:
                    pull.warm, hurry = False, True
            elif refusal is None and not self._cancelling.is_set():
                # Only a request that would start a pull counts against the cap.
                if waiter.live and self._limiter is not None:
                    refusal = self._limiter.refusal(image)
                if refusal is None:
                    pull = _Pull(image, [waiter], warm=warm)
                    self._pulls[image] = pull
                    joined = False
        if pull is None:
            self._refuse(waiter, refusal)
            return
        if joined:
            log.info("joined a pull already in flight", **waiter.context)
            if hurry:
                self._slots.hurry(image.domain, pull)
                self._interrupt_warm_pulls()
            return
        self._queue(pull)

    def _look(self, waiter: _Waiter) -> tuple[bool, ImageInfo | None]:
        """What the engine holds under the request's name, and whether it was claimed for a
        ``present`` answer (never for a refresh; not while it is being pruned)."""
        ticket = self._guard.open()
        try:
            info = self._find(waiter.request.image)
            if info is None or waiter.request.refresh:
                return False, info
            if self._guard.claim(ticket, info, pulled=False):
                return True, info
        finally:
            self._guard.close(ticket)
        log.info("the image is being pruned; pulling it again", **waiter.context)
        return False, None

    def _queue(self, pull: _Pull) -> None:
        pull.queued()
        self._slots.add(pull.image.domain, pull, warm=pull.warm)
        if not pull.warm:
            self._interrupt_warm_pulls()

    def _refuse(self, waiter: _Waiter, refusal: PullFailed | None) -> None:
        if refusal is not None and refusal.kind is ErrorKind.RATE_LIMITED:
            log.warning("refused a request", reason=refusal.message, **waiter.context)
        waiter.finish(refusal or _cancelled_before_start(waiter.request.image))

    def _interrupt_warm_pulls(self) -> None:
        """A session pull is waiting or running: warm pulls running now are cut, so that
        the session's pull does not share the engine's downloads, the disk and the link
        with them; they go back to the front of the warm lane, and the engine keeps the
        layers they had finished. (No warm pull starts while a session pull waits or runs,
        so cutting one again costs only the layers it had half done since.)"""
        store = self._store
        if not isinstance(store, InterruptibleStore):
            return
        with self._lock:
            victims = [
                pull
                for pull in self._pulls.values()
                if pull.warm and pull.running and not pull.interrupting
            ]
            for pull in victims:
                pull.interrupting = True
        for pull in victims:
            log.info("interrupting a warm pull for a session's pull", **pull.context)
            store.interrupt(pull.image)

    def _start(self, pull: _Pull) -> None:
        """A slot is granted: run the next attempt on a pull thread."""
        pull.dequeued()
        try:
            self._pullers.submit(self._attempt, pull)
        except RuntimeError:  # shut down
            self._slots.release(pull.image.domain, pull)
            self._complete(pull, _cancelled_before_start(pull.image))

    def _attempt(self, pull: _Pull) -> None:
        """Pull thread: one attempt; on a transient failure, gives the slot back and retries
        after a delay, else answers every waiting request."""
        pull.attempt += 1
        pull.bytes_received = 0
        bound = log.bind(**pull.context)
        bound.info("pulling", attempt=pull.attempt)
        started = time.monotonic()
        outcome: ImageInfo | PullFailed
        pull.running = True
        self.observer.attempt_started(pull.image)
        try:
            outcome = self._pull_claimed(pull)
        except PullFailed as failure:
            outcome = failure
        except Exception as error:
            bound.exception("pull failed unexpectedly")
            outcome = _internal(error)
        seconds = round(time.monotonic() - started, 3)
        pull.running = False
        failed = outcome if isinstance(outcome, PullFailed) else None
        self.observer.attempt_ended(pull.image, seconds, pull.bytes_received, failed)
        if isinstance(outcome, ImageInfo):
            self._breaker.answered(pull.image)
            self._not_found.forget(pull.image)
            bound.info("pulled", image_id=outcome.image_id, attempt=pull.attempt, seconds=seconds)
            self._slots.release(pull.image.domain, pull)
            self._complete(pull, outcome)
            return
        if pull.interrupting and not self._cancelling.is_set():
            self._resume_later(pull)
            return
        self._attempt_failed(pull, outcome, seconds)

    def _pull_claimed(self, pull: _Pull) -> ImageInfo:
        """Pull thread: pulls once no removal of an image of that name is under way, holding
        the name meanwhile; pulls again if pruning removed what came (an image of another
        name with the same id). Raises ``PullFailed``."""
        for _ in range(PULL_AGAIN_LIMIT):
            ticket = self._guard.open(pull.image, self._cancelling)
            try:
                if self._cancelling.is_set():
                    raise _cancelled_before_start(pull.image)
                info = self._store.pull(pull.image, lambda p: self._progress(pull, p))
                if self._guard.claim(ticket, info, pulled=True):
                    return info
            finally:
                self._guard.close(ticket)
            log.info("pruning removed the image as it was pulled; pulling it again", **pull.context)
            self._guard.wait_removed(info.image_id, self._cancelling)
        raise PullFailed(
            ErrorKind.ENGINE_ERROR,
            f"pulling {pull.image}: pruning removed the image each time it was pulled "
            f"({PULL_AGAIN_LIMIT} times); ask again once the prune is over",
        )

    def _resume_later(self, pull: _Pull) -> None:
        """An interrupted warm pull (not a failure: the attempt does not count) goes back
        to the front of its lane; it starts again once no session pull waits or runs."""
        pull.interrupting = False
        pull.interruptions += 1
        pull.attempt -= 1
        log.info("warm pull waits for the session's pull", **pull.context)
        pull.queued()
        self._slots.requeue(pull.image.domain, pull, warm=pull.warm)

    def _attempt_failed(self, pull: _Pull, failure: PullFailed, seconds: float) -> None:
        image = pull.image
        transient = failure.kind in TRANSIENT_KINDS
        last = pull.attempt >= self._retry.attempts or self._cancelling.is_set()
        if says_registry_silent(failure, pull.bytes_received):
            self._breaker.attempt_failed(image, failure, gave_up=last)
        elif failure.kind in REGISTRY_ANSWERED_KINDS:
            self._breaker.answered(image)
        self._not_found.remember(image, failure)
        self._slots.release(image.domain, pull)
        bound = log.bind(**pull.context, kind=failure.kind.value, error=failure.message)
        if transient and not last:
            delay = pull.last_wait = self._retry.wait(pull.last_wait)
            bound.warning(
                "pull attempt failed; retrying", attempt=pull.attempt, retry_in=round(delay, 2)
            )
            pull.retry = threading.Timer(delay, self._retry_now, args=(pull,))
            pull.retry.daemon = True
            pull.retry.start()
            return
        bound.warning("pull failed", attempts=pull.attempt, seconds=seconds)
        if self._cancelling.is_set() and failure.kind is not ErrorKind.CANCELLED:
            failure = PullFailed(
                ErrorKind.CANCELLED,
                f"{failure.message}; not retried because the worker is shutting down",
            )
        elif transient and pull.attempt > 1:
            failure = PullFailed(
                failure.kind, f"{failure.message} (gave up after {pull.attempt} attempts)"
            )
        if failure.kind is ErrorKind.ENGINE_UNAVAILABLE and self._defer(pull):
            failure = PullFailed(
                failure.kind,
                f"{failure.message}; the node pulls it by itself once its engine answers again",
            )
        elif failure.kind is ErrorKind.ENGINE_ERROR and self._defer(pull, once=True):
            # An engine error puller has no rule for may be a restart seen from inside
            # (containerd's words for it vary): one more try, a few seconds later.
            failure = PullFailed(
                failure.kind, f"{failure.message}; the node tries once more in a few seconds"
            )
        self._complete(pull, failure)

    def _defer(self, pull: _Pull, once: bool = False) -> bool:
        """Keeps an image whose pull failed only because the node's own engine was away, to
        pull it again (with no one to answer) once the engine answers: an engine restart
        must not leave the node without an image it was asked for. ``False`` when too many
        wait already; with ``once``, also when this image was given its one more try."""
        with self._lock:
            if len(self._deferred) >= DEFERRED_LIMIT and pull.image not in self._deferred:
                return False
            if once:
                if pull.image in self._tried_again:
                    self._tried_again.discard(pull.image)
                    return False
                if len(self._tried_again) >= DEFERRED_LIMIT:
                    return False
                self._tried_again.add(pull.image)
            lane = Lane.WARM if pull.warm else Lane.SESSION
            asked_by = next((w.asked_by for w in pull.waiters if w.asked_by), None)
            before = self._owed.get(pull.image)
            owed = (
                DeferredPull(lane, asked_by, time.time())
                if before is None
                else dataclasses.replace(before, lane=lane, asked_by=asked_by or before.asked_by)
            )
            self._deferred[pull.image] = owed
            changed = before != owed
            self._owed[pull.image] = owed
        if changed:
            self._save_owed()
        self._watch_engine()
        return True

    def resume_owed(self) -> int:
        """Takes back the pulls a previous run of the worker still owed (kept in ``owed``),
        to be made once the engine answers; how many."""
        if self._owed_file is None:
            return 0
        kept = self._owed_file.load()
        if len(kept) > DEFERRED_LIMIT:
            log.warning("more pulls owed than are kept; the rest are given up", owed=len(kept))
        with self._lock:
            for image, owed in list(kept.items())[:DEFERRED_LIMIT]:
                self._deferred.setdefault(image, owed)
                self._owed.setdefault(image, owed)
            taken = len(self._deferred)
        if kept:
            self._watch_engine()
        return taken

    def _watch_engine(self) -> None:
        """Looks at the engine in a few seconds (if nobody looks already)."""
        with self._lock:
            if self._deferred_timer is not None or self._cancelling.is_set() or self._stopped:
                return
            timer = self._deferred_timer = threading.Timer(ENGINE_WATCH_INTERVAL, self._engine_back)
            timer.daemon = True
        timer.start()

    def _save_owed(self) -> None:
        """Writes the owed pulls. One thread writes at a time; changes made meanwhile are
        written by it, once, when it is done (a burst of deferrals is a few writes)."""
        if self._owed_file is None:
            return
        with self._lock:
            self._owed_dirty = True
            if self._owed_writing:
                return
            self._owed_writing = True
        try:
            while True:
                with self._lock:
                    if not self._owed_dirty:
                        return
                    self._owed_dirty = False
                    owed = dict(self._owed)
                self._owed_file.save(owed)
        finally:
            with self._lock:
                self._owed_writing = False

    def _owed_answered(self, image: ImageReference, token: int, result: NodeResult) -> None:
        """A pull made again has its answer: no longer owed, unless made again since (then
        that one's answer settles it), deferred once more, or cut short by the worker
        stopping (the next one makes it)."""
        _log_deferred(image, result)
        if result.error is not None and result.error.kind is ErrorKind.CANCELLED:
            return
        with self._lock:
            if self._remade.get(image) != token:
                return
            del self._remade[image]
            done = image not in self._deferred and self._owed.pop(image, None) is not None
        if done:
            self._save_owed()

    def _engine_back(self) -> None:
        """Timer thread: if the engine answers now, pulls what waited for it; else looks
        again later."""
        try:
            self._store.version()
            back = True
        except Exception:
            back = False
        with self._lock:
            self._deferred_timer = None
            if not back:
                again = bool(self._deferred)
            else:
                deferred, self._deferred = self._deferred, {}
                remaking, given_up = self._take_owed(deferred)
        if not back:
            if again:
                self._watch_engine()
            return
        for image, owed in given_up.items():
            log.warning(
                "gave up a pull owed since the engine was away",
                image=str(image),
                owed_since=owed.since,
                tries=owed.tries,
            )
        if given_up or remaking:
            self._save_owed()  # the tries counted, over restarts too
        if remaking:
            log.info(
                "the engine answers again; pulling what failed while it was away",
                images=len(remaking),
            )
        for image, (owed, token) in remaking.items():
            request = PullRequest.new(image, lane=owed.lane)
            self.submit(
                request,
                partial(self._owed_answered, image, token),
                live=False,
                asked_by=owed.asked_by,
            )

    def _take_owed(
        self, deferred: dict[ImageReference, DeferredPull]
    ) -> tuple[dict[ImageReference, tuple[DeferredPull, int]], dict[ImageReference, DeferredPull]]:
        """Under the lock: the owed pulls to make again now (each with a token of its own,
        and counted as tried), and those given up (too old, or tried too often)."""
        now = time.time()
        remaking: dict[ImageReference, tuple[DeferredPull, int]] = {}
        given_up: dict[ImageReference, DeferredPull] = {}
        for image, owed in deferred.items():
            if owed.tries >= OWED_MAX_TRIES or now - owed.since > OWED_MAX_AGE:
                given_up[image] = owed
                self._owed.pop(image, None)
                self._remade.pop(image, None)
                continue
            tried = dataclasses.replace(owed, tries=owed.tries + 1)
            self._owed[image] = tried
            self._remakings += 1
            self._remade[image] = self._remakings
            remaking[image] = (tried, self._remakings)
        return remaking, given_up

    def _retry_now(self, pull: _Pull) -> None:
        pull.retry = None
        if self._cancelling.is_set():
            self._complete(pull, _cancelled_before_start(pull.image))
            return
        pull.queued()
        self._slots.add(pull.image.domain, pull, warm=pull.warm)

    def _progress(self, pull: _Pull, progress: PullProgress) -> None:
        """Pull thread: forwards the engine's progress, throttled, to every waiting request;
        nothing until the size is known."""
        pull.bytes_received = progress.done
        if progress.total <= 0:
            return
        now = time.monotonic()
        if now - pull.last_progress < PROGRESS_INTERVAL and progress.done < progress.total:
            return
        pull.last_progress = now
        with self._lock:
            waiters = list(pull.waiters)
        for waiter in waiters:
            waiter.send_progress(progress)

    def _complete(self, pull: _Pull, outcome: ImageInfo | PullFailed) -> None:
        """Answers every request waiting on ``pull``. Any thread; once per pull."""
        with self._lock:
            if pull.completed:
                return
            pull.completed = True
            if isinstance(outcome, ImageInfo):
                self._tried_again.discard(pull.image)
            if self._pulls.get(pull.image) is pull:
                del self._pulls[pull.image]
            waiters = list(pull.waiters)
        for waiter in waiters:
            status = Status.PULLED
            had = waiter.had
            if (
                isinstance(outcome, ImageInfo)
                and had is not None
                and had.image_id == outcome.image_id
            ):
                status = (
                    Status.PRESENT
                )  # a refresh found the image unchanged: the tag had not moved
            waiter.finish(outcome, status, queued=pull.queued_seconds(waiter.since))

    def check(
        self, request: CheckRequest, answer: AnswerCallback, *, asked_by: str | None = None
    ) -> None:
        """Answers whether the node has ``request.image`` (``present`` or ``absent``), from
        memory when the image index knows it, else from one inspect; pulls nothing. Never
        raises."""
        with self._lock:
            self._unfinished += 1
        as_pull = PullRequest(request.image, request.request_id, request.requested_at)
        waiter = _Waiter(self, as_pull, answer, None, asked_by, live=True)
        refusal = self._admission.refusal(request.image, asked_by)
        if refusal is not None:
            log.warning("refused a check", reason=refusal.message, **waiter.context)
            waiter.finish(refusal)
            return
        try:
            self._inspectors.submit(self._check, waiter)
        except RuntimeError:  # shut down: the worker is stopping
            waiter.finish(_cancelled_before_start(request.image))

    def _check(self, waiter: _Waiter) -> None:
        ticket = self._guard.open()
        try:
            info = self._store.find_image(waiter.request.image)
            if info is not None and not self._guard.claim(ticket, info, pulled=False):
                self._guard.wait_removed(info.image_id, self._cancelling)
                info = None  # pruned: gone, or about to be
        except PullFailed as failure:
            waiter.finish(failure)
            return
        except Exception as error:
            log.exception("checking the engine failed unexpectedly", **waiter.context)
            waiter.finish(_internal(error))
            return
        finally:
            self._guard.close(ticket)
        if info is None:
            waiter.finish_absent()
        else:
            waiter.finish(info, Status.PRESENT)

    def _answered(self, warm: bool) -> None:
        with self._lock:
            self._unfinished -= 1
            if warm:
                self._warm_unfinished -= 1

    def cancel(self) -> None:
        """Cancels running, queued and retrying pulls; each waiting request is answered
        ``cancelled``."""
        self._cancelling.set()
        with self._lock:
            retrying = [p for p in self._pulls.values() if p.retry is not None]
        for pull in retrying:
            if pull.retry is not None:
                pull.retry.cancel()
            self._complete(pull, _cancelled_before_start(pull.image))
        for pull in self._slots.remove_waiting():
            self._complete(pull, _cancelled_before_start(pull.image))
        self._store.cancel_pulls()

    @property
    def deferred(self) -> int:
        """Images waiting for the engine to answer again, to be pulled then."""
        with self._lock:
            return len(self._deferred)

    def shutdown(self, wait: bool) -> None:
        with self._lock:
            self._stopped = True
            timer, self._deferred_timer = self._deferred_timer, None
        if timer is not None:
            timer.cancel()
        self._inspectors.shutdown(wait=wait, cancel_futures=not wait)
        self._pullers.shutdown(wait=wait, cancel_futures=not wait)


class _Waiter:
    """One request waiting for its answer: answers exactly once."""

    def __init__(
        self,
        service: PullService,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None,
        asked_by: str | None = None,
        live: bool = True,
    ) -> None:
        self.request = request
        self.live = live
        self.since = time.monotonic()
        self.context: dict[str, object] = {
            "request_id": request.request_id,
            "image": str(request.image),
        }
        if request.session_id is not None:
            self.context["session_id"] = request.session_id
        if asked_by is not None:
            self.context["asked_by"] = asked_by
        self.asked_by = asked_by
        self._service = service
        self._answer = answer
        self._progress = progress
        self._answered = False
        self._lock = threading.Lock()
        self.had: ImageInfo | None = None
        """For a refresh: the image the node had under that name before pulling."""

    def send_progress(self, progress: PullProgress) -> None:
        if self._progress is None:
            return
        message = NodeProgress(
            request_id=self.request.request_id,
            node=self._service.node,
            image=str(self.request.image),
            done=progress.done,
            total=progress.total,
        )
        try:
            self._progress(message)
        except Exception:
            log.exception("sending progress failed", **self.context)

    def finish_absent(self) -> None:
        """The answer to a check: the node does not have the image."""
        self._hand_over(
            NodeResult(
                request_id=self.request.request_id,
                node=self._service.node,
                image=str(self.request.image),
                status=Status.ABSENT,
                seconds=round(time.monotonic() - self.since, 6),
            ),
            from_memory=False,
        )

    def finish(
        self,
        outcome: ImageInfo | PullFailed,
        status: Status = Status.FAILED,
        queued: float = 0.0,
        from_memory: bool = False,
    ) -> None:
        found = outcome if isinstance(outcome, ImageInfo) else None
        result = NodeResult(
            request_id=self.request.request_id,
            node=self._service.node,
            image=str(self.request.image),
            status=status if found is not None else Status.FAILED,
            seconds=round(time.monotonic() - self.since, 6),
            queued_seconds=round(queued, 6),
            image_id=found.image_id if found is not None else None,
            digest=found.digest if found is not None else None,
            error=None if isinstance(outcome, ImageInfo) else outcome.as_node_error(),
        )
        self._hand_over(result, from_memory)

    def _hand_over(self, result: NodeResult, from_memory: bool) -> None:
        with self._lock:
            if self._answered:
                return
            self._answered = True
        try:
            self._service.observer.answered(result, from_memory)
        except Exception:
            log.exception("an observer failed", **self.context)
        log.info(
            "answered",
            **self.context,
            status=result.status.value,
            seconds=result.seconds,
            queued_seconds=result.queued_seconds,
            error_kind=result.error.kind.value if result.error else None,
        )
        try:
            self._answer(result)
        except Exception:
            log.exception("handing over the result failed", **self.context)
        finally:
            # Counted as answered only once handed over: whoever drains (the worker
            # stopping) then sees either this request unfinished or its answer in the
            # broker's hands, never neither.
            self._service._answered(self.request.lane is Lane.WARM)  # noqa: SLF001 - the waiter is the service's own part


@dataclass
class _Pull:
    """One image being pulled (or queued, or waiting to retry) and the requests waiting."""

    image: ImageReference
    waiters: list[_Waiter]
    warm: bool = False
    """In the warm lane: every waiting request is a warm-up (see :mod:`worker.pulls.slots`)."""
    running: bool = False
    interrupting: bool = False
    """Being cut to make room for a session's pull (see ``_interrupt_warm_pulls``)."""
    interruptions: int = 0
    attempt: int = 0
    last_wait: float | None = None
    """The wait before its latest retry (see :meth:`RetryPolicy.wait`)."""
    bytes_received: int = 0
    last_progress: float = 0.0
    completed: bool = False
    retry: threading.Timer | None = None
    _waits: list[list[float]] = field(default_factory=list)
    """[queued at, got a slot at] for each time it waited for a slot."""

    @property
    def context(self) -> dict[str, object]:
        """Log fields of the pull: those of the request that started it, and how many wait."""
        first = dict(self.waiters[0].context) if self.waiters else {"image": str(self.image)}
        return {**first, "requests": len(self.waiters)}

    def queued(self) -> None:
        self._waits.append([time.monotonic(), 0.0])

    def dequeued(self) -> None:
        if self._waits:
            self._waits[-1][1] = time.monotonic()

    def queued_seconds(self, since: float) -> float:
        """Seconds this pull waited for a slot after ``since`` (when a request joined)."""
        total = 0.0
        now = time.monotonic()
        for queued_at, started_at in self._waits:
            end = started_at or now
            total += max(0.0, end - max(queued_at, since))
        return total


def _log_deferred(image: ImageReference, result: NodeResult) -> None:
    log.info(
        "pulled what failed while the engine was away"
        if result.has_image
        else "what failed while the engine was away failed again",
        image=str(image),
        status=result.status.value,
        error=result.error.message if result.error else None,
    )


def _from_memory(failure: PullFailed) -> PullFailed:
    return PullFailed(failure.kind, f"{failure.message} (answered from memory: seen moments ago)")


def _cancelled_before_start(image: ImageReference) -> PullFailed:
    return PullFailed(
        ErrorKind.CANCELLED,
        f"pulling {image} was cancelled because the worker is shutting down; "
        "the node may pull it on the next request",
    )


def _internal(error: BaseException) -> PullFailed:
    return PullFailed(
        ErrorKind.INTERNAL,
        f"the worker failed unexpectedly ({type(error).__name__}: {error}); "
        "this is a bug in puller: please report it with the worker's log",
    )
