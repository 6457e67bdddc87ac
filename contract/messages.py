"""The messages puller sends over RabbitMQ, and the names of what carries them.

Version 1 of the contract. Bodies are UTF-8 JSON objects with a ``version`` and
a ``type``. Decoders accept unknown extra fields, so a later version can add
optional fields without breaking older peers; they reject everything else with
:class:`InvalidMessage` saying what is wrong.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from contract.errors import ErrorKind, InvalidMessage
from contract.reference import ImageReference, parse_reference

_E = TypeVar("_E", bound=StrEnum)

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/json"
MAX_MESSAGE_BYTES = 16 * 1024
MAX_ID_LENGTH = 128
MAX_NODE_NAME_LENGTH = 253
MAX_ERROR_MESSAGE_LENGTH = 2000

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
"""Where both sides look for RabbitMQ when ``PULLER_AMQP_URL`` is not set."""

PULL_EXCHANGE = "puller.pulls"
"""Fanout exchange: every worker's queue is bound to it, so one publish reaches every node."""

REPLY_EXCHANGE = "puller.replies"
"""Direct exchange for replies; the routing key is the requester's ``reply_to`` queue."""

PRESENCE_EXCHANGE = "puller.presence"
"""Fanout exchange for workers' presence announcements; bound to :data:`PRESENCE_STREAM`."""

PRESENCE_STREAM = "puller.presence"
"""A RabbitMQ stream holding recent presence announcements: the roster is read from it."""

PRESENCE_STREAM_ARGUMENTS: dict[str, object] = {
    "x-queue-type": "stream",
    "x-max-age": "10m",
    # Retention drops whole segments; small ones let x-max-age take effect promptly.
    "x-stream-max-segment-size-bytes": 1_000_000,
}
"""Every side declares the stream with exactly these arguments (RabbitMQ insists)."""

HISTORY_EXCHANGE = "puller.history"
"""Fanout exchange bound to :data:`HISTORY_STREAM`; publishers put every request here too."""

HISTORY_STREAM = "puller.history"
"""A RabbitMQ stream holding every pull request inside the retention window: a node that
was away, or is new, replays it to catch up. Declared by the workers, who own its retention."""

DEFAULT_HISTORY_MAX_AGE = 7 * 24 * 3600.0
"""Seconds a request stays replayable: a week."""

DEFAULT_HISTORY_MAX_BYTES = 100 * 1000 * 1000
"""A size bound on the history stream, whatever the age of what it holds."""


def history_stream_arguments(max_age: float, max_bytes: int) -> dict[str, object]:
    """The history stream's declaration. Retention drops whole segments, so segments are
    kept small (a request is a few hundred bytes) for the window to take effect promptly."""
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, round(max_age))}s",
        "x-max-length-bytes": max_bytes,
        "x-stream-max-segment-size-bytes": min(max_bytes, 4 * 1000 * 1000),
    }


PRESENCE_INTERVAL = 5.0
"""Seconds between a worker's presence announcements."""

NODE_QUEUE_PREFIX = "puller.node."
REPLY_QUEUE_PREFIX = "puller.reply."


def node_queue_name(node: str) -> str:
    """The exclusive queue a node's worker consumes pull requests from."""
    return f"{NODE_QUEUE_PREFIX}{node}"


class Status(StrEnum):
    """What a node says about an image."""

    PULLED = "pulled"
    PRESENT = "present"
    FAILED = "failed"
    NO_REPLY = "no_reply"
    """Never sent by a node: a publisher's word for an expected node that did not answer."""


