"""The publisher's one connection against a real RabbitMQ: what a request looks like on the
wire, what its confirms mean, many threads sharing it, and closing it when the broker has
gone silent."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from urllib.parse import unquote, urlsplit, urlunsplit

import pika
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import CONTENT_TYPE, BrokerUnavailable, NoNodes, PullRequest, parse_reference
from contract import topology as topo
from contract.connection import declare
from publisher import Publisher
from publisher.broker import PublisherBroker
from tests.integration.conftest import new_vhost
from tests.integration.tcp_proxy import TcpProxy
from tests.waiting import eventually

pytestmark = pytest.mark.integration

IMAGE = "registry.example/team/gcc_assert:93eefc6"


@pytest.fixture
def vhost_url(rabbitmq: RabbitMqContainer) -> str:
    """An empty vhost: no worker queue bound until a test binds one."""
    return new_vhost(rabbitmq)


@pytest.fixture
def broker(vhost_url: str) -> Iterator[PublisherBroker]:
    broker = PublisherBroker(vhost_url, connect_timeout=5, on_reply=lambda _c, _b: None)
    try:
        assert broker.wait_connected(10), broker.last_error
        yield broker
    finally:
        broker.close()


def bound_queue(vhost_url: str, exchange: str) -> tuple[pika.BlockingConnection, str]:
    """A queue bound to ``exchange`` (the pulls exchange: as a worker's is)."""
    connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange)
    return connection, queue


