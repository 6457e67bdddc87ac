"""The connection a caller's thread publishes a request on itself: a shortcut, never a need.

Through :mod:`publisher.broker`, a request crosses two threads: the caller hands it to the
I/O thread, which publishes it, and the I/O thread hands the broker's confirms back. On a
loaded machine each crossing is a wake-up of a sleeping thread, and together they were
most of what ``request()`` cost beyond a bare publish. This module owns a second
connection, with the broker URL the I/O thread's connection uses, which a caller uses from
its own thread: it writes both copies of the request, reads the confirms itself, and
returns.

Only one thread uses it at a time, and a caller never waits for it: one that finds it in
use, not open, or aimed at a broker the publisher has left goes through the I/O thread as
before. It is opened once a second request was made (a CLI command, which asks once,
never opens it), and opened again, kept alive and closed on a thread of its own, never on
a caller's time.

A request written on it is settled on it: confirmed, refused, or not confirmed within the
caller's wait (the same wait as through the I/O thread, and the same error). Only if the
connection closes before the confirms come is the request published again (same id)
through the I/O thread: a node may then get it twice, as it may after any reconnection,
and pulling an image twice costs nothing.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from dataclasses import dataclass, field

import pika
import pika.channel
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel

from contract import CONTENT_TYPE
from contract import topology as topo
from contract.connection import describe, run_until, where

log = logging.getLogger("puller.publisher.caller_connection")

CLOSE_WAIT = 1.0
"""Seconds closing waits for the broker's answer before dropping the socket."""
KEEP_INTERVAL = 5.0
"""Seconds between the keeper's looks at an idle connection (heartbeats, a close)."""
CLIENT_PROPERTIES = {"connection_name": "puller publisher: requests from the caller's thread"}
"""How the connection shows in ``rabbitmqctl list_connections client_properties`` and the
management UI."""
NEEDED_AFTER = 2
"""Requests a publisher makes before the connection is opened: one that asks once (a CLI
command) never pays for it."""
REOPEN_FIRST_DELAY = 0.5
REOPEN_MAX_DELAY = 30.0


class Unconfirmed(TimeoutError):
    """A request was written on the connection and not confirmed within the caller's wait;
    it may or may not have been published."""


@dataclass(frozen=True)
class Confirmed:
    """RabbitMQ confirmed every copy of a request; what it said of them."""

    returned: bool
    """The live copy reached no queue (it was ``mandatory``)."""
    refused: bool
    """A copy was nacked."""


def request_frames(
    channel_number: int,
    frame_limit: int,
    body: bytes,
    request_id: str,
    reply_queue: str,
    user: str,
    history: bool,
) -> tuple[bytes, int]:
    """Both copies of a request (the live one first, ``mandatory``; then, with ``history``,
    the persistent one for the history), marshalled for one write; with how many publishes
    that is. Written at once: through a channel, pika writes every frame with a send of its
    own (six for the two copies), and each send wakes the broker."""
    live = pika.BasicProperties(
        content_type=CONTENT_TYPE,
        correlation_id=request_id,
        reply_to=reply_queue,
        delivery_mode=1,
        user_id=user,
    )
    frames = _publish_frames(channel_number, frame_limit, topo.PULLS.name, body, live, True)
    if not history:
        return frames, 1
    kept = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=2, user_id=user)
    return frames + _publish_frames(
        channel_number, frame_limit, topo.HISTORY.name, body, kept, False
    ), 2


def _publish_frames(
    number: int,
    limit: int,
    exchange: str,
    body: bytes,
    properties: pika.BasicProperties,
    mandatory: bool,
) -> bytes:
    method = pika.spec.Basic.Publish(exchange=exchange, routing_key="", mandatory=mandatory)
    return b"".join(
        (
            pika.frame.Method(number, method).marshal(),
            pika.frame.Header(number, len(body), properties).marshal(),
            *(
                pika.frame.Body(number, body[start : start + limit]).marshal()
                for start in range(0, len(body), limit)
            ),
        )
    )