WIRE_STATUSES = (Status.PULLED, Status.PRESENT, Status.FAILED)


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class PullRequest:
    """Published once to :data:`PULL_EXCHANGE`; asks every node to have ``image``."""

    image: ImageReference
    request_id: str
    requested_at: float

    TYPE = "pull"

    @classmethod
    def new(cls, image: ImageReference) -> PullRequest:
        return cls(image=image, request_id=new_request_id(), requested_at=time.time())

    def encode(self) -> bytes:
        return _dump(
            {
                "version": PROTOCOL_VERSION,
                "type": self.TYPE,
                "request_id": self.request_id,
                "image": str(self.image),
                "requested_at": self.requested_at,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> PullRequest:
        fields = _load(body, cls.TYPE)
        return cls(
            request_id=_identifier(fields, "request_id"),
            requested_at=_number(fields, "requested_at"),
            image=_image(fields),
        )


@dataclass(frozen=True)
class NodeError:
    """Why a node failed: a stable ``kind`` and a message a person can act on."""

    kind: ErrorKind
    message: str


@dataclass(frozen=True)
class NodeResult:
    """One node's answer to one :class:`PullRequest`."""

    request_id: str
    node: str
    image: str
    status: Status
    seconds: float
    image_id: str | None = None
    digest: str | None = None
    error: NodeError | None = None

    TYPE = "result"

    def __post_init__(self) -> None:
        if (self.status is Status.FAILED) != (self.error is not None):
            raise ValueError("a result carries an error exactly when its status is 'failed'")

    @property
    def has_image(self) -> bool:
        return self.status in (Status.PULLED, Status.PRESENT)

    def encode(self) -> bytes:
        return _dump(
            {
                "version": PROTOCOL_VERSION,
                "type": self.TYPE,
                "request_id": self.request_id,
                "node": self.node,
                "image": self.image,
                "status": self.status.value,
                "seconds": self.seconds,
                "image_id": self.image_id,
                "digest": self.digest,
                "error": None
                if self.error is None
                else {"kind": self.error.kind.value, "message": self.error.message},
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> NodeResult:
        fields = _load(body, cls.TYPE)
        status = _enum(fields, "status", Status)
        if status not in WIRE_STATUSES:
            raise InvalidMessage(f"'status' {status.value!r} is not sent by nodes")
        error_field = fields.get("error")
        error: NodeError | None = None
        if error_field is not None:
            if not isinstance(error_field, dict):
                raise InvalidMessage("'error' must be an object with 'kind' and 'message'")
            error = NodeError(
                kind=_enum(error_field, "kind", ErrorKind),
                message=_text(error_field, "message", MAX_ERROR_MESSAGE_LENGTH),
            )
        if (status is Status.FAILED) != (error is not None):
            raise InvalidMessage("a result must carry an 'error' exactly when status is 'failed'")
        return cls(
            request_id=_identifier(fields, "request_id"),
            node=_text(fields, "node", MAX_NODE_NAME_LENGTH),
            image=_text(fields, "image", 1024, allow_empty=True),
            status=status,
            seconds=_number(fields, "seconds"),
            image_id=_optional_text(fields, "image_id"),
            digest=_optional_text(fields, "digest"),
            error=error,
        )


@dataclass(frozen=True)
class NodeProgress:
    """A running pull's bytes so far, sent to the requester at most a few times a second."""

    request_id: str
    node: str
    image: str
    done: int
    total: int

    TYPE = "progress"

    def encode(self) -> bytes:
        return _dump(
            {
                "version": PROTOCOL_VERSION,
                "type": self.TYPE,
                "request_id": self.request_id,
                "node": self.node,
                "image": self.image,
                "done": self.done,
                "total": self.total,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> NodeProgress:
        fields = _load(body, cls.TYPE)
        return cls(
            request_id=_identifier(fields, "request_id"),
            node=_text(fields, "node", MAX_NODE_NAME_LENGTH),
            image=_text(fields, "image", 1024, allow_empty=True),
            done=_count(fields, "done"),
            total=_count(fields, "total"),
        )


def decode_reply(body: bytes) -> NodeResult | NodeProgress:
    """A message on a reply queue: a node's final result or a progress report."""
    kind = _load(body, None).get("type")
    if kind == NodeProgress.TYPE:
        return NodeProgress.decode(body)
    return NodeResult.decode(body)


class NodeState(StrEnum):
    UP = "up"
    LEAVING = "leaving"


@dataclass(frozen=True)
class NodePresence:
    """A worker saying it is there (every :data:`PRESENCE_INTERVAL`), or that it is leaving."""

    node: str
    version: str
    engine: str | None
    """The Docker Engine's version, or ``None`` while the engine cannot be reached."""
    started_at: float
    sent_at: float
    state: NodeState = NodeState.UP
    caught_up: bool | None = None
    """Whether the worker has replayed the history it missed; ``None`` from older workers."""
    replay_pending: int = 0
    replay_failed: int = 0

    TYPE = "presence"

    def encode(self) -> bytes:
        return _dump(
            {
                "version": PROTOCOL_VERSION,
                "type": self.TYPE,
                "node": self.node,
                "puller_version": self.version,
                "engine": self.engine,
                "started_at": self.started_at,
                "sent_at": self.sent_at,
                "state": self.state.value,
                "caught_up": self.caught_up,
                "replay_pending": self.replay_pending,
                "replay_failed": self.replay_failed,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> NodePresence:
        fields = _load(body, cls.TYPE)
        caught_up = fields.get("caught_up")
        if caught_up is not None and not isinstance(caught_up, bool):
            raise InvalidMessage("'caught_up' must be true, false or null")
        return cls(
            node=_text(fields, "node", MAX_NODE_NAME_LENGTH),
            version=_text(fields, "puller_version", 64),
            engine=_optional_text(fields, "engine"),
            started_at=_number(fields, "started_at"),
            sent_at=_number(fields, "sent_at"),
            state=_enum(fields, "state", NodeState),
            caught_up=caught_up,
            replay_pending=_optional_count(fields, "replay_pending"),
            replay_failed=_optional_count(fields, "replay_failed"),
        )


@dataclass(frozen=True)
class RosterMarker:
    """Put in the presence stream by a publisher reading it: everything before it is history."""

    marker_id: str

    TYPE = "marker"

    def encode(self) -> bytes:
        return _dump({"version": PROTOCOL_VERSION, "type": self.TYPE, "marker_id": self.marker_id})

    @classmethod
    def decode(cls, body: bytes) -> RosterMarker:
        return cls(marker_id=_identifier(_load(body, cls.TYPE), "marker_id"))


@dataclass(frozen=True)
class HistoryMarker:
    """Put in the history stream by a starting worker: what comes before it is what the
    worker has to catch up on; when it reads its own marker back, it has caught up."""

    node: str
    marker_id: str

    TYPE = "history_marker"

    def encode(self) -> bytes:
        return _dump(
            {
                "version": PROTOCOL_VERSION,
                "type": self.TYPE,
                "node": self.node,
                "marker_id": self.marker_id,
            }
        )

    @classmethod
    def decode(cls, body: bytes) -> HistoryMarker:
        fields = _load(body, cls.TYPE)
        return cls(
            node=_text(fields, "node", MAX_NODE_NAME_LENGTH),
            marker_id=_identifier(fields, "marker_id"),
        )


def decode_history(body: bytes) -> PullRequest | HistoryMarker:
    """One entry of the history stream; raises :class:`InvalidMessage` like the others."""
    if _load(body, None).get("type") == HistoryMarker.TYPE:
        return HistoryMarker.decode(body)
    return PullRequest.decode(body)


def decode_presence_stream(body: bytes) -> NodePresence | RosterMarker:
    if _load(body, None).get("type") == RosterMarker.TYPE:
        return RosterMarker.decode(body)
    return NodePresence.decode(body)


def _dump(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()


def _load(body: bytes, expected_type: str | None) -> dict[str, Any]:
    """The body's fields, checked for size, JSON, version and (unless ``None``) type."""
    if not isinstance(body, bytes | bytearray):
        raise InvalidMessage(f"a message body must be bytes, not {type(body).__name__}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessage(
            f"the message is {len(body)} bytes; at most {MAX_MESSAGE_BYTES} are allowed"
        )
    try:
        fields = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidMessage("the message body is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError):
        raise InvalidMessage("the message body is not JSON") from None
    if not isinstance(fields, dict):
        raise InvalidMessage(f"the message body must be a JSON object, not {_json_type(fields)}")
    version = fields.get("version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise InvalidMessage(
            f"unsupported contract version {version!r}; this side speaks version {PROTOCOL_VERSION}"
        )
    if expected_type is not None and fields.get("type") != expected_type:
        raise InvalidMessage(
            f"expected a message of type {expected_type!r}, got {fields.get('type')!r}"
        )
    return fields


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _text(fields: dict[str, Any], name: str, max_length: int, allow_empty: bool = False) -> str:
    if name not in fields:
        raise InvalidMessage(f"the message has no {name!r} field")
    value = fields[name]
    if not isinstance(value, str):
        raise InvalidMessage(f"{name!r} must be a string, not {_json_type(value)}")
    if not value and not allow_empty:
        raise InvalidMessage(f"{name!r} is empty")
    if len(value) > max_length:
        raise InvalidMessage(f"{name!r} is longer than {max_length} characters")
    return value


def _optional_text(fields: dict[str, Any], name: str) -> str | None:
    if fields.get(name) is None:
        return None
    return _text(fields, name, 1024)


def _count(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidMessage(f"{name!r} must be a whole number of bytes, at least 0")
    return value


def _identifier(fields: dict[str, Any], name: str) -> str:
    value = _text(fields, name, MAX_ID_LENGTH)
    if not value.isprintable() or not value.isascii():
        raise InvalidMessage(f"{name!r} must be printable ASCII")
    return value


def _number(fields: dict[str, Any], name: str) -> float:
    if name not in fields:
        raise InvalidMessage(f"the message has no {name!r} field")
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(f"{name!r} must be a number, not {_json_type(value)}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InvalidMessage(f"{name!r} must be a finite, non-negative number")
    return number


def _optional_count(fields: dict[str, Any], name: str) -> int:
    """An optional count (absent from older workers: 0)."""
    value = fields.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidMessage(f"{name!r} must be a count (a whole number, 0 or more)")
    return value


def _enum(fields: dict[str, Any], name: str, enum: type[_E]) -> _E:
    value = _text(fields, name, 64)
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise InvalidMessage(f"{name!r} is {value!r}; expected one of: {allowed}") from None


def _image(fields: dict[str, Any]) -> ImageReference:
    if "image" not in fields:
        raise InvalidMessage("the message has no 'image' field")
    try:
        return parse_reference(fields["image"])
    except ValueError as error:
        raise InvalidMessage(f"invalid image reference: {error}") from None


def puller_version() -> str:
    """The installed distribution's version, sent in presence announcements."""
    try:
        return importlib.metadata.version("puller")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
