"""The messages puller sends over RabbitMQ.

Version 1 of the contract. Bodies are UTF-8 JSON objects with a ``version`` and a
``type``. Each message type lists its fields once, in ``FIELDS`` (see
:mod:`contract.fields`): encoding, decoding and the JSON reports print all follow that
table. Decoders accept unknown extra fields, so a later version can add optional fields
without breaking older peers; they reject everything else with :class:`InvalidMessage`
saying what is wrong.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from contract.errors import ErrorKind, InvalidMessage, NodeError
from contract.fields import (
    MAX_NODE_NAME_LENGTH,
    Choice,
    Count,
    Failure,
    Field,
    Flag,
    Identifier,
    Image,
    Images,
    OptionalBool,
    OptionalIdentifier,
    OptionalRecord,
    OptionalSeconds,
    OptionalText,
    Records,
    Seconds,
    Text,
    Texts,
)
from contract.json_body import PROTOCOL_VERSION, load_body
from contract.json_body import short as _short
from contract.reference import ImageReference

CONTENT_TYPE = "application/json"

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
"""Where both sides look for RabbitMQ when ``PULLER_AMQP_URL`` is not set."""

PRESENCE_INTERVAL = 5.0
"""Seconds between a worker's presence announcements on a small cluster (the base interval)."""
MAX_PRESENCE_INTERVAL = 60.0
"""The longest interval a worker stretches to on a large cluster, and the longest a reader
believes (a larger declared interval is read as this)."""
PRESENCE_MISSES = 3
"""A node whose announcements stop is gone from the roster after this many of its intervals
(or the reader's own age limit, if longer)."""


class Message:
    """A message type: a frozen dataclass with a ``TYPE`` and a field table ``FIELDS``."""

    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[Field[Any], ...]]
    _LOADERS: ClassVar[tuple[tuple[str, str, Callable[[dict[str, Any], str], Any]], ...]]
    _DUMPERS: ClassVar[tuple[tuple[str, str, Callable[[Any], object] | None], ...]]

    def __init_subclass__(cls) -> None:
        """The field table as (attribute, key, codec method) rows, looked up once: every
        request and reply goes through them."""
        super().__init_subclass__()
        cls._LOADERS = tuple((f.attribute, f.key, f.codec.load) for f in cls.FIELDS)
        cls._DUMPERS = tuple(
            (
                f.attribute,
                f.key,
                None if getattr(f.codec, "dumps_as_is", False) else f.codec.dump,
            )
            for f in cls.FIELDS
        )

    def to_json(self) -> dict[str, Any]:
        """The fields by attribute name, as JSON values (what reports print)."""
        return {f.attribute: f.codec.dump(getattr(self, f.attribute)) for f in self.FIELDS}

    def encode(self) -> bytes:
        body: dict[str, Any] = {"version": PROTOCOL_VERSION, "type": self.TYPE}
        for attribute, key, dump in self._DUMPERS:  # ``None``: the value as it is
            value = getattr(self, attribute)
            body[key] = value if dump is None else dump(value)
        return _ENCODER.encode(body).encode()

    @classmethod
    def decode(cls, body: bytes) -> Self:
        return cls.from_fields(load_body(body, cls.TYPE))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Self:
        values = {attribute: load(fields, key) for attribute, key, load in cls._LOADERS}
        try:
            return cls(**values)
        except ValueError as error:  # a rule across fields, checked in __post_init__
            raise InvalidMessage(str(error)) from None


class Status(StrEnum):
    """What a node says about an image."""

    PULLED = "pulled"
    PRESENT = "present"
    ABSENT = "absent"
    """Only in answer to a :class:`CheckRequest`: the node does not have the image."""
    FAILED = "failed"
    NO_REPLY = "no_reply"
    """Never sent by a node: a publisher's word for an expected node that did not answer."""


WIRE_STATUSES = (Status.PULLED, Status.PRESENT, Status.ABSENT, Status.FAILED)


