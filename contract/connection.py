"""How both sides reach RabbitMQ: connection parameters, and pika's errors in puller's terms.

Only the modules that own a connection (``worker.broker``, ``publisher.broker`` and the
parts it is split into) import this; the rest of the code never sees a pika type.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from contract import topology as topo
from contract.errors import BrokerUnavailable, Misconfigured

ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406

CONNECTION_ERRORS = (pika.exceptions.AMQPError, AMQPConnectorException, OSError)
"""What a broken or refused connection raises in pika. A broker that accepts the TCP
connection and then says nothing raises ``AMQPConnectorStackTimeout``, which is none of
pika's ``AMQPError``: without it here, a silent broker node stopped the worker."""


_Link = TypeVar("_Link")

_ENCODE = "(characters such as # / ? @ % in a user name or password must be percent-encoded)"


def split_urls(text: str) -> list[str]:
    """The brokers ``text`` names: one URL, or several nodes of one RabbitMQ cluster
    separated by commas (a comma in a password is written ``%2C``). Connections go to the
    first that answers, and fail over to the next when one is lost."""
    return [url.strip() for url in text.split(",") if url.strip()] or [text]


def check_url(url: str) -> None:
    """Raises :class:`Misconfigured` when ``url`` (or any of a comma-separated list) is not
    an ``amqp(s)://`` URL with a host and a numeric port; never repeats the URL, which
    holds a password."""
    for one in split_urls(url):
        _check_one_url(one)


def _check_one_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise Misconfigured("the RabbitMQ URL must start with amqp:// or amqps://")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise Misconfigured(f"the RabbitMQ URL's port is not a number {_ENCODE}") from None
    if not parts.hostname:
        raise Misconfigured(f"the RabbitMQ URL names no host {_ENCODE}")


