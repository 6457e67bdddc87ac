"""The shortcut: a request published from the caller's own thread, on a second connection,
against a real RabbitMQ (issue 16: ``request()``'s p99). Through the I/O thread is the way
it was before and stays the fallback; these tests shut that way so that a pass means the
shortcut did the work."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import pika
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import CONTENT_TYPE, BrokerUnavailable, NoNodes, PullRequest, parse_reference
from contract import topology as topo
from publisher.broker import PublisherBroker
from publisher.caller_connection import CLIENT_PROPERTIES
from tests.integration.conftest import new_vhost
from tests.integration.tcp_proxy import TcpProxy

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
        open_the_shortcut(broker)
        yield broker
    finally:
        broker.close()


def open_the_shortcut(broker: PublisherBroker) -> None:
    """Connects, and makes the first two requests (through the I/O thread), after which the
    shortcut is opened."""
    assert broker.wait_connected(10), broker.last_error
    for request_id in ("first", "second"):
        with contextlib.suppress(NoNodes):
            broker.publish_request(PullRequest.new(parse_reference(IMAGE)).encode(), request_id)
    wait_for(lambda: broker.shortcut_open, "the caller's connection to open")


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited {timeout:g}s for {what}"
        time.sleep(0.05)


def shut_the_io_thread_way(broker: PublisherBroker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Makes a publish through the I/O thread fail loudly; returns where such tries are
    counted."""
    tried: list[str] = []

    def refuse(*_args: object) -> None:
        tried.append("io-thread")
        raise AssertionError("published through the I/O thread, not the caller's")

    monkeypatch.setattr(broker, "_run_connected", refuse)
    return tried


def bound_queue(vhost_url: str) -> tuple[pika.BlockingConnection, str]:
    """A queue bound to the pulls exchange, as a worker's is."""
    connection = pika.BlockingConnection(pika.URLParameters(vhost_url))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, topo.PULLS.name)
    return connection, queue


def take(
    connection: pika.BlockingConnection, queue: str, timeout: float = 10.0
) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message in ``queue`` (waiting until at least one came)."""
    channel = connection.channel()
    got: list[tuple[pika.BasicProperties, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            got.append((properties, body))
            continue
        if got:
            break
        time.sleep(0.05)
    return got


def test_a_request_is_published_and_confirmed_from_the_callers_thread(
    broker: PublisherBroker, vhost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, queue = bound_queue(vhost_url)
    try:
        tried = shut_the_io_thread_way(broker, monkeypatch)
        request = PullRequest.new(parse_reference(IMAGE))
        broker.publish_request(request.encode(), request.request_id)
        assert not tried
        [(properties, body)] = take(connection, queue)
    finally:
        connection.close()
    # What a worker gets is what it got through the I/O thread.
    assert body == request.encode()
    assert properties.correlation_id == request.request_id
    assert properties.reply_to == broker.reply_queue
    assert properties.user_id == "guest"
    assert properties.content_type == CONTENT_TYPE
    assert properties.delivery_mode == 1


def test_no_nodes_through_the_callers_thread_says_so_and_keeps_the_request(
    broker: PublisherBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried = shut_the_io_thread_way(broker, monkeypatch)
    body = PullRequest.new(parse_reference(IMAGE)).encode()
    with pytest.raises(NoNodes, match=r"no worker queue is bound.*in the history"):
        broker.publish_request(body, uuid.uuid4().hex)
    with pytest.raises(NoNodes) as raised:
        broker.publish_request(body, uuid.uuid4().hex, history=False)
    assert "in the history" not in str(raised.value)
    assert not tried
    assert broker.shortcut_open, "a request no node took is no reason to drop the connection"


def test_a_caller_connection_the_broker_closes_costs_no_request_and_is_opened_again(
    broker: PublisherBroker, vhost_url: str, rabbitmq: RabbitMqContainer
) -> None:
    connection, queue = bound_queue(vhost_url)
    try:
        close_caller_connections(rabbitmq)
        # The shortcut finds its connection closed while it publishes (or before): the
        # request goes through the I/O thread, and nothing is lost.
        request = PullRequest.new(parse_reference(IMAGE))
        broker.publish_request(request.encode(), request.request_id)
        got = take(connection, queue)
        assert {properties.correlation_id for properties, _ in got} == {request.request_id}
        wait_for(lambda: broker.shortcut_open, "the caller's connection to open again")
        assert broker.epoch == 1, "the I/O thread's connection was not the one closed"
    finally:
        connection.close()


def caller_connections(rabbitmq: RabbitMqContainer, vhost: str | None = None) -> list[str]:
    """The pids of the shortcut's connections (in ``vhost``), as RabbitMQ lists them."""
    code, output = rabbitmq.exec(
        ["rabbitmqctl", "--quiet", "list_connections", "pid", "vhost", "client_properties"]
    )
    assert code == 0, output
    name = CLIENT_PROPERTIES["connection_name"]
    found = []
    for line in output.decode().splitlines():
        pid, _, rest = line.partition("\t")
        on, _, properties = rest.partition("\t")
        if name in properties and pid.startswith("<") and vhost in (None, unquote(on)):
            found.append(pid)
    return found


