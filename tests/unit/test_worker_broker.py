"""The worker's broker while it has no connection: what it keeps for the next one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pika
import pika.exceptions
import pika.frame
import pytest

from contract import CONTENT_TYPE, BrokerUnavailable, NodeProgress, NodeResult, Status
from contract import topology as topo
from worker.broker import WorkerBroker
from worker.broker.delivery import Delivery


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


class Live:
    """Stands for the live channel: what is published on it."""

    is_open = True

    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, pika.BasicProperties]] = []

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        self.published.append((exchange, routing_key, body, properties))


@pytest.mark.parametrize("correlation_id", [None, "r1", "é-ü", b"\xff\xfe-1", b"plain"])
def test_a_reply_goes_to_the_reply_exchange_with_the_correlation_id_as_it_came(
    correlation_id: str | bytes | None,
) -> None:
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)
    live = broker._channel = Live()  # noqa: SLF001 - as if connected
    came = Delivery(b"{}", 1, "amq.gen-q", correlation_id, source=live)  # type: ignore[arg-type]
    broker._reply(came, "amq.gen-q", b"{}")  # noqa: SLF001 - what answer() sends
    [(exchange, routing_key, body, properties)] = live.published
    assert (exchange, routing_key, body) == (topo.REPLIES.name, "amq.gen-q", b"{}")
    assert properties.correlation_id == correlation_id
    assert (properties.content_type, properties.delivery_mode) == (CONTENT_TYPE, 1)
    pika.frame.Header(1, len(body), properties).marshal()  # pika can write it as it is


def test_a_channel_the_broker_closed_is_reported_with_the_brokers_reason() -> None:
    """What a reconnect is logged with: the reason RabbitMQ gave, not only "no channel"."""

    class Link:
        def why_closed(self, _channel: object) -> BaseException:
            reason: BaseException = pika.exceptions.ChannelClosedByBroker(
                404, "NOT_FOUND - no queue 'puller.presence' in vhost '/'"
            )
            return reason

    class Closed:
        is_open = False

    broker = WorkerBroker("amqp://rabbit/%2F", "n", prefetch=8, heartbeat=30)
    broker._link = Link()  # type: ignore[assignment]  # noqa: SLF001 - as if connected
    with pytest.raises(BrokerUnavailable, match=r"closed: \(404, .*NOT_FOUND - no queue"):
        broker._open_channel(Closed())  # noqa: SLF001 - what announce() and answer() call
    with pytest.raises(BrokerUnavailable, match=r"^no open channel to RabbitMQ at rabbit:5672"):
        broker._open_channel(None)  # noqa: SLF001


class Connected(WorkerBroker):
    """A broker whose connection's thread is this test: hops wait until ``run_hops()``."""

    def __init__(self) -> None:
        super().__init__("amqp://rabbit/%2F", "n", prefetch=8, heartbeat=30)
        self.hops: list[Callable[[], None]] = []
        self.sent: list[str | None] = []
        self.open = True

    def _post(self, hop: Callable[[], None]) -> bool:
        if self.open:
            self.hops.append(hop)
        return self.open

    def _on_own_thread(self) -> bool:
        return self.open and threading.get_ident() == self._owner

    def _send_answer(self, delivery: Delivery, _result: object, _refuse: bool) -> None:
        self.sent.append(delivery.correlation_id)

    def run_hops(self) -> None:
        hops, self.hops = self.hops, []
        for hop in hops:
            hop()


def test_an_answer_handed_over_runs_on_the_connections_thread_once() -> None:
    broker = Connected()
    broker._owner = threading.get_ident()  # noqa: SLF001 - this thread serves
    worker = threading.Thread(target=broker.answer, args=(delivery("r1"), None))
    worker.start()
    worker.join()
    assert (broker.sent, broker.handing_over) == ([], 1)
    broker.run_hops()
    assert (broker.sent, broker.handing_over, broker.waiting()) == (["r1"], 0, (0, 0, 0))


def test_answers_handed_to_a_connection_that_closes_first_wait_for_the_next() -> None:
    broker = Connected()
    broker._owner = threading.get_ident()  # noqa: SLF001
    for request_id in ("r1", "r2"):
        worker = threading.Thread(target=broker.answer, args=(delivery(request_id), None))
        worker.start()
        worker.join()
    with broker._lock:  # noqa: SLF001 - as close() does
        broker._keep_handed()  # noqa: SLF001
    broker.open = False
    broker.run_hops()  # the closing connection's loop runs them: they are no longer its own
    assert (broker.sent, broker.handing_over, broker.waiting()) == ([], 0, (2, 0, 0))
    broker.open = True
    broker._send_what_waited()  # noqa: SLF001 - as connect() does
    assert broker.sent == ["r1", "r2"]


