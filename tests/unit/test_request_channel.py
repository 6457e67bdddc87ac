"""How RabbitMQ's confirms and returns settle a request (a fake channel stands in for
pika's; the real one is in tests/integration/test_publisher_connection.py)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pika
import pika.frame
import pika.spec
import pytest

from contract import BrokerUnavailable, NoNodes
from contract import topology as topo
from publisher.request_channel import HISTORY_ATTEMPTS, HISTORY_RETRY_DELAY, RequestChannel


class FakeLoop:
    """Keeps what pika's loop would run later; the test runs it."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.later.append((delay, callback))

    def run_due(self) -> list[float]:
        """Runs what was waiting; returns the delays it waited for."""
        due, self.later = self.later, []
        for _, callback in due:
            callback()
        return [delay for delay, _ in due]


class FakeChannel:
    """Records publishes; the test plays RabbitMQ's part through the callbacks."""

    def __init__(self) -> None:
        self.published: list[tuple[str, pika.BasicProperties, bool]] = []
        self.on_return: Callable[..., None] | None = None
        self.on_confirm: Callable[[pika.frame.Method], None] | None = None
        self.is_open = True
        self.connection = SimpleNamespace(ioloop=FakeLoop())

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        self.on_return = callback

    def confirm_delivery(
        self, on_confirm: Callable[[pika.frame.Method], None], callback: Callable[[Any], None]
    ) -> None:
        self.on_confirm = on_confirm
        callback(None)

    def basic_publish(
        self,
        exchange: str,
        _routing_key: str,
        _body: bytes,
        properties: pika.BasicProperties,
        mandatory: bool = False,
    ) -> None:
        self.published.append((exchange, properties, mandatory))

    def ack(self, tag: int, multiple: bool = False, nack: bool = False) -> None:
        kind = pika.spec.Basic.Nack if nack else pika.spec.Basic.Ack
        assert self.on_confirm is not None
        self.on_confirm(pika.frame.Method(1, kind(delivery_tag=tag, multiple=multiple)))

    def give_back(self, request_id: str, exchange: str = topo.PULLS.name) -> None:
        assert self.on_return is not None
        method = pika.spec.Basic.Return(312, "NO_ROUTE", exchange, "")
        self.on_return(self, method, pika.BasicProperties(correlation_id=request_id), b"{}")


@pytest.fixture
def fake() -> FakeChannel:
    return FakeChannel()


@pytest.fixture
def requests(fake: FakeChannel) -> RequestChannel:
    channel = RequestChannel(fake, "broker:5672", "puller.replies.x", "sessions")
    ready: list[bool] = []
    channel.confirming(lambda: ready.append(True))
    assert ready == [True]
    return channel


def test_a_request_settles_once_both_copies_are_confirmed(
    requests: RequestChannel, fake: FakeChannel
) -> None:
    settled: Future[None] = Future()
    requests.publish(b"{}", "r1", True, settled)
    assert [(e, m) for e, _, m in fake.published] == [
        (topo.PULLS.name, True),
        (topo.HISTORY.name, True),
    ]
    [(_, live, _), (_, kept, _)] = fake.published
    assert (live.correlation_id, live.reply_to, live.user_id) == (
        "r1",
        "puller.replies.x",
        "sessions",
    )
    assert (live.delivery_mode, kept.delivery_mode, kept.user_id) == (1, 2, "sessions")
    fake.ack(1)
    assert not settled.done()
    fake.ack(2)
    assert settled.result(timeout=0) is None


def test_one_confirm_for_several_settles_every_request_it_covers(
    requests: RequestChannel, fake: FakeChannel
) -> None:
    first: Future[None] = Future()
    second: Future[None] = Future()
    third: Future[None] = Future()
    requests.publish(b"{}", "r1", True, first)
    requests.publish(b"{}", "r2", False, second)
    requests.publish(b"{}", "r3", True, third)
    fake.ack(3, multiple=True)
    assert first.done() and second.done()
    assert not third.done()
    fake.ack(5, multiple=True)
    assert third.result(timeout=0) is None


def test_a_returned_live_copy_is_no_nodes_and_says_whether_it_is_kept(
    requests: RequestChannel, fake: FakeChannel
) -> None:
    kept: Future[None] = Future()
    requests.publish(b"{}", "r1", True, kept)
    fake.give_back("r1")
    fake.ack(2, multiple=True)
    with pytest.raises(NoNodes, match="in the history"):
        kept.result(timeout=0)
    check: Future[None] = Future()
    requests.publish(b"{}", "r2", False, check)
    fake.give_back("r2")
    fake.ack(3)
    with pytest.raises(NoNodes) as raised:
        check.result(timeout=0)
    assert "in the history" not in str(raised.value)


def test_a_nack_of_either_copy_is_a_refusal(requests: RequestChannel, fake: FakeChannel) -> None:
    settled: Future[None] = Future()
    requests.publish(b"{}", "r1", True, settled)
    fake.ack(1)
    fake.ack(2, nack=True)
    with pytest.raises(BrokerUnavailable, match="refused the request"):
        settled.result(timeout=0)