@dataclass
class _Open:
    """An open connection, its confirming channel, and what is waiting for a confirm."""

    parameters: pika.ConnectionParameters
    connection: pika.BlockingConnection
    blocking_channel: BlockingChannel
    """Kept: closing the connection closes its channels through it."""
    published: int = 0
    unconfirmed: set[int] = field(default_factory=set)
    refused: bool = False
    returned: bool = False
    """Of the one request in flight (the connection carries one at a time, and a return
    comes before its confirm)."""
    opened_at: float = field(default_factory=time.monotonic)

    @property
    def channel(self) -> pika.channel.Channel:
        """The blocking channel's own channel: publishes and callbacks without its waits."""
        return self.blocking_channel._impl  # noqa: SLF001

    @property
    def usable(self) -> bool:
        return bool(self.connection.is_open and self.channel.is_open)

    def on_return(self, *_returned: object) -> None:
        self.returned = True

    def on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self.refused = True
        if method.multiple:
            self.unconfirmed = {tag for tag in self.unconfirmed if tag > method.delivery_tag}
        else:
            self.unconfirmed.discard(method.delivery_tag)

    def publish(
        self,
        body: bytes,
        request_id: str,
        reply_queue: str,
        user: str,
        history: bool,
        wait: float,
    ) -> Confirmed:
        """Writes the request and reads until both copies are confirmed. Raises
        :class:`Unconfirmed` after ``wait`` seconds, anything else if the connection
        closes first."""
        impl = self.connection._impl  # noqa: SLF001 - the frames are written as one
        frames, count = request_frames(
            self.channel.channel_number,
            impl._body_max_length,  # noqa: SLF001 - frame_max, as tuned
            body,
            request_id,
            reply_queue,
            user,
            history,
        )
        self.refused = self.returned = False
        self.unconfirmed.update(range(self.published + 1, self.published + count + 1))
        self.published += count
        impl._output_marshaled_frames([frames])  # noqa: SLF001
        run_until(self.connection, lambda: not self.unconfirmed or not self.channel.is_open, wait)
        if self.unconfirmed:
            if self.channel.is_open:
                raise Unconfirmed(f"not confirmed within {wait:g}s")
            raise ConnectionError("the channel closed before the confirms came")
        return Confirmed(returned=self.returned, refused=self.refused)

    def close(self) -> None:
        _close(self.connection)


def _close(connection: pika.BlockingConnection) -> None:
    """Closes ``connection``; a broker that does not answer the close within
    :data:`CLOSE_WAIT` (one gone silent) has the socket dropped: this never hangs, and leaves
    no socket open (pika's own loop has two)."""
    impl = connection._impl  # noqa: SLF001 - pika's close waits for the broker unbounded
    drop = impl._adapter_disconnect_stream  # noqa: SLF001
    with contextlib.suppress(Exception):  # whatever state it is in, it ends closed
        if connection.is_open:
            impl.ioloop.call_later(CLOSE_WAIT, drop)
            connection.close()
    with contextlib.suppress(Exception):
        if not impl.is_closed:
            drop()
            connection._flush_output(lambda: bool(impl.is_closed))  # noqa: SLF001
    with contextlib.suppress(Exception):
        connection._cleanup()  # noqa: SLF001 - closes the loop; done twice is harmless


@dataclass
class _Backoff:
    """When the keeper may open a connection again."""

    delay: float = REOPEN_FIRST_DELAY
    retry_at: float = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.retry_at

    def left(self) -> float:
        return max(0.0, self.retry_at - time.monotonic())

    def failed(self) -> None:
        self.retry_at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, REOPEN_MAX_DELAY)

    def lost(self, connection: _Open) -> None:
        """``connection`` closed or failed: one that lived a while is opened again at once,
        one that did not after the backoff (a broker that closes every new connection gets
        no storm of them)."""
        if time.monotonic() - connection.opened_at >= KEEP_INTERVAL:
            self.delay, self.retry_at = REOPEN_FIRST_DELAY, 0.0
        else:
            self.failed()


