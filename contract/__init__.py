"""The wire contract between puller's publisher and its workers.

Both sides import this package and nothing else of each other: message types
with their encode/decode, the names of the exchanges and queues, the image
reference grammar, the error kinds, and puller's error hierarchy.
"""

from contract.errors import (
    BrokerUnavailable,
    ErrorKind,
    InvalidMessage,
    InvalidReference,
    NoNodes,
    PullerError,
    PullFailed,
)
from contract.messages import (
    CONTENT_TYPE,
    MAX_MESSAGE_BYTES,
    PRESENCE_EXCHANGE,
    PRESENCE_INTERVAL,
    PRESENCE_STREAM,
    PRESENCE_STREAM_ARGUMENTS,
    PROTOCOL_VERSION,
    PULL_EXCHANGE,
    REPLY_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    NodeError,
    NodePresence,
    NodeProgress,
    NodeResult,
    NodeState,
    PullRequest,
    RosterMarker,
    Status,
    decode_presence_stream,
    decode_reply,
    node_queue_name,
    puller_version,
)
from contract.reference import ImageReference, parse_reference

__all__ = [
    "CONTENT_TYPE",
    "MAX_MESSAGE_BYTES",
    "PRESENCE_EXCHANGE",
    "PRESENCE_INTERVAL",
    "PRESENCE_STREAM",
    "PRESENCE_STREAM_ARGUMENTS",
    "PROTOCOL_VERSION",
    "PULL_EXCHANGE",
    "REPLY_EXCHANGE",
    "REPLY_QUEUE_PREFIX",
    "BrokerUnavailable",
    "ErrorKind",
    "ImageReference",
    "InvalidMessage",
    "InvalidReference",
    "NoNodes",
    "NodeError",
    "NodePresence",
    "NodeProgress",
    "NodeResult",
    "NodeState",
    "PullFailed",
    "PullRequest",
    "PullerError",
    "RosterMarker",
    "Status",
    "decode_presence_stream",
    "decode_reply",
    "node_queue_name",
    "parse_reference",
    "puller_version",
]