def test_a_lost_connection_fails_every_request_still_waiting(
    requests: RequestChannel, fake: FakeChannel
) -> None:
    done: Future[None] = Future()
    waiting: Future[None] = Future()
    requests.publish(b"{}", "r1", False, done)
    requests.publish(b"{}", "r2", True, waiting)
    fake.ack(1)
    requests.fail_all(BrokerUnavailable("lost"))
    assert done.result(timeout=0) is None
    with pytest.raises(BrokerUnavailable, match="lost"):
        waiting.result(timeout=0)


def test_a_returned_history_copy_is_published_again_until_the_history_takes_it(
    fake: FakeChannel,
) -> None:
    returns: list[int] = []
    requests = RequestChannel(
        fake,
        "broker:5672",
        "puller.replies.x",
        "sessions",
        on_history_returned=lambda given_up: returns.append(int(given_up)),
    )
    requests.confirming(lambda: None)
    settled: Future[None] = Future()
    requests.publish(b"{}", "r1", True, settled)
    fake.ack(1)
    fake.give_back("r1", topo.HISTORY.name)
    fake.ack(2)
    assert not settled.done()
    assert fake.connection.ioloop.run_due() == [HISTORY_RETRY_DELAY]
    assert [e for e, _, _ in fake.published] == [topo.PULLS.name, *[topo.HISTORY.name] * 2]
    fake.ack(3)
    assert settled.result(timeout=0) is None
    assert returns == [0], "sent again once"


def test_a_history_copy_returned_every_time_is_counted_and_the_request_settles(
    fake: FakeChannel,
) -> None:
    returns: list[int] = []
    requests = RequestChannel(
        fake,
        "broker:5672",
        "puller.replies.x",
        "sessions",
        on_history_returned=lambda given_up: returns.append(int(given_up)),
    )
    requests.confirming(lambda: None)
    settled: Future[None] = Future()
    requests.publish(b"{}", "r1", True, settled)
    fake.ack(1)
    delays: list[float] = []
    for tag in range(2, 2 + HISTORY_ATTEMPTS):
        fake.give_back("r1", topo.HISTORY.name)
        fake.ack(tag)
        delays += fake.connection.ioloop.run_due()
    assert len(delays) == HISTORY_ATTEMPTS - 1 and delays == sorted(delays)
    assert settled.result(timeout=0) is None
    assert returns == [0] * (HISTORY_ATTEMPTS - 1) + [1], "sent again, then given up"


def test_a_request_waiting_to_publish_its_history_again_fails_with_the_connection(
    requests: RequestChannel, fake: FakeChannel
) -> None:
    settled: Future[None] = Future()
    requests.publish(b"{}", "r1", True, settled)
    fake.ack(1)
    fake.give_back("r1", topo.HISTORY.name)
    fake.ack(2)
    requests.fail_all(BrokerUnavailable("lost"))
    with pytest.raises(BrokerUnavailable, match="lost"):
        settled.result(timeout=0)
    fake.is_open = False
    fake.connection.ioloop.run_due()
    assert len(fake.published) == 2


def test_after_a_history_copy_never_taken_the_next_are_sent_once_until_one_is_taken(
    fake: FakeChannel,
) -> None:
    returns: list[int] = []
    requests = RequestChannel(
        fake,
        "broker:5672",
        "puller.replies.x",
        "sessions",
        on_history_returned=lambda given_up: returns.append(int(given_up)),
    )
    requests.confirming(lambda: None)
    first: Future[None] = Future()
    requests.publish(b"{}", "r1", True, first)
    fake.ack(1)
    for tag in range(2, 2 + HISTORY_ATTEMPTS):
        fake.give_back("r1", topo.HISTORY.name)
        fake.ack(tag)
        fake.connection.ioloop.run_due()
    tag = 1 + HISTORY_ATTEMPTS
    second: Future[None] = Future()
    requests.publish(b"{}", "r2", True, second)
    fake.give_back("r2", topo.HISTORY.name)
    fake.ack(tag + 2, multiple=True)
    assert second.result(timeout=0) is None and fake.connection.ioloop.later == []
    assert returns == [0] * (HISTORY_ATTEMPTS - 1) + [1, 1]
    third: Future[None] = Future()
    requests.publish(b"{}", "r3", True, third)  # the history is bound again
    fake.ack(tag + 4, multiple=True)
    fourth: Future[None] = Future()
    requests.publish(b"{}", "r4", True, fourth)
    fake.ack(tag + 5)
    fake.give_back("r4", topo.HISTORY.name)
    fake.ack(tag + 6)
    assert not fourth.done(), "published again, as a history that worked before"


def test_a_request_no_worker_and_no_history_took_is_no_nodes_at_once_and_not_kept(
    requests: RequestChannel, fake: FakeChannel
) -> None:
    settled: Future[None] = Future()
    requests.publish(b"{}", "r1", True, settled)
    fake.give_back("r1")
    fake.give_back("r1", topo.HISTORY.name)
    fake.ack(2, multiple=True)
    with pytest.raises(NoNodes, match="not in the history"):
        settled.result(timeout=0)
    assert fake.connection.ioloop.later == []