class Lane(StrEnum):
    """How urgent a pull is. A worker starts a ``session`` pull before any queued ``warm``
    one; a value this side does not know (from a newer publisher) is read as ``session``."""

    SESSION = "session"
    WARM = "warm"


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class PullRequest(Message):
    """Published once to the pull exchange; asks every node to have ``image``."""

    image: ImageReference
    request_id: str
    requested_at: float
    session_id: str | None = None
    """Whose session asked (the HTTP API's ``id``), so the workers' logs can be traced by
    session; absent from older publishers."""
    lane: Lane = Lane.SESSION
    """``warm`` for bulk warm-ups, which wait behind every session pull (absent: session)."""
    refresh: bool = False
    """Pull even when the node has an image of that name, so that a tag that moved in the
    registry is followed (an older worker ignores it and answers ``present``)."""
    progress: bool = True
    """Whether the requester wants :class:`NodeProgress` reports while nodes pull. Absent
    (older publishers): yes, as before; an older worker ignores it and always sends them."""

    TYPE: ClassVar[str] = "pull"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("request_id", Identifier()),
        Field("image", Image()),
        Field("requested_at", Seconds()),
        Field("session_id", OptionalIdentifier()),
        Field("lane", Choice(Lane, default=Lane.SESSION, unknown=Lane.SESSION)),
        Field("refresh", Flag()),
        Field("progress", Flag(default=True)),
    )

    @classmethod
    def new(
        cls,
        image: ImageReference,
        session_id: str | None = None,
        *,
        lane: Lane = Lane.SESSION,
        refresh: bool = False,
        progress: bool = True,
    ) -> PullRequest:
        return cls(
            image=image,
            request_id=new_request_id(),
            requested_at=time.time(),
            session_id=session_id,
            lane=lane,
            refresh=refresh,
            progress=progress,
        )


@dataclass(frozen=True)
class CheckRequest(Message):
    """Asks every node whether it has ``image``, pulling nothing. Each answers with a
    :class:`NodeResult`: ``present`` (with image id and digest) or ``absent``. Not kept in
    the history: a node that was away has nothing to answer later."""

    image: ImageReference
    request_id: str
    requested_at: float

    TYPE: ClassVar[str] = "check"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("request_id", Identifier()),
        Field("image", Image()),
        Field("requested_at", Seconds()),
    )

    @classmethod
    def new(cls, image: ImageReference) -> CheckRequest:
        return cls(image=image, request_id=new_request_id(), requested_at=time.time())


MAX_KEEP_IMAGES = 200
"""At most this many images on a prune's keep list (the message must stay under 16 kB)."""
MAX_REMOVALS_LISTED = 40
"""A prune answer lists at most this many removed images (``removed_count`` counts all)."""


@dataclass(frozen=True)
class PruneRequest(Message):
    """Asks every node to remove images unused for ``unused_for`` seconds, except those a
    container uses and those on ``keep``. Each answers with a :class:`PruneResult`. Not kept
    in the history: a node that was away does not prune later by surprise."""

    request_id: str
    requested_at: float
    unused_for: float
    keep: tuple[ImageReference, ...] = ()
    dry_run: bool = False

    TYPE: ClassVar[str] = "prune"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("request_id", Identifier()),
        Field("requested_at", Seconds()),
        Field("unused_for", Seconds()),
        Field("keep", Images(MAX_KEEP_IMAGES)),
        Field("dry_run", Flag()),
    )

    @classmethod
    def new(
        cls,
        unused_for: float,
        keep: tuple[ImageReference, ...] = (),
        dry_run: bool = False,
    ) -> PruneRequest:
        return cls(
            request_id=new_request_id(),
            requested_at=time.time(),
            unused_for=unused_for,
            keep=keep,
            dry_run=dry_run,
        )


@dataclass(frozen=True)
class Removed:
    """One image a prune removed (or, in a dry run, would remove)."""

    image_id: str
    names: tuple[str, ...]
    size: int
    last_used: float | None

    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("image_id", Text(200)),
        Field("names", Texts(20, 512)),
        Field("size", Count()),
        Field("last_used", OptionalSeconds()),
    )


@dataclass(frozen=True)
class PruneResult(Message):
    """One node's answer to a :class:`PruneRequest`."""

    request_id: str
    node: str
    seconds: float
    dry_run: bool
    removed: tuple[Removed, ...] = ()
    """The first :data:`MAX_REMOVALS_LISTED` removed, oldest-unused first."""
    removed_count: int = 0
    bytes_freed: int = 0
    """Bytes the removed images took (in a dry run: would free). Layers another image
    still shares are counted too: the engine's own sizes do not say which are shared."""
    kept_in_use: int = 0
    kept_listed: int = 0
    error: NodeError | None = None
    """Set when the node could not prune at all (its engine did not answer)."""

    TYPE: ClassVar[str] = "prune_result"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("request_id", Identifier()),
        Field("node", Text(MAX_NODE_NAME_LENGTH)),
        Field("seconds", Seconds()),
        Field("dry_run", Flag()),
        Field("removed", Records[Removed](Removed, MAX_REMOVALS_LISTED)),
        Field("removed_count", Count(default=0)),
        Field("bytes_freed", Count(default=0)),
        Field("kept_in_use", Count(default=0)),
        Field("kept_listed", Count(default=0)),
        Field("error", Failure()),
    )