def close_caller_connections(rabbitmq: RabbitMqContainer) -> None:
    pids = caller_connections(rabbitmq)
    assert pids, "no connection of the shortcut's"
    for pid in pids:
        code, output = rabbitmq.exec(["rabbitmqctl", "close_connection", pid, "test closes it"])
        assert code == 0, output


def test_a_broker_gone_silent_fails_a_request_in_the_publishers_time_and_close_does_not_hang(
    rabbitmq: RabbitMqContainer,
) -> None:
    """Both connections go through a proxy that stops passing the broker's frames: the
    request written on the shortcut is not confirmed within the publisher's wait (connect
    timeout + grace: 2 + 5 s) and the caller is told so, as through the I/O thread; it is
    not published a second time with less time to wait. Closing drops what does not
    answer."""
    url = urlsplit(new_vhost(rabbitmq))
    assert url.hostname is not None and url.port is not None
    proxy = TcpProxy((url.hostname, url.port))
    try:
        proxied = urlunsplit(url._replace(netloc=f"guest:guest@{proxy.address}"))
        broker = PublisherBroker(proxied, connect_timeout=2, on_reply=lambda _c, _b: None)
        try:
            open_the_shortcut(broker)
            proxy.go_silent_after(0)
            body = PullRequest.new(parse_reference(IMAGE)).encode()
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="may or may not have been published"):
                broker.publish_request(body, uuid.uuid4().hex)
            took = time.monotonic() - started
            # 7 s is the publisher's whole wait. Before: the caller's thread waited for
            # pika's heartbeat check (minutes); then it gave up after 2 s and published
            # again through the I/O thread with only 5 s left.
            assert 6.5 < took < 10, f"took {took:.1f}s"
        finally:
            started = time.monotonic()
            broker.close()
            closing = time.monotonic() - started
        assert closing < 8, f"closing took {closing:.1f}s"
    finally:
        proxy.close()


def test_the_shortcut_is_not_opened_for_a_publisher_that_asks_once(
    vhost_url: str, rabbitmq: RabbitMqContainer
) -> None:
    """A CLI command (roster read, then one request) should not open a connection it will
    never use."""
    broker = PublisherBroker(vhost_url, connect_timeout=5, on_reply=lambda _c, _b: None)
    vhost = urlsplit(vhost_url).path.lstrip("/")
    try:
        assert broker.wait_connected(10), broker.last_error
        with contextlib.suppress(NoNodes):
            broker.publish_request(PullRequest.new(parse_reference(IMAGE)).encode(), "once")
        time.sleep(1.0)  # time enough to have opened it, were it opened for one request
        assert not broker.shortcut_open
        assert caller_connections(rabbitmq, vhost) == []
        open_the_shortcut(broker)
        assert len(caller_connections(rabbitmq, vhost)) == 1
    finally:
        broker.close()
