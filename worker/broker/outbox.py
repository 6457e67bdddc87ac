"""What any thread hands to the connection's thread, and what waits for a connection.

One thread serves the worker's AMQP connection, and pika takes nothing from other threads
but a callback to run on that one. :class:`Outbox` is the part of the broker that any
thread calls: an answer, a progress report or a callback runs on the connection's thread
(at once when called there), and is kept for the next connection while there is none, or
when the connection closes before running it: every answer, only the latest progress of
each request, every callback. It holds no pika type; the broker says how to hop and send.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable

import structlog

from contract import NodeProgress
from contract.messages import Message
from worker.broker.delivery import Delivery

log = structlog.get_logger("worker.broker")


class Outbox:
    """Answers from any thread; the broker implements the hooks below."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting_answers: list[tuple[Delivery, Message | None, bool]] = []
        self._waiting_progress: dict[tuple[str, str], tuple[Delivery, NodeProgress]] = {}
        self._waiting_calls: list[Callable[[], None]] = []
        self._handed: dict[int, Callable[[], None]] = {}
        """Actions handed to the connection's thread and not yet run there, each with what
        keeps it for the next connection if this one closes first."""
        self._numbers = itertools.count()

    # -- hooks ---------------------------------------------------------------------------------

    def _on_own_thread(self) -> bool:
        """Whether this is the connection's thread, with the connection open."""
        raise NotImplementedError

    def _post(self, hop: Callable[[], None]) -> bool:
        """Has ``hop`` run on the connection's thread; ``False`` without an open one."""
        raise NotImplementedError

    def _send_answer(self, delivery: Delivery, result: Message | None, refuse: bool) -> None:
        raise NotImplementedError

    def _send_progress(self, delivery: Delivery, message: NodeProgress) -> None:
        raise NotImplementedError

    def _send_ack(self, delivery: Delivery) -> None:
        raise NotImplementedError

    # -- any thread ----------------------------------------------------------------------------

    def acknowledge(self, delivery: Delivery) -> Delivery:
        """Acks ``delivery`` now, before it is served, and returns it marked so that its
        answer is sent without a second ack. For warm-ups: unacked they would fill the
        prefetch window and hold a session's request back in the broker. Nothing is lost
        by it: the request is in the history, and the worker saves its place there only
        when it has nothing unanswered."""
        self._hand(
            lambda: self._send_ack(delivery),
            waiting=lambda: None,  # the channel is gone: the broker has put it back
        )
        return dataclasses.replace(delivery, acked=True)

    def answer(self, delivery: Delivery, result: Message | None, refuse: bool = False) -> None:
        """Replies ``result`` to the delivery's ``reply_to`` (if any) and acks the delivery;
        with ``refuse``, rejects it without requeue instead (a message that can never be
        served; a stream takes acks only)."""
        self._hand(
            lambda: self._send_answer(delivery, result, refuse),
            waiting=lambda: self._waiting_answers.append((delivery, result, refuse)),
        )

    def progress(self, delivery: Delivery, message: NodeProgress) -> None:
        """Sends a progress report to the delivery's ``reply_to``."""
        reply_to = delivery.reply_to
        if not reply_to:
            return
        key = (reply_to, message.request_id)
        self._hand(
            lambda: self._send_progress(delivery, message),
            waiting=lambda: self._waiting_progress.__setitem__(key, (delivery, message)),
        )

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` on the connection's thread, after what that thread is doing now."""
        self._hand(callback, waiting=lambda: self._waiting_calls.append(callback), defer=True)

    @property
    def handing_over(self) -> int:
        """Answers and callbacks handed to the connection's thread, not yet run there: a
        worker that stops must serve the connection until this is 0, or lose them."""
        with self._lock:
            return len(self._handed)

    def waiting(self) -> tuple[int, int, int]:
        """What waits for the next connection: answers, progress reports, callbacks."""
        with self._lock:
            return (
                len(self._waiting_answers),
                len(self._waiting_progress),
                len(self._waiting_calls),
            )

    # -- for the broker ------------------------------------------------------------------------

    def _hand(
        self, action: Callable[[], None], waiting: Callable[[], None], defer: bool = False
    ) -> None:
        if not defer and self._on_own_thread():
            action()
            return
        with self._lock:
            number = next(self._numbers)
            self._handed[number] = waiting

            def hop() -> None:
                with self._lock:
                    if self._handed.pop(number, None) is None:
                        return  # the connection closed first: kept for the next one
                    if not self._on_own_thread():
                        waiting()
                        return
                try:
                    action()
                except Exception:  # raised here, it would stop pika's loop and the worker
                    log.exception("an action on the connection's thread failed")

            if not self._post(hop):
                del self._handed[number]
                waiting()

    def _keep_answer(self, delivery: Delivery, result: Message | None, refuse: bool) -> None:
        """An answer the connection could not send: it waits for the next one."""
        with self._lock:
            self._waiting_answers.append((delivery, result, refuse))

    def _keep_handed(self) -> None:
        """With the lock held, as the connection goes: what it has not run waits."""
        handed, self._handed = self._handed, {}
        for keep in handed.values():
            keep()

    def _send_what_waited(self) -> None:
        with self._lock:
            answers, self._waiting_answers = self._waiting_answers, []
            progress, self._waiting_progress = self._waiting_progress, {}
            calls, self._waiting_calls = self._waiting_calls, []
        if answers or progress or calls:
            log.info(
                "sending what waited for the connection",
                answers=len(answers),
                progress=len(progress),
                callbacks=len(calls),
            )
        for delivery, message in progress.values():
            self._send_progress(delivery, message)
        for delivery, result, refuse in answers:
            self._send_answer(delivery, result, refuse)
        for callback in calls:
            callback()
