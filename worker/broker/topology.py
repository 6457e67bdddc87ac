"""The worker's declarations: its node's queue and the shared topology, as RabbitMQ lets
this worker's user make them (see ``puller broker-setup``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import pika.exceptions
import structlog

from contract import BrokerUnavailable
from contract import topology as topo
from contract.connection import (
    ACCESS_REFUSED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    RESOURCE_LOCKED,
    declare,
)

log = structlog.get_logger("worker.broker")

Channel = Any
"""A channel of pika's asynchronous connection (pika has no type hints)."""


class WorkerTopology:
    """Declares on channels of the connection's thread: ``call(channel, method)`` waits for
    RabbitMQ's answer, ``new_channel()`` opens one (after a refusal closed the last)."""

    def __init__(
        self,
        node: str,
        user: str,
        history_stream: topo.Queue | None,
        call: Callable[[Channel, Callable[..., object]], Any],
        new_channel: Callable[[], Channel],
        where: Callable[[], str],
    ) -> None:
        self._node = node
        self._queue = topo.node_queue_name(node)
        self._user = user
        self._history_stream = history_stream
        self._call = call
        self._new_channel = new_channel
        self._where = where
        self.may_not_configure = False
        """Learnt from RabbitMQ's refusal, once: from then on shared things are checked."""

    def declare_own(self, channel: Channel) -> Channel:
        """Declares the node's exclusive queue and its binding; returns the channel to go on
        with. RabbitMQ refuses it (405) when a queue of that name exists that is not this
        connection's: another worker's (exclusive: :class:`NodeNameInUse` is raised as it
        was), or a shared one somebody declared in its place, which would take this node's
        requests for good. That one is deleted, and the node's own declared."""
        own = topo.worker_declarations(self._node)
        try:
            self._declare_all(channel, own)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != RESOURCE_LOCKED:
                raise
        else:
            return channel
        channel = self._new_channel()
        # A passive declaration of another connection's exclusive queue is refused too
        # (405, raised to connect()); a shared one is answered, with its depth.
        found = self._call(channel, partial(channel.queue_declare, self._queue, passive=True))
        log.warning(
            "the node's queue was declared by someone else, shared instead of exclusive: "
            "deleting it (the requests in it are in the history) and declaring this "
            "worker's own. Only a user that may configure it could: this worker's user, a "
            "worker user for any node, or an administrator; rotate the credentials if that "
            "was not you",
            queue=self._queue,
            user=self._user,
            messages=found.method.message_count,
            consumers=found.method.consumer_count,
        )
        self._call(channel, partial(channel.queue_delete, self._queue))
        self._declare_all(channel, own)
        return channel

    def declare_shared(self, channel: Channel) -> Channel:
        """Declares the shared topology (the history stream with this worker's retention);
        returns the channel to go on with. A user without configure rights (see ``puller
        broker-setup``) checks instead that the exchanges and streams exist. A stream that
        exists with other settings is used as it is (RabbitMQ refuses to change it)."""
        missing = []
        for item in topo.shared_declarations(self._history_stream or topo.history_stream()):
            check = self.may_not_configure
            if check and isinstance(item, topo.Binding):
                continue  # bindings have no passive form; whoever declared them bound them
            try:
                self._call(
                    channel, partial(declare, channel, item, **({"passive": True} if check else {}))
                )
                continue
            except pika.exceptions.ChannelClosedByBroker as error:
                channel, refused = self._new_channel(), error
            if check and refused.reply_code == NOT_FOUND and not isinstance(item, topo.Binding):
                missing.append(item.name)
            elif not check and refused.reply_code == NOT_FOUND and _is_token(item):
                # A classic queue lives on one broker node: while that node is down, the
                # keeper waits, and the worker serves (the next connection declares it again).
                log.warning(
                    "the keeper's token queue is out of reach (its broker node is down?): "
                    "this worker does not keep the desired state on this connection",
                    error=refused.reply_text,
                )
            elif refused.reply_code == PRECONDITION_FAILED and isinstance(item, topo.Queue):
                log.warning(
                    "a stream exists with other settings (the history's retention, or "
                    "another version's presence stream); using it as it is",
                    error=refused.reply_text,
                )
            elif not check and refused.reply_code == ACCESS_REFUSED:
                self.may_not_configure = True
                log.info(
                    "this user may not declare puller's exchanges and streams; "
                    "checking that they exist",
                    user=self._user,
                )
                return self.declare_shared(channel)
            else:
                raise refused
        optional = {item.name for item in topo.desired() if not isinstance(item, topo.Binding)}
        if missing and set(missing) <= optional:
            log.warning(
                "the desired state's exchanges, stream and token queue do not exist, and "
                "this user may not declare them: this worker neither keeps nor reconciles "
                "with the desired state; run `puller broker-setup` again",
                missing=missing,
            )
        elif missing:
            raise BrokerUnavailable(
                f"RabbitMQ at {self._where()}: {', '.join(missing)} do not exist, and user "
                f"{self._user!r} may not declare them: declare puller's topology as an "
                "administrator (`puller broker-setup`) or once with a user that may"
            )
        return channel

    def _declare_all(self, channel: Channel, declarations: Iterable[topo.Declaration]) -> None:
        for item in declarations:
            self._call(channel, partial(declare, channel, item))


def _is_token(item: topo.Declaration) -> bool:
    """The keeper's token queue, or its binding."""
    name = item.queue if isinstance(item, topo.Binding) else item.name
    return name == topo.KEEPER_TOKEN.name