@dataclass(frozen=True)
class BrokerTls:
    """Files for TLS to RabbitMQ (``amqps://`` URLs): the CA that signed the broker's
    certificate (unset: the system's CAs), and a client certificate and key when the broker
    asks for one. The broker's certificate is always verified, host name included."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def configured(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def problem(self, url: str) -> str | None:
        """What is wrong with using these files for ``url``, or ``None``."""
        for one in split_urls(url):
            scheme = urlsplit(one).scheme
            if scheme not in ("amqp", "amqps"):
                return f"the RabbitMQ URL must start with amqp:// or amqps://, not {scheme}://"
            if self.configured and scheme != "amqps":
                return (
                    "TLS files are given but the RabbitMQ URL is amqp://, which is never "
                    "encrypted: use amqps:// (port 5671 by default)"
                )
        if (self.cert_file is None) != (self.key_file is None):
            return "a client certificate needs both its certificate and its key file"
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not path.is_file():
                return f"TLS file {str(path)!r} does not exist or is not a file"
        return None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the broker; raises ``ValueError`` on a bad file."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
            if self.cert_file is not None:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
        except (ssl.SSLError, OSError) as error:
            raise ValueError(f"the TLS files cannot be used: {describe(error)}") from None
        return context


def broker_candidates(
    url: str,
    *,
    heartbeat: int,
    connect_timeout: float,
    blocked_timeout: float,
    tls: BrokerTls | None = None,
) -> list[pika.URLParameters]:
    """Parameters for each broker ``url`` names (see :func:`split_urls`), in its order."""
    return [
        connection_parameters(
            one,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            blocked_timeout=blocked_timeout,
            tls=tls,
        )
        for one in split_urls(url)
    ]


SPREAD = "spread"
LISTED = "listed"
BROKER_ORDERS = (SPREAD, LISTED)
"""How a client orders the brokers of its URL list: ``spread``, by a hash of its name
(:func:`spread_order`), so that a cluster's clients share the broker nodes; ``listed``, as
written."""


def spread_order(count: int, name: str) -> list[int]:
    """The order, as indexes into a list of ``count`` brokers, in which the client called
    ``name`` tries them: by SHA-256 of the name and the index, lowest first (rendezvous
    hashing). Clients with different names land on every broker about equally, each always
    on the same one; when one broker goes, its clients spread evenly over the others, not
    all onto the next; a broker added at the end takes about its share from each."""

    def weight(index: int) -> bytes:
        return hashlib.sha256(f"{name}\0{index}".encode("utf-8", errors="surrogatepass")).digest()

    return sorted(range(count), key=weight)


class Brokers:
    """The brokers of a URL list in the order a client tries them, and the one in use."""

    def __init__(self, candidates: list[pika.URLParameters], order: str, name: str) -> None:
        """``order``: one of :data:`BROKER_ORDERS`; ``name``: the client's, which a
        ``spread`` order hashes."""
        if order not in BROKER_ORDERS:
            raise ValueError(f"broker_order must be one of {BROKER_ORDERS}, not {order!r}")
        indexes = spread_order(len(candidates), name) if order == SPREAD else range(len(candidates))
        self.candidates = [candidates[index] for index in indexes]
        self._at = 0
        self._connected_once = False

    @property
    def current(self) -> pika.URLParameters:
        """The broker in use, or tried last."""
        return self.candidates[self._at]

    def open(self, connect: Callable[[pika.URLParameters], _Link]) -> tuple[_Link, bool]:
        """``connect(parameters)`` to the first broker that answers, starting after the one
        used last (a lost connection fails over to the next at once), and whether another
        broker failed first. Raises :class:`BrokerUnavailable` saying why each failed."""
        count = len(self.candidates)
        first = (self._at + 1) % count if self._connected_once else self._at
        failures = []
        for step in range(count):
            index = (first + step) % count
            try:
                link = connect(self.candidates[index])
            except CONNECTION_ERRORS as error:
                failures.append((where(self.candidates[index]), describe(error)))
                continue
            self._at = index
            self._connected_once = True
            return link, bool(failures)
        self._at = first
        if count == 1:
            at, why = failures[0]
            raise BrokerUnavailable(f"cannot connect to RabbitMQ at {at}: {why}")
        raise BrokerUnavailable(
            f"cannot connect to any of {count} RabbitMQ brokers: "
            + "; ".join(f"{at}: {why}" for at, why in failures)
        )


def connection_parameters(
    url: str,
    *,
    heartbeat: int,
    connect_timeout: float,
    blocked_timeout: float,
    tls: BrokerTls | None = None,
) -> pika.URLParameters:
    """One attempt per call (the callers own their retry loops), bounded in time. An
    ``amqps://`` URL is always TLS with the broker's certificate and host name verified
    (against ``tls.ca_file`` when given), never a fallback to plain AMQP. One broker: for
    a list, see :func:`broker_candidates`."""
    if len(split_urls(url)) > 1:
        raise Misconfigured("one RabbitMQ URL here, not a list")
    check_url(url)
    try:
        parameters = pika.URLParameters(url)
    except ValueError:  # pika's message quotes the URL, password and all
        raise Misconfigured(f"the RabbitMQ URL cannot be read {_ENCODE}") from None
    if urlsplit(url).scheme == "amqps":
        context = (tls or BrokerTls()).context()
        parameters.ssl_options = pika.SSLOptions(context, server_hostname=parameters.host)
    parameters.heartbeat = heartbeat
    parameters.connection_attempts = 1
    parameters.socket_timeout = connect_timeout
    parameters.stack_timeout = connect_timeout
    parameters.blocked_connection_timeout = blocked_timeout
    return parameters


def where(parameters: pika.connection.Parameters) -> str:
    """The broker as a person reads it; never the credentials."""
    return f"{parameters.host}:{parameters.port} vhost {parameters.virtual_host!r}"


def describe(error: BaseException) -> str:
    """The error that matters, in one line: pika wraps a refused socket in two or three
    layers of its own errors; this unwraps them to the cause."""
    for _ in range(5):
        inner = getattr(error, "exceptions", None)
        if isinstance(inner, list | tuple) and inner and isinstance(inner[-1], BaseException):
            error = inner[-1]
            continue
        inner = getattr(error, "exception", None)
        if isinstance(inner, BaseException):
            error = inner
            continue
        if (
            isinstance(error, pika.exceptions.AMQPConnectionError)
            and error.args
            and isinstance(error.args[0], BaseException)
        ):
            error = error.args[0]
            continue
        break
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def broker_errors(what: str, parameters: pika.connection.Parameters) -> Iterator[None]:
    """Turns a broken connection inside the block into :class:`BrokerUnavailable`:
    ``"{what} at HOST:PORT vhost V: ErrorType: detail"``, e.g. what = "lost the connection
    to RabbitMQ"."""
    try:
        yield
    except CONNECTION_ERRORS as error:
        raise BrokerUnavailable(f"{what} at {where(parameters)}: {describe(error)}") from None


