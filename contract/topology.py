"""What puller declares on RabbitMQ, written once for both sides.

Exchanges, queues, streams and bindings are plain data here; each side's broker module
declares the ones it needs (the worker's with a blocking channel, the publisher's from
its I/O loop). RabbitMQ refuses a second declaration of the same name with other
arguments, so sharing one table is also what keeps the two sides compatible.

::

    publisher --pull--> [puller.pulls fanout] --> puller.node.NAME (one per worker, exclusive)
              --copy--> [puller.history fanout] --> puller.history.stream (replayed on connect)
    worker --result/progress--> [puller.replies direct] --(routing key)--> puller.reply.ID
    worker --presence--> [puller.presence fanout] --> puller.presence.stream (the roster)
    keeper --snapshot--> [puller.desired fanout] --> puller.desired.stream (reconciling)
    worker --token--> [puller.keeper fanout] --> puller.keeper.token (who is the keeper)

Streams and exchanges have different names because RabbitMQ's permissions match a name
whatever its kind: a user who may publish to an exchange must not thereby get write on the
stream behind it (write on a queue lets a user unbind it; see ``puller broker-setup``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: str
    """``fanout`` or ``direct``."""
    durable: bool = True


@dataclass(frozen=True)
class Queue:
    name: str
    durable: bool = False
    exclusive: bool = False
    auto_delete: bool = False
    arguments: Mapping[str, object] = field(default_factory=dict)

    @property
    def is_stream(self) -> bool:
        return self.arguments.get("x-queue-type") == "stream"


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str = ""


Declaration = Exchange | Queue | Binding

PULLS = Exchange("puller.pulls", "fanout")
"""Every worker's queue is bound to it, so one publish reaches every node."""
REPLIES = Exchange("puller.replies", "direct")
"""Results and progress; the routing key is the requester's reply queue."""
PRESENCE = Exchange("puller.presence", "fanout")
"""Workers' presence announcements, into :data:`PRESENCE_STREAM`."""
HISTORY = Exchange("puller.history", "fanout")
"""Publishers put every request here too, into the history stream."""

PRESENCE_STREAM = Queue(
    "puller.presence.stream",
    durable=True,
    arguments={
        "x-queue-type": "stream",
        "x-max-age": "10m",
        # Retention drops whole segments; small ones let x-max-age take effect promptly.
        "x-stream-max-segment-size-bytes": 1_000_000,
    },
)
"""Recent presence announcements: the roster is read from it."""

DESIRED = Exchange("puller.desired", "fanout")
"""The keeper's snapshots of the desired state, into :data:`DESIRED_STREAM`."""
KEEPER = Exchange("puller.keeper", "fanout")
"""The keeper's token, into :data:`KEEPER_TOKEN`."""

DESIRED_STREAM = Queue(
    "puller.desired.stream",
    durable=True,
    arguments={
        "x-queue-type": "stream",
        "x-max-age": "1D",
        "x-max-length-bytes": 50 * 1000 * 1000,
        # Retention drops whole non-active segments: the newest snapshot survives idle days.
        "x-stream-max-segment-size-bytes": 4 * 1000 * 1000,
    },
)
"""Snapshots of the desired state (:class:`contract.desired.DesiredState`), newest last."""

KEEPER_TOKEN = Queue(
    "puller.keeper.token",
    durable=True,
    arguments={
        "x-single-active-consumer": True,
        "x-max-length": 1,
        "x-overflow": "drop-head",
    },
)
"""One token: the worker it is delivered to (never acknowledged) is the keeper until its
connection goes, when RabbitMQ gives it to the next consumer."""

HISTORY_STREAM_NAME = "puller.history.stream"
DEFAULT_HISTORY_MAX_AGE = 7 * 24 * 3600.0
"""Seconds a request stays replayable: a week."""
DEFAULT_HISTORY_MAX_BYTES = 100 * 1000 * 1000
"""A size bound on the history stream, whatever the age of what it holds."""

NODE_QUEUE_PREFIX = "puller.node."
REPLY_QUEUE_PREFIX = "puller.reply."


def history_stream(
    max_age: float = DEFAULT_HISTORY_MAX_AGE, max_bytes: int = DEFAULT_HISTORY_MAX_BYTES
) -> Queue:
    """Every pull request inside the retention window: a node that was away, or is new,
    replays it to catch up. Declared by the workers, who own its retention. Retention drops
    whole segments, so segments are small (a request is a few hundred bytes) for the window
    to take effect promptly."""
    return Queue(
        HISTORY_STREAM_NAME,
        durable=True,
        arguments={
            "x-queue-type": "stream",
            "x-max-age": f"{max(1, round(max_age))}s",
            "x-max-length-bytes": max_bytes,
            "x-stream-max-segment-size-bytes": min(max_bytes, 4 * 1000 * 1000),
        },
    )


def node_queue_name(node: str) -> str:
    """The exclusive queue a node's worker consumes pull requests from."""
    return f"{NODE_QUEUE_PREFIX}{node}"


def node_queue(node: str) -> tuple[Queue, Binding]:
    """A worker's own queue: it lives and dies with the worker's connection."""
    queue = Queue(node_queue_name(node), exclusive=True, auto_delete=True)
    return queue, Binding(queue.name, PULLS.name)


def reply_queue(name: str) -> tuple[Queue, Binding]:
    """A publisher's reply queue, bound under its own name."""
    return Queue(name, exclusive=True, auto_delete=True), Binding(name, REPLIES.name, name)


def presence() -> tuple[Declaration, ...]:
    return PRESENCE, PRESENCE_STREAM, Binding(PRESENCE_STREAM.name, PRESENCE.name)


def history(stream: Queue) -> tuple[Declaration, ...]:
    return HISTORY, stream, Binding(stream.name, HISTORY.name)


def desired() -> tuple[Declaration, ...]:
    return (
        DESIRED,
        DESIRED_STREAM,
        Binding(DESIRED_STREAM.name, DESIRED.name),
        KEEPER,
        KEEPER_TOKEN,
        Binding(KEEPER_TOKEN.name, KEEPER.name),
    )


def shared_declarations(stream: Queue | None = None) -> tuple[Declaration, ...]:
    """Everything both sides rely on: the exchanges, the streams and their bindings.

    An administrator declares it once (``puller broker-setup``); a worker or publisher whose
    user may configure declares it too (idempotent), and one whose user may not checks
    that the exchanges and streams exist. ``stream``: the history stream with the
    retention to declare (see :func:`history_stream`)."""
    return (PULLS, REPLIES, *presence(), *history(stream or history_stream()), *desired())


def publisher_shared() -> tuple[Declaration, ...]:
    """The shared part a publisher declares when it may: not the history stream, whose
    retention is the workers' (and the administrator's) to set."""
    return (PULLS, HISTORY, REPLIES, *presence())


def worker_declarations(node: str) -> tuple[Declaration, ...]:
    """A worker's own: its queue and the queue's binding."""
    return node_queue(node)


def publisher_declarations(reply_queue_name: str) -> tuple[Declaration, ...]:
    """A publisher's own: its reply queue and the queue's binding."""
    return reply_queue(reply_queue_name)
