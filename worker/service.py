"""What a worker does with a pull request, free of pika and the docker SDK.

The connection thread hands each delivery to :meth:`PullService.on_delivery`,
which only decodes it and queues work. Checking the engine and pulling run on
thread pools; the result goes back to the connection thread through
``call_soon`` to be replied and acked there. Nothing a message contains can
raise out of this module: a worker never dies on a message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import structlog

from contract import (
    ErrorKind,
    ImageReference,
    InvalidMessage,
    NodeError,
    NodeProgress,
    NodeResult,
    PullFailed,
    PullRequest,
    Status,
)
from worker.broker import Delivery
from worker.engine import ImageInfo, PullProgress

log = structlog.get_logger("worker.service")

INSPECT_THREADS = 4

TRANSIENT_KINDS = frozenset(
    {ErrorKind.REGISTRY_UNREACHABLE, ErrorKind.REGISTRY_ERROR, ErrorKind.STALLED}
)
"""Failures that may pass by themselves, and so are retried; the others are answered at once."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; waits ``first_delay`` seconds, doubling up to ``max_delay``."""

    attempts: int = 4
    first_delay: float = 1.0
    max_delay: float = 15.0

    def delay(self, attempt: int) -> float:
        return float(min(self.first_delay * 2 ** (attempt - 1), self.max_delay))


class ImageStore(Protocol):
    """A node's image store: the Docker Engine today, containerd later."""

    def find_image(self, image: ImageReference) -> ImageInfo | None: ...

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        """From memory only, never blocking: safe on the connection's thread."""
        ...

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo: ...

    def version(self) -> str: ...

    def cancel_pulls(self) -> None: ...


class ReplyChannel(Protocol):
    """The part of the broker the service uses. Only ``call_soon`` is safe off its thread."""

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None: ...

    def ack(self, delivery: Delivery) -> None: ...

    def reject(self, delivery: Delivery) -> None: ...