@dataclass(frozen=True)
class Pulling:
    """A pull running on a node: bytes so far over all layers and the image's size (0 until
    the engine has reported it)."""

    done: int
    total: int

    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("done", Count()),
        Field("total", Count()),
    )


@dataclass(frozen=True)
class NodeResult(Message):
    """One node's answer to one :class:`PullRequest`."""

    request_id: str
    node: str
    image: str
    status: Status
    seconds: float
    """From the node taking the request to its answer, queueing included."""
    image_id: str | None = None
    digest: str | None = None
    error: NodeError | None = None
    queued_seconds: float = 0.0
    """The part of ``seconds`` spent waiting for a pull slot (absent from older workers: 0)."""
    pulling: Pulling | None = None
    """In an ``absent`` answer to a check: the node is pulling the image right now, for
    whoever asked, this far (absent from older workers: ``None``)."""

    TYPE: ClassVar[str] = "result"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("request_id", Identifier()),
        Field("node", Text(MAX_NODE_NAME_LENGTH)),
        Field("image", Text(allow_empty=True)),
        Field("status", Choice(Status, allowed=WIRE_STATUSES)),
        Field("seconds", Seconds()),
        Field("queued_seconds", Seconds(default=0.0)),
        Field("image_id", OptionalText()),
        Field("digest", OptionalText()),
        Field("error", Failure()),
        Field("pulling", OptionalRecord[Pulling](Pulling)),
    )

    def __post_init__(self) -> None:
        if (self.status is Status.FAILED) != (self.error is not None):
            raise ValueError("a result carries an 'error' exactly when its status is 'failed'")

    @property
    def has_image(self) -> bool:
        return self.status in (Status.PULLED, Status.PRESENT)

    @classmethod
    def failure(
        cls,
        request_id: str,
        node: str,
        image: str,
        kind: ErrorKind,
        message: str,
        seconds: float,
    ) -> NodeResult:
        return cls(
            request_id=request_id,
            node=node,
            image=image,
            status=Status.FAILED,
            seconds=seconds,
            error=NodeError(kind, message),
        )


@dataclass(frozen=True)
class NodeProgress(Message):
    """A running pull's bytes so far, sent to the requester at most a few times a second,
    when its :class:`PullRequest` asks for them (``progress``)."""

    request_id: str
    node: str
    image: str
    done: int
    total: int

    TYPE: ClassVar[str] = "progress"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("request_id", Identifier()),
        Field("node", Text(MAX_NODE_NAME_LENGTH)),
        Field("image", Text(allow_empty=True)),
        Field("done", Count()),
        Field("total", Count()),
    )


class NodeState(StrEnum):
    UP = "up"
    LEAVING = "leaving"


class HistoryGap(StrEnum):
    """Whether the history lost entries a node had not replayed when it came back."""

    NONE = "none"
    RECONCILING = "reconciling"
    RECOVERED = "recovered"
    UNRECOVERED = "unrecovered"
    """Lost, and not made good: what was left was replayed, the rest is missing."""


