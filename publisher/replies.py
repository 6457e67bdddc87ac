"""The answers nodes sent to this publisher's requests, kept for the callers that wait.

Replies arrive on the broker's I/O thread (:meth:`ReplyBook.receive`); callers wait on
their own threads (:meth:`ReplyBook.wait`), each for its own request, without holding
anything the I/O thread or other callers need. A waiter is woken only when it has
something to do: its condition is met, or it asked for every event and one came.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from contract import InvalidMessage, NodeProgress, NodeResult, PruneResult, decode_reply

log = logging.getLogger("puller.publisher.replies")

REQUESTS_REMEMBERED = 1000

Answer = NodeResult | PruneResult
"""A node's final answer to a request (a prune has its own)."""
Event = NodeProgress | Answer
Condition = Callable[[dict[str, Answer]], bool]


@dataclass
class _Waiter:
    done: Condition
    wants_events: bool
    wake: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Request:
    image: str | None = None
    results: dict[str, Answer] = field(default_factory=dict)
    """The first result from each node (a node asked again answers again; the first counts)."""
    events: deque[Event] = field(default_factory=deque)
    """Progress and results not yet handed to a waiting caller (only while one watches)."""
    watchers: int = 0
    waiters: list[_Waiter] = field(default_factory=list)


class ReplyBook:
    """Answers to the last :data:`REQUESTS_REMEMBERED` requests of one publisher."""

    def __init__(self, remembered: int = REQUESTS_REMEMBERED) -> None:
        self._remembered = remembered
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, _Request] = OrderedDict()

    def track(self, request_id: str, image: str | None = None, watch: bool = False) -> None:
        """Keeps the answers to ``request_id``; with ``watch``, also every progress report
        and result in order, for :meth:`wait`'s ``on_event`` (until :meth:`unwatch`)."""
        with self._lock:
            request = self._requests.setdefault(request_id, _Request(image))
            self._requests.move_to_end(request_id)
            if watch:
                request.watchers += 1
            while len(self._requests) > self._remembered:
                self._requests.popitem(last=False)

    def unwatch(self, request_id: str) -> None:
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None and request.watchers:
                request.watchers -= 1
                if not request.watchers:
                    request.events.clear()

    def receive(self, correlation_id: str | None, body: bytes) -> None:
        """I/O thread: one reply."""
        try:
            message = decode_reply(body)
        except InvalidMessage as error:
            log.warning(
                "ignored a reply that breaks the contract: %s",
                error,
                extra={"correlation_id": correlation_id},
            )
            return
        with self._lock:
            request = self._requests.get(message.request_id)
            if request is None and correlation_id is not None:
                request = self._requests.get(correlation_id)
            if request is None:
                log.debug(
                    "ignored a reply to a request this publisher does not know",
                    extra={"request_id": message.request_id, "node": message.node},
                )
                return
            if not isinstance(message, NodeProgress):
                if message.node in request.results:
                    return
                request.results[message.node] = message
            if request.watchers:
                request.events.append(message)
            for waiter in request.waiters:
                if waiter.wants_events or (
                    not isinstance(message, NodeProgress) and waiter.done(request.results)
                ):
                    waiter.wake.set()

    def lookup(self, request_id: str) -> tuple[str | None, dict[str, Answer]] | None:
        """The image and the answers so far of a request this publisher made and still
        remembers; ``None`` for any other."""
        with self._lock:
            request = self._requests.get(request_id)
            return None if request is None else (request.image, dict(request.results))

    def wait(
        self,
        request_id: str,
        done: Condition,
        deadline: float,
        on_event: Callable[[Event], None] | None = None,
        wake_every: float | None = None,
    ) -> dict[str, Answer]:
        """Waits until ``done(results)`` or the deadline (``time.monotonic()``), handing each
        progress report and result to ``on_event`` on this thread as it arrives. With
        ``wake_every``, returns at least that often (so the caller can look around)."""
        until = deadline if wake_every is None else min(deadline, time.monotonic() + wake_every)
        waiter = _Waiter(done, wants_events=on_event is not None)
        with self._lock:
            request = self._requests.setdefault(request_id, _Request())
            request.waiters.append(waiter)
        try:
            while True:
                with self._lock:
                    waiter.wake.clear()
                    events: list[Event] = []
                    if on_event is not None:
                        events = list(request.events)
                        request.events.clear()
                    results = dict(request.results)
                finished = done(results)
                if on_event is not None:
                    for event in events:
                        on_event(event)
                if finished:
                    return results
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return results
                waiter.wake.wait(remaining)
        finally:
            with self._lock:
                request.waiters.remove(waiter)
