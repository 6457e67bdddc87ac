"""What a worker does with a pull request, free of pika and the docker SDK.

:meth:`PullService.submit` takes a decoded request and a callback; it answers with one
``NodeResult`` through that callback, whoever asked (a live request, a replay from the
history, a test). What is done with the result is the caller's business.

Where each step runs:

- the caller's thread (the connection's): images known from memory are answered at once
  (``present``, or ``not_found`` seen moments ago), with no engine call and no thread hop;
- an inspect thread: asks the engine whether the image is there;
- a pull thread: one of ``slots`` (see :mod:`worker.pulls.slots`), fair between registries; a
  request for an image already being pulled joins that pull (:mod:`worker.pulls.in_flight`).
  A transient failure gives its slot back while it waits to retry. A registry known to be
  down fails fast (:mod:`worker.pulls.registry_health`). A pull that failed because the
  node's own store was away is owed, and made again once it answers (:mod:`worker.pulls.owed`).

Every ``present`` and ``pulled`` is claimed first (:mod:`worker.pulls.image_guard`), so that it
never crosses a prune: an image being removed is pulled again and answered ``pulled``.

Nothing a request contains can raise out of this module: a worker never dies on a message.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import structlog

from contract import (
    CheckRequest,
    ErrorKind,
    Lane,
    PullFailed,
    PullRequest,
    Status,
)
from worker.admission import Admission, RequestLimiter
from worker.pulls.answers import AnswerCallback, InHand, ProgressCallback, Waiter
from worker.pulls.image_guard import ImageGuard
from worker.pulls.in_flight import InFlight, Pull, Taken
from worker.pulls.observers import PullObserver
from worker.pulls.owed import OwedPulls
from worker.pulls.registry_health import NotFoundMemory, RegistryBreaker, RegistryHealth
from worker.pulls.retry import RetryPolicy
from worker.pulls.slots import PullSlots
from worker.stores.contract import ImageInfo, ImageStore, InterruptibleStore, PullProgress
from worker.stores.failures import cancelled

log = structlog.get_logger("worker.service")

INSPECT_THREADS = 4
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
An engine that cannot be reached is as often as not one being restarted."""


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
        owed_file: Path | None = None,
        guard: ImageGuard | None = None,
    ) -> None:
        """``observer``: sees every outcome (none: nobody does); ``admission``: who may ask
        for what (every request); ``limiter``: a cap on live requests that would start a
        pull; ``owed_file``: where owed pulls are kept for a restart (see
        :meth:`resume_owed`); ``guard``: the one pruning uses too, so that answers and
        removals never cross."""
        self._store = store
        self._in_hand = InHand(node, observer or PullObserver())
        self._admission = admission or Admission()
        self._limiter = limiter
        self._guard = guard or ImageGuard()
        self._retry = retry or RetryPolicy()
        self._registries = RegistryHealth(
            breaker or RegistryBreaker(cooldown=0), not_found or NotFoundMemory(seconds=0)
        )
        self._owed = OwedPulls(owed_file, store.version, self._remake)
        self._in_flight = InFlight()
        self._cancelling = threading.Event()
        self._inspectors = ThreadPoolExecutor(INSPECT_THREADS, thread_name_prefix="inspect")
        # Threads start only when a slot is granted; the extra room is for registries that
        # may start one pull while the others hold every slot (see worker.pulls.slots).
        self._pullers = ThreadPoolExecutor(slots + 8, thread_name_prefix="pull")
        self._slots: PullSlots[Pull] = PullSlots(slots, self._start)

    @property
    def unfinished(self) -> int:
        """Requests taken but not yet answered."""
        return self._in_hand.unfinished

    @property
    def warm_in_hand(self) -> int:
        """Warm-ups taken but not yet answered."""
        return self._in_hand.warm

    @property
    def owed_waiting(self) -> int:
        """Owed pulls waiting for the store to answer again, to be made then."""
        return self._owed.waiting

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
        waiter = self._in_hand.take(request, answer, progress, asked_by, live)
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
        remembered = self._registries.recall(request.image)
        if remembered is not None:
            waiter.finish(remembered, from_memory=True)
            return
        try:
            self._inspectors.submit(self._inspect, waiter)
        except RuntimeError:  # shut down: the worker is stopping
            waiter.finish(cancelled(request.image))

    def check(
        self, request: CheckRequest, answer: AnswerCallback, *, asked_by: str | None = None
    ) -> None:
        """Answers whether the node has ``request.image`` (``present`` or ``absent``), from
        one inspect; pulls nothing. An ``absent`` answer says how far the image's pull is
        when one runs now, for whoever asked. Never raises."""
        as_pull = PullRequest(request.image, request.request_id, request.requested_at)
        waiter = self._in_hand.take(as_pull, answer, asked_by=asked_by)
        refusal = self._admission.refusal(request.image, asked_by)
        if refusal is not None:
            log.warning("refused a check", reason=refusal.message, **waiter.context)
            waiter.finish(refusal)
            return
        try:
            self._inspectors.submit(self._check, waiter)
        except RuntimeError:  # shut down: the worker is stopping
            waiter.finish(cancelled(request.image))

    def resume_owed(self) -> int:
        """Takes back the pulls a previous run of the worker still owed (kept in
        ``owed_file``), to be made once the store answers; how many."""
        return self._owed.resume()

    def cancel(self) -> None:
        """Cancels running, queued and retrying pulls; each waiting request is answered
        ``cancelled``."""
        self._cancelling.set()
        self._owed.stop()
        for pull in self._in_flight.retrying():
            if pull.retry is not None:
                pull.retry.cancel()
            self._complete(pull, cancelled(pull.image))
        for pull in self._slots.remove_waiting():
            self._complete(pull, cancelled(pull.image))
        self._store.cancel_pulls()

    def shutdown(self, wait: bool) -> None:
        self._owed.close()
        self._inspectors.shutdown(wait=wait, cancel_futures=not wait)
        self._pullers.shutdown(wait=wait, cancel_futures=not wait)

    # -- inspect threads ---------------------------------------------------------------------

    def _inspect(self, waiter: Waiter) -> None:
        """Answer ``present`` at once, or queue (or join) the image's pull."""
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
        down = self._registries.refusal(image)
        taken = self._in_flight.take(waiter, partial(self._may_start, waiter, down))
        if isinstance(taken, PullFailed):
            if taken.kind is ErrorKind.RATE_LIMITED:
                log.warning("refused a request", reason=taken.message, **waiter.context)
            waiter.finish(taken)
            return
        pull, how = taken
        if how is Taken.STARTED:
            pull.queued()
            self._slots.add(image.domain, pull, warm=pull.warm)
            if not pull.warm:
                self._interrupt_warm_pulls()
            return
        log.info("joined a pull already in flight", **waiter.context)
        if how is Taken.HURRIED:
            self._slots.hurry(image.domain, pull)
            self._interrupt_warm_pulls()

    def _may_start(self, waiter: Waiter, down: PullFailed | None) -> PullFailed | None:
        """Why no pull may start for ``waiter``: its registry is ``down``, the worker is
        stopping, or a live request is over the cap (only one that would start a pull
        counts against it)."""
        if down is not None:
            return down
        if self._cancelling.is_set():
            return cancelled(waiter.request.image)
        if waiter.live and self._limiter is not None:
            return self._limiter.refusal(waiter.request.image)
        return None

    def _look(self, waiter: Waiter) -> tuple[bool, ImageInfo | None]:
        """What the engine holds under the request's name, and whether it was claimed for a
        ``present`` answer (never for a refresh; not while it is being pruned). An engine
        that cannot be reached holds nothing: the pull's attempts find out if it comes back."""
        ticket = self._guard.open()
        try:
            try:
                info = self._store.find_image(waiter.request.image)
            except PullFailed as failure:
                if failure.kind is not ErrorKind.ENGINE_UNAVAILABLE:
                    raise
                info = None
            if info is None or waiter.request.refresh:
                return False, info
            if self._guard.claim(ticket, info, pulled=False):
                return True, info
        finally:
            self._guard.close(ticket)
        log.info("the image is being pruned; pulling it again", **waiter.context)
        return False, None

    def _check(self, waiter: Waiter) -> None:
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
            waiter.finish_absent(self._in_flight.pulling(waiter.request.image))
        else:
            waiter.finish(info, Status.PRESENT)

    # -- the lanes ---------------------------------------------------------------------------

    def _interrupt_warm_pulls(self) -> None:
        """A session pull is waiting or running: warm pulls running now are cut, so that
        the session's pull does not share the engine's downloads, the disk and the link
        with them; they go back to the front of the warm lane, and the engine keeps the
        layers they had finished. (No warm pull starts while a session pull waits or runs,
        so cutting one again costs only the layers it had half done since.)"""
        store = self._store
        if not isinstance(store, InterruptibleStore):
            return
        for pull in self._in_flight.warm_to_interrupt():
            log.info("interrupting a warm pull for a session's pull", **pull.context)
            store.interrupt(pull.image)

    def _start(self, pull: Pull) -> None:
        """A slot is granted: run the next attempt on a pull thread."""
        pull.dequeued()
        try:
            self._pullers.submit(self._attempt, pull)
        except RuntimeError:  # shut down
            self._slots.release(pull.image.domain, pull)
            self._complete(pull, cancelled(pull.image))

    def _resume_later(self, pull: Pull) -> None:
        """An interrupted warm pull (not a failure: the attempt does not count) goes back
        to the front of its lane; it starts again once no session pull waits or runs."""
        pull.interrupting = False
        pull.attempt -= 1
        log.info("warm pull waits for the session's pull", **pull.context)
        pull.queued()
        self._slots.requeue(pull.image.domain, pull, warm=pull.warm)

    def _retry_now(self, pull: Pull) -> None:
        pull.retry = None
        if self._cancelling.is_set():
            self._complete(pull, cancelled(pull.image))
            return
        pull.queued()
        self._slots.add(pull.image.domain, pull, warm=pull.warm)

    # -- pull threads ------------------------------------------------------------------------

    def _attempt(self, pull: Pull) -> None:
        """One attempt; on a transient failure, gives the slot back and retries after a
        delay, else answers every waiting request."""
        pull.attempt += 1
        self._in_flight.progressed(pull, 0, 0)
        bound = log.bind(**pull.context)
        bound.info("pulling", attempt=pull.attempt)
        started = time.monotonic()
        outcome: ImageInfo | PullFailed
        pull.running = True
        observer = self._in_hand.observer
        observer.attempt_started(pull.image)
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
        observer.attempt_ended(pull.image, seconds, pull.bytes_received, failed)
        if isinstance(outcome, ImageInfo):
            self._registries.pulled(pull.image)
            bound.info("pulled", image_id=outcome.image_id, attempt=pull.attempt, seconds=seconds)
            self._slots.release(pull.image.domain, pull)
            self._complete(pull, outcome)
            return
        if pull.interrupting and not self._cancelling.is_set():
            self._resume_later(pull)
            return
        self._attempt_failed(pull, outcome, seconds)

    def _pull_claimed(self, pull: Pull) -> ImageInfo:
        """Pulls once no removal of an image of that name is under way, holding the name
        meanwhile; pulls again if pruning removed what came (an image of another name with
        the same id). Raises ``PullFailed``."""
        for _ in range(PULL_AGAIN_LIMIT):
            ticket = self._guard.open(pull.image, self._cancelling)
            try:
                if self._cancelling.is_set():
                    raise cancelled(pull.image)
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

    def _attempt_failed(self, pull: Pull, failure: PullFailed, seconds: float) -> None:
        image = pull.image
        transient = failure.kind in TRANSIENT_KINDS
        last = pull.attempt >= self._retry.attempts or self._cancelling.is_set()
        self._registries.attempt_failed(image, failure, pull.bytes_received, last)
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
        if failure.kind is ErrorKind.ENGINE_UNAVAILABLE and self._owe(pull):
            failure = PullFailed(
                failure.kind,
                f"{failure.message}; the node pulls it by itself once its engine answers again",
            )
        elif failure.kind is ErrorKind.ENGINE_ERROR and self._owe(pull, once=True):
            # An engine error puller has no rule for may be a restart seen from inside
            # (containerd's words for it vary): one more try, a few seconds later.
            failure = PullFailed(
                failure.kind, f"{failure.message}; the node tries once more in a few seconds"
            )
        self._complete(pull, failure)

    def _owe(self, pull: Pull, once: bool = False) -> bool:
        """Owes ``pull`` to the node, to be made again once its store answers (see
        :class:`worker.pulls.owed.OwedPulls`); ``False`` when it is not."""
        lane = Lane.WARM if pull.warm else Lane.SESSION
        return self._owed.owe(pull.image, lane, self._in_flight.asked_by(pull), once=once)

    def _remake(self, request: PullRequest, answer: AnswerCallback, asked_by: str | None) -> None:
        """An owed pull, made again: as a replay (not counted against the cap), checked
        again as the publisher that asked."""
        self.submit(request, answer, live=False, asked_by=asked_by)

    def _progress(self, pull: Pull, progress: PullProgress) -> None:
        """Forwards the engine's progress, throttled, to every waiting request; nothing
        until the size is known."""
        self._in_flight.progressed(pull, progress.done, progress.total)
        if progress.total <= 0:
            return
        now = time.monotonic()
        if now - pull.last_progress < PROGRESS_INTERVAL and progress.done < progress.total:
            return
        pull.last_progress = now
        for waiter in self._in_flight.waiters(pull):
            waiter.send_progress(progress)

    # -- any thread --------------------------------------------------------------------------

    def _complete(self, pull: Pull, outcome: ImageInfo | PullFailed) -> None:
        """Answers every request waiting on ``pull``, once per pull."""
        waiters = self._in_flight.complete(pull)
        if waiters is None:
            return
        if isinstance(outcome, ImageInfo):
            self._owed.pulled(pull.image)
        for waiter in waiters:
            had = waiter.had
            unchanged = (
                isinstance(outcome, ImageInfo)
                and had is not None
                and had.image_id == outcome.image_id
            )
            # A refresh that found the image unchanged (the tag had not moved) is ``present``.
            status = Status.PRESENT if unchanged else Status.PULLED
            waiter.finish(outcome, status, queued=pull.queued_seconds(waiter.since))


def _internal(error: BaseException) -> PullFailed:
    return PullFailed(
        ErrorKind.INTERNAL,
        f"the worker failed unexpectedly ({type(error).__name__}: {error}); "
        "this is a bug in puller: please report it with the worker's log",
    )