class CallerConnection:
    """Safe from any thread. :meth:`aim_at` says which broker to be connected to (the one the
    I/O thread is connected to), :meth:`publish` is the shortcut, :meth:`close` ends it.
    ``open_timeout`` bounds each step of opening it."""

    def __init__(self, reply_queue: str, user: str, open_timeout: float) -> None:
        self._reply_queue = reply_queue
        self._user = user
        self._open_timeout = open_timeout
        self._use = threading.Lock()
        """Held by the one thread using the connection; taken before ``_changed``."""
        self._changed = threading.Condition()
        self._version = 0
        """Counts what the keeper must look at again (under ``_changed``)."""
        self._wanted: pika.ConnectionParameters | None = None
        self._requests = 0
        """Requests made, counted up to :data:`NEEDED_AFTER`."""
        self._needed = False
        """Enough requests were made to be worth a connection of its own."""
        self._open: _Open | None = None
        self._retired: list[_Open] = []
        """Connections a publish gave up on, for the keeper to close."""
        self._closed = False
        self._thread: threading.Thread | None = None

    def aim_at(self, parameters: pika.ConnectionParameters | None) -> None:
        """Be connected to ``parameters``' broker (``None``: to none) from now on."""
        with self._changed:
            if self._closed:
                return
            self._wanted = parameters
            self._version += 1
            if self._thread is None and parameters is not None:
                self._thread = threading.Thread(
                    target=self._keep, name="puller-publisher-caller-connection", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    @property
    def open(self) -> bool:
        """Whether a caller would find the connection open now (unless it is in use)."""
        current = self._open
        return current is not None and current.usable and current.parameters is self._wanted

    def publish(self, body: bytes, request_id: str, history: bool, wait: float) -> Confirmed | None:
        """The request published and confirmed from this thread. ``None`` if nothing was
        written, or the connection closed before the confirms came: publish it the other
        way. Raises :class:`Unconfirmed` when it was written and not confirmed within
        ``wait`` seconds."""
        if not self._needed:
            with self._changed:
                self._requests += 1
                if self._requests >= NEEDED_AFTER and not self._needed:
                    self._needed = True
                    self._version += 1
                    self._changed.notify_all()
        if not self._use.acquire(blocking=False):
            return None
        closed_first = False
        current = self._open
        try:
            if current is None or not current.usable or current.parameters is not self._wanted:
                return None
            try:
                return current.publish(
                    body, request_id, self._reply_queue, self._user, history, wait
                )
            except BaseException as error:
                self._open = None
                with self._changed:
                    closed_first = self._closed
                    if not closed_first:
                        self._retired.append(current)  # closing it is not the caller's time
                        self._version += 1
                        self._changed.notify_all()
                log.info(
                    "publishing from the caller's thread to %s failed (%s)%s",
                    where(current.parameters),
                    describe(error),
                    "" if isinstance(error, Unconfirmed) else "; publishing through the I/O thread",
                )
                if isinstance(error, Unconfirmed) or not isinstance(error, Exception):
                    raise
        finally:
            self._use.release()
            if closed_first and current is not None:
                current.close()
        return None

    def close(self) -> None:
        """Ends it: bounded, though it waits for a publish in flight (at most that caller's
        wait) and for the keeper to finish opening (at most twice ``open_timeout``)."""
        with self._changed:
            self._closed = True
            self._wanted = None
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=2 * self._open_timeout + CLOSE_WAIT + 1)
        with self._use:
            current, self._open = self._open, None
            with self._changed:
                left, self._retired = self._retired, []
        for one in [*left, *([current] if current is not None else [])]:
            one.close()

    # -- the keeper's thread ----------------------------------------------------------------

    def _keep(self) -> None:
        """Opens the connection to the broker wanted once it is needed, closes one to any
        other, and looks at an idle one now and then (pika sends heartbeats and notices a
        close only when it runs). Never holds ``_use`` while waiting."""
        backoff, aimed = _Backoff(), None
        while True:
            with self._changed:
                if self._closed:
                    return
                wanted, needed, version = self._wanted, self._needed, self._version
                retired, self._retired = self._retired, []
            for one in retired:
                backoff.lost(one)
                one.close()
            if wanted is not aimed:  # a new broker: no backoff from the last one's failures
                aimed, backoff = wanted, _Backoff()
            current = self._open
            if current is not None and (current.parameters is not wanted or not current.usable):
                if self._take_away(current) and current.parameters is wanted:
                    backoff.lost(current)
                continue
            if current is None and wanted is not None and needed:
                if backoff.due():
                    if not self._try_to_open(wanted):
                        backoff.failed()
                    continue
            elif current is not None and not self._look_at(current):
                continue
            opening = current is None and wanted is not None and needed
            self._pause(version, backoff.left() if opening else KEEP_INTERVAL)

    def _pause(self, version: int, seconds: float) -> None:
        """Waits ``seconds``, or less if anything changed since ``version``."""
        with self._changed:
            if not self._closed and self._version == version:
                self._changed.wait(seconds)

    def _try_to_open(self, wanted: pika.ConnectionParameters) -> bool:
        """Opens the connection to ``wanted`` unless it is no longer wanted; false if it
        could not."""
        with self._changed:
            if self._closed or self._wanted is not wanted:
                return True
        return self._install(wanted)

    def _take_away(self, current: _Open) -> bool:
        """Closes ``current`` unless a caller's publish has already taken it away."""
        with self._use:
            mine = self._open is current
            if mine:
                self._open = None
        if mine:
            current.close()
        return mine

    def _look_at(self, current: _Open) -> bool:
        """Lets pika send a heartbeat, and read a close, unless a caller is using it;
        false if it is closed now."""
        if not self._use.acquire(blocking=False):
            return True
        try:
            if self._open is not current:
                return True  # a caller took it away (and may be closing it): not ours now
            current.connection.process_data_events(0)
        except Exception as error:
            log.info("the caller's connection to %s: %s", where(current.parameters), error)
        finally:
            self._use.release()
        return current.usable

    def _install(self, wanted: pika.ConnectionParameters) -> bool:
        """Opens a connection to ``wanted`` for callers to use; false if it cannot."""
        opened = self._open_to(wanted)
        if opened is None:
            return False
        with self._use:
            with self._changed:
                keep = not self._closed and self._wanted is wanted
            if keep:
                self._open = opened
        if not keep:
            opened.close()
        return True

    def _open_to(self, parameters: pika.ConnectionParameters) -> _Open | None:
        named = copy.copy(parameters)
        named.client_properties = {**(parameters.client_properties or {}), **CLIENT_PROPERTIES}
        try:
            connection = pika.BlockingConnection(named)  # bounded by its stack timeout
        except Exception as error:
            log.info("cannot open the caller's connection to %s: %s", where(parameters), error)
            return None
        impl = connection._impl  # noqa: SLF001
        # A broker gone silent after opening must not hold the keeper (nor close()).
        timer = impl.ioloop.call_later(self._open_timeout, impl._adapter_disconnect_stream)  # noqa: SLF001
        try:
            opened = _Open(parameters, connection, connection.channel())
            channel = opened.channel
            confirming: list[bool] = []
            channel.add_on_return_callback(opened.on_return)
            channel.confirm_delivery(opened.on_confirm, callback=lambda _f: confirming.append(True))
            connection._flush_output(lambda: bool(confirming))  # noqa: SLF001
        except Exception as error:
            log.info("cannot open the caller's connection to %s: %s", where(parameters), error)
            _close(connection)
            return None
        finally:
            with contextlib.suppress(Exception):
                impl.ioloop.remove_timeout(timer)
        return opened
