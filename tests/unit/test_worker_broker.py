"""The worker's broker while it has no connection: what it keeps for the next one."""

from __future__ import annotations

import threading
import time

import pika
import pika.frame
import pika.spec
import pytest

from contract import CONTENT_TYPE, BrokerUnavailable, NodeProgress, NodeResult, Status
from contract import topology as topo
from worker.broker import WorkerBroker, _open, ack_frame, reply_frames
from worker.delivery import Delivery


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


@pytest.mark.parametrize("correlation_id", [None, "", "r1", "x" * 255, "é-ü"])
@pytest.mark.parametrize(
    ("size", "limit"), [(0, 100), (1, 100), (250, 100), (300, 100), (5, 131064)]
)
def test_reply_frames_are_the_bytes_pika_would_send(
    correlation_id: str | None, size: int, limit: int
) -> None:
    body = bytes(range(256))[:size] if size <= 256 else b"b" * size
    expected = [
        pika.frame.Method(
            7, pika.spec.Basic.Publish(exchange=topo.REPLIES.name, routing_key="amq.gen-q")
        ),
        pika.frame.Header(
            7,
            len(body),
            pika.BasicProperties(
                content_type=CONTENT_TYPE, correlation_id=correlation_id, delivery_mode=1
            ),
        ),
        *(pika.frame.Body(7, body[i : i + limit]) for i in range(0, len(body), limit)),
    ]
    frames = reply_frames(7, "amq.gen-q", correlation_id, body, limit)
    assert frames == [frame.marshal() for frame in expected]


def test_a_correlation_id_too_long_for_amqp_is_refused_as_pika_refuses_it() -> None:
    with pytest.raises(ValueError, match="255"):
        reply_frames(1, "q", "x" * 256, b"{}", 100)


@pytest.mark.parametrize("tag", [1, 2**16 + 3, 2**63 - 1])
def test_the_ack_frame_is_the_bytes_pika_would_send(tag: int) -> None:
    assert ack_frame(3, tag) == pika.frame.Method(3, pika.spec.Basic.Ack(tag)).marshal()


def test_a_live_request_whose_handling_raises_is_refused_not_raised_into_pika() -> None:
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)

    def broken(_delivery: Delivery) -> None:
        raise RuntimeError("a bug")

    take = broker._hold_until_served(broken)  # noqa: SLF001 - the hand-over pika calls
    take(delivery("held"))  # while connecting: kept for the first process_events()
    assert broker.waiting() == (0, 0, 0)
    broker._serve_until = time.monotonic() + 60  # noqa: SLF001 - as in process_events()
    take(delivery("r1"))
    assert broker.waiting() == (1, 0, 0)  # the refusal, kept for a connection


def test_live_requests_after_the_slice_are_held_for_the_next_not_served_on() -> None:
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)
    served: list[str | None] = []
    take = broker._hold_until_served(lambda d: served.append(d.correlation_id))  # noqa: SLF001
    broker._serve_until = time.monotonic() + 60  # noqa: SLF001 - within a slice
    take(delivery("in"))
    broker._serve_until = time.monotonic() - 1  # noqa: SLF001 - the slice is over
    take(delivery("after"))
    assert served == ["in"]
    assert [d.correlation_id for _, d in broker._held] == ["after"]  # noqa: SLF001
    broker._owner = threading.get_ident()  # noqa: SLF001 - as if this thread had connected
    broker.stop_consuming()  # not connected: only forgets what it held
    assert broker._held == []  # noqa: SLF001


@pytest.mark.parametrize("correlation_id", [b"\xff\xfe-1", b"plain"])
def test_a_correlation_id_that_is_not_utf8_goes_back_as_it_came(correlation_id: bytes) -> None:
    frames = reply_frames(2, "q", correlation_id, b"{}", 100)
    properties = pika.BasicProperties(
        content_type=CONTENT_TYPE, correlation_id=correlation_id, delivery_mode=1
    )
    assert frames[1] == pika.frame.Header(2, 2, properties).marshal()


def test_a_channel_the_broker_closed_is_reported_with_the_brokers_reason() -> None:
    """What a reconnect is logged with: the reason RabbitMQ gave, not only "no channel"."""

    class Closed:
        is_open = False

        class _impl:  # noqa: N801 - stands for pika's channel implementation
            _closing_reason = pika.exceptions.ChannelClosedByBroker(
                404, "NOT_FOUND - no queue 'puller.presence' in vhost '/'"
            )

    with pytest.raises(BrokerUnavailable, match=r"closed: \(404, .*NOT_FOUND - no queue"):
        _open(Closed(), "amqp://rabbit")
    with pytest.raises(BrokerUnavailable, match=r"^no open channel to RabbitMQ at amqp://rabbit$"):
        _open(None, "amqp://rabbit")