@dataclass(frozen=True)
class NodePresence(Message):
    """A worker saying it is there (every ``interval`` seconds at most), or that it is leaving.

    The roster is the latest of these per node, so this is also what ``puller nodes``
    prints (:meth:`to_json`)."""

    node: str
    version: str
    engine: str | None
    """The Docker Engine's version, or ``None`` while the engine cannot be reached."""
    started_at: float
    last_seen: float
    """When the worker sent this announcement."""
    state: NodeState = NodeState.UP
    caught_up: bool | None = None
    """Whether the worker has replayed the history it missed; ``None`` from older workers."""
    replay_pending: int = 0
    replay_failed: int = 0
    history_gap: HistoryGap = HistoryGap.NONE
    """Absent from older workers (read as ``none``), which could not tell."""
    history_lost: int = 0
    """History entries the node had not replayed that the history lost (0: none, or unknown
    when the stream was deleted and declared again)."""
    interval: float | None = None
    """The most seconds until the node's next announcement (it stretches on a large
    cluster); ``None`` from older workers, which announce every :data:`PRESENCE_INTERVAL`."""

    TYPE: ClassVar[str] = "presence"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("node", Text(MAX_NODE_NAME_LENGTH)),
        Field("version", Text(64), wire="puller_version"),
        Field("engine", OptionalText()),
        Field("started_at", Seconds()),
        Field("last_seen", Seconds(), wire="sent_at"),
        Field("state", Choice(NodeState)),
        Field("caught_up", OptionalBool()),
        Field("replay_pending", Count(default=0)),
        Field("replay_failed", Count(default=0)),
        Field("history_gap", Choice(HistoryGap, default=HistoryGap.NONE, unknown=HistoryGap.NONE)),
        Field("history_lost", Count(default=0)),
        Field("interval", OptionalSeconds()),
    )

    def silent_after(self, max_age: float) -> float:
        """Seconds without a word from this node after which a reader drops it: ``max_age``,
        or :data:`PRESENCE_MISSES` of the interval it declared (at most
        :data:`MAX_PRESENCE_INTERVAL`), whichever is longer."""
        declared = min(self.interval or 0.0, MAX_PRESENCE_INTERVAL)
        return max(max_age, PRESENCE_MISSES * declared)


@dataclass(frozen=True)
class RosterMarker(Message):
    """Put in the presence stream by a publisher reading it: everything before it is history."""

    marker_id: str

    TYPE: ClassVar[str] = "marker"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (Field("marker_id", Identifier()),)


@dataclass(frozen=True)
class HistoryMarker(Message):
    """Put in the history stream by a worker: reading it back tells the worker where the
    stream ends (its offset) and that it has seen every entry before it."""

    node: str
    marker_id: str

    TYPE: ClassVar[str] = "history_marker"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("node", Text(MAX_NODE_NAME_LENGTH)),
        Field("marker_id", Identifier()),
    )


Request = PullRequest | CheckRequest | PruneRequest
"""What a node's live queue carries."""


def decode_request(body: bytes) -> Request:
    """A message on a node's queue. A type this side does not know is an error, which the
    worker answers with a ``failed`` result of kind ``invalid_request`` naming the type:
    that is how an older worker answers a newer request type."""
    fields = load_body(body, None)
    kinds: tuple[type[Request], ...] = (PullRequest, CheckRequest, PruneRequest)
    for kind in kinds:
        if fields.get("type") == kind.TYPE:
            return kind.from_fields(fields)
    _of_type(fields, *kinds)
    raise AssertionError("unreachable")  # pragma: no cover


Reply = NodeResult | NodeProgress | PruneResult


def decode_reply(body: bytes) -> Reply:
    """A message on a reply queue: a node's final result, a progress report, or a node's
    answer to a prune."""
    fields = load_body(body, None)
    if fields.get("type") == NodeProgress.TYPE:
        return NodeProgress.from_fields(fields)
    if fields.get("type") == PruneResult.TYPE:
        return PruneResult.from_fields(fields)
    return NodeResult.from_fields(_of_type(fields, NodeResult, NodeProgress, PruneResult))


def decode_history(body: bytes) -> PullRequest | HistoryMarker:
    """One entry of the history stream."""
    fields = load_body(body, None)
    if fields.get("type") == HistoryMarker.TYPE:
        return HistoryMarker.from_fields(fields)
    return PullRequest.from_fields(_of_type(fields, PullRequest, HistoryMarker))


def decode_presence_stream(body: bytes) -> NodePresence | RosterMarker:
    """One entry of the presence stream."""
    fields = load_body(body, None)
    if fields.get("type") == RosterMarker.TYPE:
        return RosterMarker.from_fields(fields)
    return NodePresence.from_fields(_of_type(fields, NodePresence, RosterMarker))


def _of_type(fields: dict[str, Any], *types: type[Message]) -> dict[str, Any]:
    if fields.get("type") not in [t.TYPE for t in types]:
        expected = " or ".join(repr(t.TYPE) for t in types)
        raise InvalidMessage(
            f"expected a message of type {expected}, got {_short(fields.get('type'))}"
        )
    return fields


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def puller_version() -> str:
    """The installed distribution's version, sent in presence announcements."""
    try:
        return importlib.metadata.version("puller")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
