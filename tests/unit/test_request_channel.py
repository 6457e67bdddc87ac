"""How RabbitMQ's confirms and returns settle a request (a fake channel stands in for
pika's; the real one is in tests/integration/test_publisher_connection.py)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pika
import pika.frame
import pika.spec
import pytest

from contract import BrokerUnavailable, NoNodes
from contract import topology as topo
from publisher.request_channel import RequestChannel


class FakeChannel:
    """Records publishes; the test plays RabbitMQ's part through the callbacks."""

    def __init__(self) -> None:
        self.published: list[tuple[str, pika.BasicProperties, bool]] = []
        self.on_return: Callable[..., None] | None = None
        self.on_confirm: Callable[[pika.frame.Method], None] | None = None
        self.is_open = True

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

    def give_back(self, request_id: str) -> None:
        assert self.on_return is not None
        self.on_return(self, None, pika.BasicProperties(correlation_id=request_id), b"")


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
        (topo.HISTORY.name, False),
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
