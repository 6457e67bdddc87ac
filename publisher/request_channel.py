"""The channel requests are published on, and how RabbitMQ's confirms settle each one.

A request is two publishes (the live copy, then the history's, both ``mandatory``) awaited
together: it settles once RabbitMQ confirmed both. A live copy that no worker queue took
comes back (a return, before its confirm) as :class:`NoNodes`. A history copy that comes
back (the stream not bound yet, as just after a broker restart) is published again after a
short wait, a few times; one never taken is logged and counted (``on_history_returned``), and the
request still settles. Everything here runs on the publisher's I/O thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import pika
import pika.channel
import pika.frame
import pika.spec

from contract import CONTENT_TYPE, BrokerUnavailable, NoNodes
from contract import topology as topo

log = logging.getLogger("puller.publisher.broker")

HISTORY_ATTEMPTS = 5
"""Publishes of a request's history copy that RabbitMQ may return (unroutable) before the
request settles without it."""
HISTORY_RETRY_DELAY = 0.2
"""Seconds before the first republish of a returned history copy; doubled each time (3 s in
all for :data:`HISTORY_ATTEMPTS`, inside the wait for a confirm)."""


@dataclass
class _Ticket:
    """One request's publishes, waiting for RabbitMQ's confirms."""

    future: Future[None]
    request_id: str
    in_history: bool
    unconfirmed: int
    returned: bool = False
    refused: bool = False
    history_returns: int = 0


@dataclass
class RequestChannel:
    """A channel in confirm mode (see :meth:`confirming`), and the requests published on it
    that RabbitMQ has not confirmed yet."""

    channel: pika.channel.Channel
    where: str
    """The broker, as the errors name it."""
    reply_to: str
    user: str
    """The AMQP ``user_id`` of every request: RabbitMQ checks it is the connection's user."""
    _published: int = 0
    """Publishes so far: the next delivery tag is this plus one."""
    _tickets: dict[int, _Ticket] = field(default_factory=dict)
    _by_request: dict[str, _Ticket] = field(default_factory=dict)
    """For a returned request (a return names no delivery tag); every request not settled."""
    on_history_returned: Callable[[bool], None] = lambda _given_up: None
    """Called for each history copy RabbitMQ returns: ``True`` when the request settles
    without it, ``False`` when it is sent again."""
    _history_unbound: bool = False
    """A request's history copy came back every time, and none was taken since: the next
    ones are sent once each (a history left unbound must not slow every request)."""

    def confirming(self, on_ready: Callable[[], None]) -> None:
        """Puts the channel in confirm mode, and takes its returns; then ``on_ready``."""
        self.channel.add_on_return_callback(self._on_return)
        self.channel.confirm_delivery(self._on_confirm, callback=lambda _frame: on_ready())

    @property
    def is_open(self) -> bool:
        return bool(self.channel.is_open)

    def publish(self, body: bytes, request_id: str, history: bool, settled: Future[None]) -> None:
        """Live first (so a worker meets the live copy before the history's and skips the
        latter at no cost); a request that reached no worker is still recorded. ``settled``
        gets the outcome."""
        ticket = _Ticket(settled, request_id, in_history=history, unconfirmed=1 + history)
        self._by_request[request_id] = ticket
        live = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            correlation_id=request_id,
            reply_to=self.reply_to,
            delivery_mode=1,
            user_id=self.user,
        )
        self._publish(topo.PULLS.name, body, live, ticket)
        if history:
            self._publish_history(body, ticket)

    def _publish(
        self, exchange: str, body: bytes, properties: pika.BasicProperties, ticket: _Ticket
    ) -> None:
        self._published += 1
        self._tickets[self._published] = ticket
        self.channel.basic_publish(exchange, "", body, properties, mandatory=True)

    def _publish_history(self, body: bytes, ticket: _Ticket) -> None:
        """The history's copy: its ``correlation_id`` finds the ticket when it comes back
        (workers read no ``correlation_id`` from the history)."""
        kept = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            correlation_id=ticket.request_id,
            delivery_mode=2,
            user_id=self.user,
        )
        self._publish(topo.HISTORY.name, body, kept, ticket)

    def _republish_history(self, body: bytes, ticket: _Ticket) -> None:
        if ticket.future.done() or not self.channel.is_open:
            return  # the connection was lost meanwhile: fail_all settled the ticket
        self._publish_history(body, ticket)

    def fail_all(self, error: Exception) -> None:
        """The connection is gone: no request waiting for a confirm will get one."""
        waiting = [*self._tickets.values(), *self._by_request.values()]
        for ticket in {id(t): t for t in waiting}.values():
            if not ticket.future.done():
                ticket.future.set_exception(error)
        self._tickets.clear()
        self._by_request.clear()

    def _on_return(
        self,
        _channel: object,
        method: pika.spec.Basic.Return,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        ticket = self._by_request.get(properties.correlation_id or "")
        if ticket is None:
            return
        if method.exchange != topo.HISTORY.name:
            ticket.returned = True
            return
        ticket.history_returns += 1
        if ticket.returned:
            # No worker queue either (the live copy's return came first): NoNodes says
            # the request is not kept, at once.
            ticket.in_history = False
            return
        if ticket.history_returns >= HISTORY_ATTEMPTS or self._history_unbound:
            ticket.in_history = False
            self._history_unbound = True
            self.on_history_returned(True)
            log.warning(
                "RabbitMQ could not route request %s into the history (exchange %r is bound "
                "to no stream at %s) after %d attempts: nodes away now will not catch up on "
                "it. Check the binding of %s (workers declare it).",
                ticket.request_id,
                topo.HISTORY.name,
                self.where,
                ticket.history_returns,
                topo.HISTORY_STREAM_NAME,
            )
            return
        # Comes before the returned copy's confirm: the ticket waits for the next one.
        self.on_history_returned(False)
        ticket.unconfirmed += 1
        delay = HISTORY_RETRY_DELAY * 2 ** (ticket.history_returns - 1)
        log.info(
            "the history copy of request %s came back (no stream bound to %r yet); "
            "publishing it again in %.1fs",
            ticket.request_id,
            topo.HISTORY.name,
            delay,
        )
        self.channel.connection.ioloop.call_later(
            delay, lambda: self._republish_history(body, ticket)
        )

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        tags = [t for t in self._tickets if t <= tag] if method.multiple else [tag]
        for one in tags:
            ticket = self._tickets.pop(one, None)
            if ticket is None:
                continue
            ticket.refused |= isinstance(method, pika.spec.Basic.Nack)
            ticket.unconfirmed -= 1
            if ticket.unconfirmed == 0:
                self._settle(ticket)

    def _settle(self, ticket: _Ticket) -> None:
        if self._by_request.get(ticket.request_id) is ticket:
            del self._by_request[ticket.request_id]
        if ticket.in_history:
            self._history_unbound = False
        if ticket.future.done():
            return
        if ticket.refused:
            ticket.future.set_exception(
                BrokerUnavailable(
                    f"RabbitMQ at {self.where} refused the request (nack); see the broker's log"
                )
            )
        elif ticket.returned:
            ticket.future.set_exception(
                NoNodes(
                    f"no nodes: no worker queue is bound to exchange {topo.PULLS.name!r} at "
                    f"{self.where}, so no node received the request. Start puller-worker on "
                    "the nodes (with the same PULLER_AMQP_URL and vhost)."
                    + (
                        " The request is in the history, so workers that start within its "
                        "window will still pull the image."
                        if ticket.in_history
                        else ""
                    )
                    + (
                        f" It is not in the history either: no stream is bound to "
                        f"{topo.HISTORY.name!r}."
                        if ticket.history_returns
                        else ""
                    )
                )
            )
        else:
            ticket.future.set_result(None)