class PullService:
    """Serves pull requests for one node.

    At most ``max_concurrent_pulls`` pulls run at once; a request for an image
    whose pull is already running joins that pull instead of starting another.
    """

    def __init__(
        self,
        node: str,
        store: ImageStore,
        max_concurrent_pulls: int,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.node = node
        self._store = store
        self._retry = retry or RetryPolicy()
        self._cancelling = threading.Event()
        self._inspectors = ThreadPoolExecutor(INSPECT_THREADS, thread_name_prefix="inspect")
        self._pullers = ThreadPoolExecutor(max_concurrent_pulls, thread_name_prefix="pull")
        self._lock = threading.Lock()
        self._pulls_in_flight: dict[ImageReference, _InFlightPull] = {}
        self._unfinished = 0

    @property
    def unfinished(self) -> int:
        """Requests accepted but not yet answered."""
        with self._lock:
            return self._unfinished

    def on_delivery(self, delivery: Delivery, channel: ReplyChannel) -> PullRequest | None:
        """Connection thread: decode, then queue the work; the request, if it was one.
        Never raises."""
        try:
            request = PullRequest.decode(delivery.body)
        except InvalidMessage as error:
            self._refuse(delivery, channel, str(error))
            return None
        except Exception as error:  # a decoder bug must not take the worker down
            log.exception("decoding failed unexpectedly")
            self._refuse(delivery, channel, f"the worker could not decode the message: {error}")
            return None
        self.accept(request, delivery, channel)
        return request

    def accept(self, request: PullRequest, delivery: Delivery, channel: ReplyChannel) -> None:
        """Connection thread: serves a decoded request, live or replayed. Never raises."""
        with self._lock:
            self._unfinished += 1
        try:
            known = self._store.known_image(request.image)
        except Exception:
            log.exception("the image index failed; asking the engine")
            known = None
        if known is not None:  # from memory: answered here, no thread hop, no engine call
            self._finish(
                request,
                delivery,
                channel,
                time.monotonic(),
                known,
                Status.PRESENT,
                on_connection_thread=True,
            )
            return
        self._inspectors.submit(self._serve, request, delivery, channel)

    def _refuse(self, delivery: Delivery, channel: ReplyChannel, reason: str) -> None:
        log.warning(
            "rejected a message that breaks the contract",
            reason=reason,
            correlation_id=delivery.correlation_id,
            bytes=len(delivery.body),
        )
        try:
            if delivery.reply_to:
                result = NodeResult(
                    request_id=_printable(delivery.correlation_id) or "unknown",
                    node=self.node,
                    image="",
                    status=Status.FAILED,
                    seconds=0.0,
                    error=NodeError(ErrorKind.INVALID_REQUEST, reason),
                )
                channel.reply(delivery.reply_to, delivery.correlation_id, result.encode())
        finally:
            channel.reject(delivery)

    def _serve(self, request: PullRequest, delivery: Delivery, channel: ReplyChannel) -> None:
        """Inspect thread: answer ``present`` at once, or hand the image to the pull pool."""
        started = time.monotonic()
        bound = log.bind(request_id=request.request_id, image=str(request.image))
        try:
            info = self._store.find_image(request.image)
        except PullFailed as failure:
            self._finish(request, delivery, channel, started, failure)
            return
        except Exception as error:
            bound.exception("checking the engine failed unexpectedly")
            self._finish(request, delivery, channel, started, _internal(error))
            return
        if info is not None:
            self._finish(request, delivery, channel, started, info, Status.PRESENT)
            return
        listener = _ProgressListener(request, delivery, channel, self.node)
        pull = self._join_or_start_pull(request.image, listener)
        pull.add_done_callback(
            lambda done: self._finish(
                request, delivery, channel, started, _outcome(done), Status.PULLED
            )
        )

    def _join_or_start_pull(
        self, image: ImageReference, listener: _ProgressListener
    ) -> Future[ImageInfo]:
        with self._lock:
            running = self._pulls_in_flight.get(image)
            if running is not None:
                log.info("joining a pull already in flight", image=str(image))
                running.listeners.append(listener)
                return running.future
            in_flight = _InFlightPull([listener])
            in_flight.future = self._pullers.submit(self._pull, image, in_flight)
            self._pulls_in_flight[image] = in_flight
        in_flight.future.add_done_callback(lambda _: self._forget_pull(image, in_flight))
        return in_flight.future

    def _forget_pull(self, image: ImageReference, in_flight: _InFlightPull) -> None:
        with self._lock:
            if self._pulls_in_flight.get(image) is in_flight:
                del self._pulls_in_flight[image]

    def _pull(self, image: ImageReference, in_flight: _InFlightPull) -> ImageInfo:
        """Pull thread: pulls, retrying transient failures with capped backoff."""
        started = time.monotonic()
        for attempt in range(1, self._retry.attempts + 1):
            log.info("pulling", image=str(image), attempt=attempt)
            try:
                info = self._store.pull(image, in_flight.report_progress)
            except PullFailed as failure:
                last_attempt = attempt == self._retry.attempts
                if failure.kind not in TRANSIENT_KINDS or last_attempt:
                    log.warning(
                        "pull failed",
                        image=str(image),
                        kind=failure.kind.value,
                        error=failure.message,
                        attempts=attempt,
                    )
                    if failure.kind in TRANSIENT_KINDS and attempt > 1:
                        raise PullFailed(
                            failure.kind, f"{failure.message} (gave up after {attempt} attempts)"
                        ) from None
                    raise
                delay = self._retry.delay(attempt)
                log.warning(
                    "pull attempt failed; retrying",
                    image=str(image),
                    kind=failure.kind.value,
                    error=failure.message,
                    attempt=attempt,
                    retry_in=delay,
                )
                if self._cancelling.wait(delay):
                    raise PullFailed(
                        ErrorKind.CANCELLED,
                        f"{failure.message}; not retried because the worker is shutting down",
                    ) from None
            except Exception as error:
                log.exception("pull failed unexpectedly", image=str(image))
                raise _internal(error) from None
            else:
                log.info(
                    "pulled",
                    image=str(image),
                    image_id=info.image_id,
                    attempt=attempt,
                    seconds=round(time.monotonic() - started, 3),
                )
                return info
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _finish(
        self,
        request: PullRequest,
        delivery: Delivery,
        channel: ReplyChannel,
        started: float,
        outcome: ImageInfo | BaseException,
        status: Status = Status.FAILED,
        on_connection_thread: bool = False,
    ) -> None:
        """Any thread: build the result, then reply and ack on the connection's thread."""
        seconds = round(time.monotonic() - started, 6)
        if isinstance(outcome, ImageInfo):
            result = NodeResult(
                request_id=request.request_id,
                node=self.node,
                image=str(request.image),
                status=status,
                seconds=seconds,
                image_id=outcome.image_id,
                digest=outcome.digest,
            )
        else:
            failure = outcome if isinstance(outcome, PullFailed) else _internal(outcome)
            result = NodeResult(
                request_id=request.request_id,
                node=self.node,
                image=str(request.image),
                status=Status.FAILED,
                seconds=seconds,
                error=NodeError(failure.kind, failure.message),
            )

        def send() -> None:
            try:
                if delivery.reply_to:
                    channel.reply(delivery.reply_to, delivery.correlation_id, result.encode())
                channel.ack(delivery)
            except Exception as error:
                log.warning(
                    "could not reply or ack; the connection was lost",
                    error=str(error),
                    request_id=request.request_id,
                )
            finally:
                with self._lock:
                    self._unfinished -= 1
            log.info(
                "answered",
                request_id=request.request_id,
                image=str(request.image),
                status=result.status.value,
                seconds=result.seconds,
                error_kind=result.error.kind.value if result.error else None,
            )

        if on_connection_thread:
            send()
        else:
            channel.call_soon(send)

    def cancel(self) -> None:
        """Cancels running pulls and retries; each waiting request is answered ``cancelled``."""
        self._cancelling.set()
        self._store.cancel_pulls()

    def shutdown(self, wait: bool) -> None:
        self._inspectors.shutdown(wait=wait, cancel_futures=not wait)
        self._pullers.shutdown(wait=wait, cancel_futures=not wait)


PROGRESS_INTERVAL = 0.25
"""Seconds between progress messages for one pull: at most four a second per node."""


class _ProgressListener:
    """A request waiting on a pull; sends it progress through its connection's thread."""

    def __init__(
        self, request: PullRequest, delivery: Delivery, channel: ReplyChannel, node: str
    ) -> None:
        self._request = request
        self._delivery = delivery
        self._channel = channel
        self._node = node

    def send(self, progress: PullProgress) -> None:
        reply_to = self._delivery.reply_to
        if not reply_to:
            return
        body = NodeProgress(
            request_id=self._request.request_id,
            node=self._node,
            image=str(self._request.image),
            done=progress.done,
            total=progress.total,
        ).encode()
        correlation_id = self._delivery.correlation_id
        self._channel.call_soon(lambda: self._channel.reply(reply_to, correlation_id, body))


class _InFlightPull:
    """One running pull of an image, and every request that waits on it."""

    def __init__(self, listeners: list[_ProgressListener]) -> None:
        self.listeners = listeners
        self.future: Future[ImageInfo] = Future()
        self._last_sent = 0.0

    def report_progress(self, progress: PullProgress) -> None:
        """Pull thread: forwards the engine's progress, throttled, to every waiting request."""
        now = time.monotonic()
        if now - self._last_sent < PROGRESS_INTERVAL and progress.done < progress.total:
            return
        self._last_sent = now
        for listener in list(self.listeners):
            listener.send(progress)


def _outcome(done: Future[ImageInfo]) -> ImageInfo | BaseException:
    if done.cancelled():
        return PullFailed(
            ErrorKind.CANCELLED, "the worker was shutting down and did not start this pull"
        )
    return done.exception() or done.result()


def _internal(error: BaseException) -> PullFailed:
    return PullFailed(
        ErrorKind.INTERNAL,
        f"the worker failed unexpectedly ({type(error).__name__}: {error}); "
        "this is a bug in puller: please report it with the worker's log",
    )


def _printable(text: str | None) -> str | None:
    if text is None or not text.isprintable() or not text.isascii():
        return None
    return text[:128]