def take(
    connection: pika.BlockingConnection, queue: str, count: int = 1, timeout: float = 10.0
) -> list[tuple[pika.BasicProperties, bytes]]:
    """``count`` messages from ``queue``, waiting up to ``timeout`` for them."""
    channel = connection.channel()
    got: list[tuple[pika.BasicProperties, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            connection.sleep(0.05)
            continue
        got.append((properties, body))
    return got


def test_a_request_is_a_live_copy_for_the_workers_and_a_kept_copy_for_the_history(
    broker: PublisherBroker, vhost_url: str
) -> None:
    live_connection, live_queue = bound_queue(vhost_url, topo.PULLS.name)
    kept_connection, kept_queue = bound_queue(vhost_url, topo.HISTORY.name)
    try:
        request = PullRequest.new(parse_reference(IMAGE))
        broker.publish_request(request.encode(), request.request_id)
        [(live, live_body)] = take(live_connection, live_queue)
        [(kept, kept_body)] = take(kept_connection, kept_queue)
    finally:
        live_connection.close()
        kept_connection.close()
    assert live_body == kept_body == request.encode()
    assert live.correlation_id == request.request_id
    assert live.reply_to == broker.reply_queue
    assert (live.user_id, kept.user_id) == ("guest", "guest")
    assert live.content_type == kept.content_type == CONTENT_TYPE
    assert (live.delivery_mode, kept.delivery_mode) == (1, 2)


def test_a_check_or_prune_is_one_live_copy(broker: PublisherBroker, vhost_url: str) -> None:
    live_connection, live_queue = bound_queue(vhost_url, topo.PULLS.name)
    kept_connection, kept_queue = bound_queue(vhost_url, topo.HISTORY.name)
    try:
        broker.publish_request(b"{}", "not-kept", history=False)
        assert [body for _, body in take(live_connection, live_queue)] == [b"{}"]
        assert take(kept_connection, kept_queue, timeout=0.5) == []
    finally:
        live_connection.close()
        kept_connection.close()


def test_no_nodes_says_so_and_whether_the_request_is_kept(
    broker: PublisherBroker, vhost_url: str
) -> None:
    body = PullRequest.new(parse_reference(IMAGE)).encode()
    with pytest.raises(NoNodes, match=r"no worker queue is bound.*not in the history"):
        broker.publish_request(body, uuid.uuid4().hex)
    kept_connection, _ = bound_queue(vhost_url, topo.HISTORY.name)
    try:
        with pytest.raises(NoNodes, match=r"no worker queue is bound.*is in the history"):
            broker.publish_request(body, uuid.uuid4().hex)
    finally:
        kept_connection.close()
    with pytest.raises(NoNodes) as raised:
        broker.publish_request(body, uuid.uuid4().hex, history=False)
    assert "in the history" not in str(raised.value)
    assert broker.epoch == 1, "a request no node took is no reason to drop the connection"


def history_holds(url: str, body: bytes, timeout: float = 10.0) -> bool:
    """Whether the history stream holds ``body``, reading it from its first entry."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        for method, _properties, kept in channel.consume(
            topo.HISTORY_STREAM_NAME,
            arguments={"x-stream-offset": "first"},
            inactivity_timeout=timeout,
        ):
            if method is None:
                return False
            if kept == body:
                return True
            channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()
    return False


def test_a_request_published_while_the_history_is_unbound_reaches_it_once_bound_again(
    broker: PublisherBroker, vhost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As just after a broker restart: the stream's binding is not back yet when the request
    is published, and RabbitMQ confirms an unroutable copy."""
    live_connection, _ = bound_queue(vhost_url, topo.PULLS.name)
    admin = pika.BlockingConnection(pika.URLParameters(vhost_url)).channel()
    for item in topo.shared_declarations(topo.history_stream()):
        declare(admin, item)
    admin.queue_unbind(topo.HISTORY_STREAM_NAME, topo.HISTORY.name, "")
    request = PullRequest.new(parse_reference(IMAGE))
    published: Future[int] = Future()
    caplog.set_level(logging.INFO, logger="puller.publisher.broker")

    def publish() -> None:
        try:
            published.set_result(broker.publish_request(request.encode(), request.request_id))
        except BaseException as error:  # handed to the test's thread
            published.set_exception(error)

    try:
        threading.Thread(target=publish, daemon=True).start()
        eventually(
            lambda: published.done() or "came back" in caplog.text,
            "the publish neither ended nor had its history copy returned",
        )
        admin.queue_bind(topo.HISTORY_STREAM_NAME, topo.HISTORY.name, "")
        published.result(timeout=15)
        assert history_holds(vhost_url, request.encode()), "the request is not in the history"
        assert broker.history_resent >= 1 and broker.history_unrouted == 0
    finally:
        admin.connection.close()
        live_connection.close()


def test_requests_from_many_threads_share_one_connection_and_each_arrives_once(
    vhost_url: str, rabbitmq: RabbitMqContainer
) -> None:
    sent: list[str] = []
    errors: list[BaseException] = []
    with Publisher(vhost_url) as publisher:
        assert publisher.connect(10), publisher.connection_problem
        connection, queue = bound_queue(vhost_url, topo.PULLS.name)
        kept_connection, _ = bound_queue(vhost_url, topo.HISTORY.name)  # as workers bind it
        try:

            def requests() -> None:
                try:
                    for _ in range(25):
                        sent.append(publisher.request(IMAGE))
                except BaseException as error:  # shown by the assertion below
                    errors.append(error)

            threads = [threading.Thread(target=requests) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert errors == []
            assert len(sent) == 200
            assert connections_in(rabbitmq, vhost_url) == 3, "the publisher's and the test's two"
            got = take(connection, queue, count=200)
        finally:
            connection.close()
            kept_connection.close()
    assert sorted(p.correlation_id for p, _ in got) == sorted(sent)


def connections_in(rabbitmq: RabbitMqContainer, vhost_url: str) -> int:
    """Connections RabbitMQ lists in the vhost."""
    vhost = unquote(urlsplit(vhost_url).path.lstrip("/"))
    code, output = rabbitmq.exec(["rabbitmqctl", "--quiet", "list_connections", "vhost"])
    assert code == 0, output
    return [line.strip() for line in output.decode().splitlines()].count(vhost)


def sockets_to(port: int) -> list[str]:
    """This process's open sockets whose far end is 127.0.0.1:``port``."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile (the listing's own fd, say)
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [
        row[1] for row in rows if row[2] == f"0100007F:{port:04X}" and f"socket:[{row[9]}]" in ours
    ]


def test_a_broker_gone_silent_fails_a_request_in_the_publishers_time_and_close_drops_it(
    rabbitmq: RabbitMqContainer,
) -> None:
    """The request is not confirmed within the publisher's wait (connect timeout + grace:
    2 + 5 s) and the caller is told so; closing does not wait for a broker that does not
    answer the close, and leaves no socket open to it."""
    url = urlsplit(new_vhost(rabbitmq))
    assert url.hostname is not None and url.port is not None
    proxy = TcpProxy((url.hostname, url.port))
    try:
        proxied = urlunsplit(url._replace(netloc=f"guest:guest@{proxy.address}"))
        broker = PublisherBroker(proxied, connect_timeout=2, on_reply=lambda _c, _b: None)
        try:
            assert broker.wait_connected(10), broker.last_error
            assert len(sockets_to(proxy.port)) == 1
            proxy.go_silent_after(0)
            body = PullRequest.new(parse_reference(IMAGE)).encode()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="may or may not have been published"):
                broker.publish_request(body, uuid.uuid4().hex)
            took = time.monotonic() - started
            assert 6.5 < took < 10, f"took {took:.1f}s"
        finally:
            started = time.monotonic()
            broker.close()
            closing = time.monotonic() - started
        assert closing < 8, f"closing took {closing:.1f}s"
        assert sockets_to(proxy.port) == []
    finally:
        proxy.close()
