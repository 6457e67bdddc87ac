"""puller's publisher: ask every node to pull an image, and learn what each one did.

    from publisher import Publisher
    with Publisher("amqp://guest:guest@localhost:5672/%2F") as p:
        request_id = p.request("cyberdojofoundation/gcc_assert:93eefc6")
        report = p.pull("cyberdojofoundation/gcc_assert:93eefc6", expect=3, timeout=60)

- ``client``: :class:`Publisher`, the library
- ``broker``: the AMQP connection, on a thread of its own (the only pika user on this side)
- ``replies``: the answers received, for the callers waiting on them
- ``report``: :class:`PullReport`
- ``roster``: :class:`NodeInfo`, the live nodes, from the workers' presence stream
- ``cli`` and ``live_view``: the ``puller`` command

A library: it logs through the standard ``logging`` module (logger ``puller.publisher``)
and prints nothing unless the host application configures logging.
"""

import logging

from contract import (
    BrokerUnavailable,
    ErrorKind,
    InvalidReference,
    NodeError,
    NodeProgress,
    NodeResult,
    NoNodes,
    PullerError,
    Status,
)
from publisher.client import Publisher
from publisher.replies import AnswersForgotten
from publisher.report import PullReport
from publisher.roster import NodeInfo

# A library's loggers get a handler that drops everything, so that with no logging set up
# by the host Python's last-resort handler does not print their warnings (pika does the same).
logging.getLogger("puller").addHandler(logging.NullHandler())

__all__ = [
    "AnswersForgotten",
    "BrokerUnavailable",
    "ErrorKind",
    "InvalidReference",
    "NoNodes",
    "NodeError",
    "NodeInfo",
    "NodeProgress",
    "NodeResult",
    "Publisher",
    "PullReport",
    "PullerError",
    "Status",
]
