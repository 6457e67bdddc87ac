"""puller's own errors, rooted in :class:`PullerError`, and the error kinds on the wire."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorKind(StrEnum):
    """Why a node did not get an image. Sent in replies; stable strings."""

    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    REGISTRY_UNREACHABLE = "registry_unreachable"
    REGISTRY_ERROR = "registry_error"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    ENGINE_ERROR = "engine_error"
    STALLED = "stalled"
    TIMEOUT = "timeout"
    NO_SPACE = "no_space"
    CANCELLED = "cancelled"
    FORBIDDEN = "forbidden"
    """Refused by a rule (allow-list, digest rule, allowed publishers); nothing was pulled."""
    RATE_LIMITED = "rate_limited"
    """The node's cap on requests a minute was reached; nothing was pulled."""
    INTERNAL = "internal"
    UNKNOWN = "unknown"
    """Never sent: what a kind this side does not know (from a newer peer) is read as; the
    message then starts with the kind's own name in parentheses."""


@dataclass(frozen=True)
class NodeError:
    """Why a node failed: a stable ``kind`` and a message a person can act on."""

    kind: ErrorKind
    message: str


class PullerError(Exception):
    """The root of every error puller raises on purpose."""


class InvalidReference(PullerError, ValueError):
    """An image reference that breaks the distribution reference grammar."""


class InvalidMessage(PullerError, ValueError):
    """A message body that breaks the wire contract."""


class Misconfigured(PullerError, ValueError):
    """Settings that cannot work together, such as TLS files for a plain ``amqp://`` URL."""


class Forbidden(PullerError):
    """A request refused by the image policy before anything was published."""


class BrokerUnavailable(PullerError):
    """RabbitMQ could not be reached, or the connection to it was lost."""


class NoNodes(PullerError):
    """A pull request was published, but no worker queue was bound to receive it. It is in
    the history all the same: ``request_id`` says which request it was."""

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class PullFailed(PullerError):
    """A node could not get an image; ``kind`` says why in one word."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def as_node_error(self) -> NodeError:
        return NodeError(self.kind, self.message)