class ServedConnection:
    """pika's asynchronous connection, served by the one thread that calls these methods:
    each call runs its I/O loop until what it waits for has come, or for a bounded time (a
    timer stops the loop), so no wait outlasts its bound, even on a broker that reads
    nothing more. pika's callbacks run inside these calls (and call none of them but
    :meth:`wake`, :meth:`fail` and :meth:`channel` with ``on_open``); a callback that makes
    a wait's condition true calls :meth:`wake`. From another thread, only
    :meth:`add_callback_threadsafe`. Raises pika's error if it cannot open."""

    def __init__(self, parameters: pika.connection.Parameters, answer_wait: float) -> None:
        self.parameters = parameters
        self.answer_wait = answer_wait
        """The longest wait for the broker to answer one method (see :meth:`call`)."""
        self._until: Callable[[], bool] | None = None
        self._trouble: BaseException | None = None
        self._closed_why: dict[Any, BaseException] = {}
        outcome: list[BaseException | None] = []

        def opened(_connection: object, error: BaseException | None = None) -> None:
            outcome.append(error)
            self.wake()

        self.connection = pika.SelectConnection(
            parameters,
            on_open_callback=opened,
            on_open_error_callback=opened,
            on_close_callback=self._on_closed,
        )
        self._ioloop = self.connection.ioloop
        # pika's own timeouts (socket, stack) end an attempt first; this is a backstop.
        self._loop(lambda: bool(outcome), 3 * answer_wait)
        if outcome == [None]:
            return
        if not self.connection.is_closed:
            self.connection.close()  # aborts the attempt: its error comes as the outcome
            self._loop(lambda: False, answer_wait)
        self._ioloop.close()
        raise next((e for e in outcome if e is not None), None) or AMQPConnectorException(
            "no answer while connecting"
        )

    @property
    def is_open(self) -> bool:
        return bool(self.connection.is_open)

    def serve(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        """Serves the connection until ``until()`` or for ``seconds``; raises what ended
        the connection's use meanwhile (its loss, or an error given to :meth:`fail`)."""
        self._loop(lambda: until() or self._trouble is not None, seconds)
        if self._trouble is not None:
            raise self._trouble

    def wake(self) -> None:
        """Ends the current wait if its condition is now true."""
        until = self._until
        if until is not None and until():
            self._ioloop.stop()

    def fail(self, error: BaseException) -> None:
        """From a callback: ends the current wait, which raises ``error`` (and so does
        every one after it). An error raised inside pika's loop would drop the connection."""
        if self._trouble is None:
            self._trouble = error
        self.wake()

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        """Any thread: ``callback`` runs on the serving thread, in its next or current wait."""
        self._ioloop.add_callback_threadsafe(callback)

    def channel(
        self,
        on_close: Callable[[Any, BaseException], None] | None = None,
        on_open: Callable[[Any], None] | None = None,
    ) -> Any:
        """A new channel: with ``on_open``, returned at once and opened later; without,
        returned open. ``on_close(channel, reason)`` is told when it closes."""
        if not self.connection.is_open:
            raise pika.exceptions.ConnectionWrongStateError("the connection is not open")

        def closed(channel: Any, reason: BaseException) -> None:
            self._closed_why[channel] = reason
            if len(self._closed_why) > 8:  # only the latest are asked about
                del self._closed_why[next(iter(self._closed_why))]
            if on_close is not None:
                on_close(channel, reason)
            self.wake()

        channel = self.connection.channel(on_open_callback=on_open or (lambda _c: self.wake()))
        channel.add_on_close_callback(closed)
        if on_open is None:
            self.serve(self.answer_wait, lambda: channel.is_open or channel.is_closed)
            if not channel.is_open:
                raise self._why(channel)
        return channel

    def call(self, channel: Any, method: Callable[..., object]) -> Any:
        """Calls ``method(callback=...)``, one of ``channel``'s methods the broker answers,
        and waits for the answer (a frame, returned). A refusal closes the channel: it is
        raised (``ChannelClosedByBroker``, with the broker's code)."""
        answers: list[Any] = []

        def answered(frame: Any) -> None:
            answers.append(frame)
            self.wake()

        method(callback=answered)
        self.serve(self.answer_wait, lambda: bool(answers) or not channel.is_open)
        if answers:
            return answers[0]
        raise self._why(channel)

    def why_closed(self, channel: Any) -> BaseException | None:
        """What pika said when ``channel`` (one of the latest few) closed."""
        return self._closed_why.get(channel)

    def close(self, wait: float) -> bool:
        """Closes the connection, serving it for up to ``wait`` seconds for the broker's
        answer, then frees the loop; whether it closed in time. Not from inside a wait."""
        try:
            if self.connection.is_open:
                self.connection.close()
            self._loop(lambda: False, wait)
        finally:
            self._ioloop.close()
        return bool(self.connection.is_closed)

    def _why(self, channel: Any) -> BaseException:
        return self._closed_why.get(channel) or BrokerUnavailable(
            f"RabbitMQ at {where(self.parameters)} did not answer within {self.answer_wait:g}s"
        )

    def _loop(self, done: Callable[[], bool], seconds: float) -> None:
        """Runs the loop until ``done()``, the connection closes, or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        self._until = done
        try:
            while not done() and not self.connection.is_closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                timer = self._ioloop.call_later(left, self._ioloop.stop)
                try:
                    self._ioloop.start()
                finally:
                    self._ioloop.remove_timeout(timer)
        finally:
            self._until = None

    def _on_closed(self, _connection: object, reason: BaseException) -> None:
        if self._trouble is None and not isinstance(
            reason, pika.exceptions.ConnectionClosedByClient
        ):
            self._trouble = reason
        self._ioloop.stop()


def declare(channel: Any, item: topo.Declaration, **extra: Any) -> None:
    """Makes one declaration of :mod:`contract.topology` on a pika channel, blocking or not
    (``extra``: what the channel kind takes besides, such as the asynchronous callback)."""
    if isinstance(item, topo.Exchange):
        channel.exchange_declare(item.name, exchange_type=item.kind, durable=item.durable, **extra)
    elif isinstance(item, topo.Queue):
        channel.queue_declare(
            item.name,
            durable=item.durable,
            exclusive=item.exclusive,
            auto_delete=item.auto_delete,
            arguments=dict(item.arguments) or None,
            **extra,
        )
    else:
        channel.queue_bind(item.queue, item.exchange, routing_key=item.routing_key, **extra)