def test_a_hop_that_finds_the_connection_lost_keeps_its_answer() -> None:
    broker = Connected()
    broker._owner = threading.get_ident()  # noqa: SLF001
    worker = threading.Thread(target=broker.answer, args=(delivery("r1"), None))
    worker.start()
    worker.join()
    broker.open = False  # lost, not yet closed
    broker.run_hops()
    assert (broker.sent, broker.handing_over, broker.waiting()) == ([], 0, (1, 0, 0))


class Failing:
    """Stands for the connection: what ended its use."""

    def __init__(self) -> None:
        self.failed: list[BaseException] = []

    def fail(self, error: BaseException) -> None:
        self.failed.append(error)


def cancel(consumer_tag: str) -> pika.frame.Method:
    return pika.frame.Method(1, pika.spec.Basic.Cancel(consumer_tag=consumer_tag))


def test_only_the_broker_cancelling_a_live_consumer_ends_the_connections_use() -> None:
    broker = WorkerBroker("amqp://rabbit/%2F", "n", prefetch=8, heartbeat=30)
    link = broker._link = Failing()  # type: ignore[assignment]  # noqa: SLF001 - as if connected
    live, history, other = object(), object(), object()
    broker._channel, broker._history_channel = live, history  # noqa: SLF001
    broker._consumer_tag = "now"  # noqa: SLF001
    broker._on_consumer_cancelled(live, cancel("before"))  # noqa: SLF001 - an older consumer's
    broker._on_consumer_cancelled(other, cancel("now"))  # noqa: SLF001 - a closed reading's
    assert link.failed == []
    broker._consumer_tag = None  # noqa: SLF001 - stop_consuming() cancelled it: draining
    broker._on_consumer_cancelled(live, cancel("now"))  # noqa: SLF001
    assert link.failed == []
    broker._consumer_tag = "now"  # noqa: SLF001
    broker._on_consumer_cancelled(live, cancel("now"))  # noqa: SLF001
    broker._on_consumer_cancelled(history, cancel("reading"))  # noqa: SLF001
    assert [str(error) for error in link.failed] == [
        "RabbitMQ at rabbit:5672 vhost '/' cancelled the consumer of puller.node.n",
        "RabbitMQ at rabbit:5672 vhost '/' cancelled the consumer of puller.history.stream",
    ]


def test_the_live_channel_closed_by_the_broker_ends_the_connections_use() -> None:
    broker = WorkerBroker("amqp://rabbit/%2F", "n", prefetch=8, heartbeat=30)
    link = broker._link = Failing()  # type: ignore[assignment]  # noqa: SLF001 - as if connected
    live, refused = object(), object()
    broker._channel = live  # noqa: SLF001
    broker._on_channel_closed(live, pika.exceptions.ChannelClosedByClient(200, "bye"))  # noqa: SLF001
    broker._on_channel_closed(  # noqa: SLF001 - a declaration's refusal while connecting
        refused, pika.exceptions.ChannelClosedByBroker(405, "RESOURCE_LOCKED")
    )
    assert link.failed == []
    gone = pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no exchange 'puller.replies'")
    broker._on_channel_closed(live, gone)  # noqa: SLF001
    [error] = link.failed
    assert isinstance(error, BrokerUnavailable)
    assert str(error) == (
        "RabbitMQ at rabbit:5672 vhost '/' closed the channel consuming puller.node.n: "
        "404 NOT_FOUND - no exchange 'puller.replies'"
    )


class Closed:
    """The live channel after RabbitMQ closed it, the connection still going down."""

    is_open = False
    is_closed = True


def test_an_answer_the_going_connection_cannot_send_waits_for_the_next() -> None:
    """A pull that ends just as the connection goes (its channel closed by the broker, the
    connection not yet marked lost) answers on the next connection: its requester waits,
    and the request, acknowledged live, is not in what catch-up replays."""
    broker = WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", prefetch=8, heartbeat=30)
    broker._channel = Closed()  # noqa: SLF001 - as the going connection left it
    result = NodeResult("r1", "n", "img:1", Status.PULLED, 1.0)
    came = Delivery(b"{}", 1, "reply-q", "r1", source=None)
    broker._send_answer(came, result, False)  # noqa: SLF001 - what answer() runs
    assert broker.waiting() == (1, 0, 0)
    live = broker._channel = Live()  # noqa: SLF001 - the next connection
    broker._send_what_waited()  # noqa: SLF001 - as connect() does
    [(exchange, routing_key, body, _properties)] = live.published
    assert (exchange, routing_key) == (topo.REPLIES.name, "reply-q")
    assert NodeResult.decode(body) == result
    assert broker.waiting() == (0, 0, 0)
