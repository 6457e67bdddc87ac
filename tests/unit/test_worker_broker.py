"""The worker's broker while it has no connection: what it keeps for the next one."""

from __future__ import annotations

import threading

import pytest

from contract import BrokerUnavailable, NodeProgress, NodeResult, Status
from worker.broker import WorkerBroker
from worker.model import Delivery


def delivery(request_id: str) -> Delivery:
    return Delivery(b"{}", 1, "reply-q", request_id, source=None)


def test_while_disconnected_only_the_latest_progress_of_each_request_is_kept() -> None:
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)
    for done in range(24):
        for request_id in ("r1", "r2"):
            broker.progress(delivery(request_id), NodeProgress(request_id, "n", "i", done, 100))
    for request_id in ("r1", "r2", "r3"):
        broker.answer(delivery(request_id), NodeResult(request_id, "n", "i", Status.PULLED, 1.0))
    assert broker.waiting() == (3, 2, 0)


def test_answers_from_other_threads_wait_too() -> None:
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)
    threads = [
        threading.Thread(
            target=broker.answer,
            args=(delivery(f"r{i}"), NodeResult(f"r{i}", "n", "i", Status.PRESENT, 0.1)),
        )
        for i in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert broker.waiting() == (10, 0, 0)


def test_pika_is_refused_off_the_connection_thread() -> None:
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)
    with pytest.raises(BrokerUnavailable, match=r"cannot connect to RabbitMQ at 127\.0\.0\.1:9"):
        broker.connect(lambda _delivery: None)  # this thread now owns the connection
    with pytest.raises(BrokerUnavailable, match="not connected"):
        broker.process_events(0.1)  # the owner is told the truth: no connection
    failures: list[BaseException] = []

    def call() -> None:
        try:
            broker.process_events(0.1)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert [type(f) for f in failures] == [RuntimeError]
    assert "off the connection's thread" in str(failures[0])
