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
    PROTOCOL_VERSION,
    PULL_EXCHANGE,
    REPLY_EXCHANGE,
    REPLY_QUEUE_PREFIX,
    NodeError,
    NodeResult,
    PullRequest,
    Status,
    node_queue_name,
)
from contract.reference import ImageReference, parse_reference

__all__ = [
    "CONTENT_TYPE",
    "MAX_MESSAGE_BYTES",
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
    "NodeResult",
    "PullFailed",
    "PullRequest",
    "PullerError",
    "Status",
    "node_queue_name",
    "parse_reference",
]
