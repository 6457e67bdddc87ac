"""The wire contract between puller's publisher and its workers.

Both sides import this package and nothing else of each other:

- ``messages``: the message types and their encode/decode, driven by field tables (``fields``)
- ``reference``: the image reference grammar, as Docker parses it
- ``topology``: the exchanges, queues and streams both sides declare
- ``errors``: the error kinds on the wire and puller's error hierarchy
- ``connection``: connection parameters and pika's errors in puller's terms (broker modules only)
- ``stream_tail``: where a stream ends, read over RabbitMQ's stream protocol (catch-up)
"""

from contract import topology
from contract.errors import (
    BrokerUnavailable,
    ErrorKind,
    Forbidden,
    InvalidMessage,
    InvalidReference,
    Misconfigured,
    NodeError,
    NoNodes,
    PullerError,
    PullFailed,
)
from contract.json_body import MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from contract.messages import (
    CONTENT_TYPE,
    DEFAULT_AMQP_URL,
    MAX_KEEP_IMAGES,
    MAX_PRESENCE_INTERVAL,
    PRESENCE_INTERVAL,
    PRESENCE_MISSES,
    CheckRequest,
    HistoryGap,
    HistoryMarker,
    Lane,
    NodePresence,
    NodeProgress,
    NodeResult,
    NodeState,
    PruneRequest,
    PruneResult,
    Pulling,
    PullRequest,
    Removed,
    Reply,
    Request,
    RosterMarker,
    Status,
    decode_history,
    decode_presence_stream,
    decode_reply,
    decode_request,
    puller_version,
)
from contract.reference import ImageReference, parse_reference
from contract.topology import (
    DEFAULT_HISTORY_MAX_AGE,
    DEFAULT_HISTORY_MAX_BYTES,
    REPLY_QUEUE_PREFIX,
    node_queue_name,
)

PULL_EXCHANGE = topology.PULLS.name
REPLY_EXCHANGE = topology.REPLIES.name
PRESENCE_EXCHANGE = topology.PRESENCE.name
PRESENCE_STREAM = topology.PRESENCE_STREAM.name
HISTORY_EXCHANGE = topology.HISTORY.name
HISTORY_STREAM = topology.HISTORY_STREAM_NAME

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_AMQP_URL",
    "DEFAULT_HISTORY_MAX_AGE",
    "DEFAULT_HISTORY_MAX_BYTES",
    "HISTORY_EXCHANGE",
    "HISTORY_STREAM",
    "MAX_KEEP_IMAGES",
    "MAX_MESSAGE_BYTES",
    "MAX_PRESENCE_INTERVAL",
    "PRESENCE_EXCHANGE",
    "PRESENCE_INTERVAL",
    "PRESENCE_MISSES",
    "PRESENCE_STREAM",
    "PROTOCOL_VERSION",
    "PULL_EXCHANGE",
    "REPLY_EXCHANGE",
    "REPLY_QUEUE_PREFIX",
    "BrokerUnavailable",
    "CheckRequest",
    "ErrorKind",
    "Forbidden",
    "HistoryGap",
    "HistoryMarker",
    "ImageReference",
    "InvalidMessage",
    "InvalidReference",
    "Lane",
    "Misconfigured",
    "NoNodes",
    "NodeError",
    "NodePresence",
    "NodeProgress",
    "NodeResult",
    "NodeState",
    "PruneRequest",
    "PruneResult",
    "PullFailed",
    "PullRequest",
    "PullerError",
    "Pulling",
    "Removed",
    "Reply",
    "Request",
    "RosterMarker",
    "Status",
    "decode_history",
    "decode_presence_stream",
    "decode_reply",
    "decode_request",
    "node_queue_name",
    "parse_reference",
    "puller_version",
    "topology",
]
