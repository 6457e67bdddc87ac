"""The channel requests are published on, and how RabbitMQ's confirms settle each one.

A request is two publishes (the live copy, ``mandatory``, then the history's) awaited
together: it settles once RabbitMQ confirmed both. A live copy that no worker queue took
comes back (a return, before its confirm) as :class:`NoNodes`. Everything here runs on
the publisher's I/O thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import pika
import pika.channel
import pika.frame
import pika.spec

from contract import CONTENT_TYPE, BrokerUnavailable, NoNodes
from contract import topology as topo


@dataclass
class _Ticket:
    """One request's publishes, waiting for RabbitMQ's confirms."""

    future: Future[None]
    request_id: str
    in_history: bool
    unconfirmed: int
    returned: bool = False
    refused: bool = False


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
    """For a returned request (a return names no delivery tag)."""

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
        copies = [(topo.PULLS.name, live, True)]
        if history:
            kept = pika.BasicProperties(
                content_type=CONTENT_TYPE, delivery_mode=2, user_id=self.user
            )
            copies.append((topo.HISTORY.name, kept, False))
        for exchange, properties, mandatory in copies:
            self._published += 1
            self._tickets[self._published] = ticket
            self.channel.basic_publish(exchange, "", body, properties, mandatory=mandatory)

    def fail_all(self, error: Exception) -> None:
        """The connection is gone: no request waiting for a confirm will get one."""
        for ticket in {id(t): t for t in self._tickets.values()}.values():
            if not ticket.future.done():
                ticket.future.set_exception(error)
        self._tickets.clear()
        self._by_request.clear()

    def _on_return(
        self,
        _channel: object,
        _method: object,
        properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        ticket = self._by_request.get(properties.correlation_id or "")
        if ticket is not None:
            ticket.returned = True

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
                )
            )
        else:
            ticket.future.set_result(None)
