"""The worker's broker room: its AMQP connection (:mod:`worker.broker.connection`, the only
module of the worker that imports pika), the declarations it makes
(:mod:`worker.broker.topology`), answers sent from other threads (:mod:`worker.broker.outbox`)
and what a delivery hands over (:mod:`worker.broker.delivery`)."""

from worker.broker.connection import NodeNameInUse, WorkerBroker
from worker.broker.delivery import HistoryReading, TailRead

__all__ = ["HistoryReading", "NodeNameInUse", "TailRead", "WorkerBroker"]
