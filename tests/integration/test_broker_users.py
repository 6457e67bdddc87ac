"""``puller broker-setup``'s users on a real RabbitMQ: each role can do its job and no more.

pika directly, as each user: what a role needs succeeds, what it must not do is closed with
ACCESS_REFUSED (403). Publishes use publisher confirms, so a refused publish raises at once
instead of closing the channel some time later.
"""

from __future__ import annotations

import gc
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import BrokerUnavailable
from contract import topology as topo
from contract.connection import ACCESS_REFUSED
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.engines import NodeEngine
from publisher import Publisher, cli
from publisher.broker_setup import (
    Bounds,
    BrokerSetupError,
    BrokerUser,
    Role,
    bound_vhost,
    declare_topology,
    permissions,
    setup,
)
from tests.integration.conftest import GUEST, api_get, start_cluster


@dataclass(frozen=True)
class Broker:
    management: str
    vhost: str
    host: str
    port: int
    users: dict[str, BrokerUser]

    def url(self, name: str) -> str:
        user = self.users[name]
        return (
            f"amqp://{quote(user.name, safe='')}:{quote(user.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.vhost, safe='')}"
        )

    def connect(self, name: str) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url(name)))


def users_for_test() -> dict[str, BrokerUser]:
    """By the names the tests use; RabbitMQ's users are the whole broker's, not a vhost's, so
    their real names are this module's own."""
    suffix = uuid.uuid4().hex[:6]

    def user(role: Role, name: str, node: str | None = None) -> tuple[str, BrokerUser]:
        return name, BrokerUser(role, f"{name}-{suffix}", uuid.uuid4().hex, node)

    return dict(
        [
            user(Role.ADMIN, "admin"),
            user(Role.PUBLISHER, "sessions"),
            user(Role.WORKER, "worker-1", "node-1"),
            user(Role.WORKER, "worker-2", "node-2"),
            user(Role.WORKER, "workers"),
        ]
    )


def set_up_vhost(
    rabbitmq: RabbitMqContainer, management: str, prefix: str, bounds: Bounds | None = None
) -> Broker:
    """A fresh vhost set up by :func:`setup` (and bounded by ``bounds``, if given), the
    topology declared by its admin user."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    users = users_for_test()
    setup(management, vhost, list(users.values()), credentials=GUEST)
    if bounds is not None:
        bound_vhost(management, vhost, bounds, credentials=GUEST)
    broker = Broker(
        management,
        vhost,
        rabbitmq.get_container_host_ip(),
        int(rabbitmq.get_exposed_port(5672)),
        users,
    )
    declare_topology(broker.url("admin"))
    return broker


def opened_connections(broker: Broker) -> Iterator[Callable[[str], pika.BlockingConnection]]:
    """Opens connections as a user, and closes them all after the test (exclusive queues go
    with them)."""
    opened: list[pika.BlockingConnection] = []

    def connect(name: str) -> pika.BlockingConnection:
        connection = broker.connect(name)
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        if connection.is_open:
            connection.close()


@pytest.fixture(scope="module")
def broker(rabbitmq: RabbitMqContainer, management: str) -> Broker:
    return set_up_vhost(rabbitmq, management, "users")


@pytest.fixture
def connections(broker: Broker) -> Iterator[Callable[[str], pika.BlockingConnection]]:
    yield from opened_connections(broker)


def refused(action: Callable[[], object]) -> str:
    """Runs ``action``, which must be refused; the broker's words."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        action()
    assert raised.value.reply_code == ACCESS_REFUSED, raised.value.reply_text
    return str(raised.value.reply_text)


def publish(connection: pika.BlockingConnection, exchange: str, body: bytes, **kw: Any) -> None:
    """A confirmed publish: returns once the broker took it, raises if it refused."""
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(exchange, kw.pop("routing_key", ""), body, pika.BasicProperties(**kw))
    channel.close()


def own_node_queue(connection: pika.BlockingConnection, node: str) -> BlockingChannel:
    channel = connection.channel()
    queue, binding = topo.node_queue(node)
    channel.queue_declare(queue.name, exclusive=queue.exclusive, auto_delete=queue.auto_delete)
    channel.queue_bind(binding.queue, binding.exchange)
    return channel


def get_one(
    connection: pika.BlockingConnection, channel: BlockingChannel, queue: str, timeout: float = 10
) -> tuple[pika.BasicProperties, bytes]:
    """The next message in ``queue``: its properties and body."""
    deadline = time.monotonic() + timeout
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return properties, body
        assert time.monotonic() < deadline, f"nothing arrived in {queue}"
        connection.process_data_events(time_limit=0.05)


def read_stream_until(
    connection: pika.BlockingConnection, stream: str, wanted: bytes, timeout: float = 10
) -> None:
    """Consumes ``stream`` from its start until ``wanted`` arrives."""
    channel = connection.channel()
    channel.basic_qos(prefetch_count=100)  # a stream consumer must set a prefetch
    seen: list[bytes] = []

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        seen.append(body)
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(stream, on_message, arguments={"x-stream-offset": "first"})
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, f"{wanted!r} did not come out of {stream}"
        connection.process_data_events(time_limit=0.1)
    channel.close()


# -- setup and the admin -----------------------------------------------------------------------


def test_setup_puts_exactly_the_role_permissions_and_running_it_again_is_harmless(
    broker: Broker,
) -> None:
    users = list(broker.users.values())
    setup(broker.management, broker.vhost, users, credentials=GUEST)  # the second time
    vhost = quote(broker.vhost, safe="")
    for user in users:
        found = api_get(broker.management, f"permissions/{vhost}/{quote(user.name, safe='')}")
        expected = permissions(user.role, user.node)
        assert (found["configure"], found["write"], found["read"]) == expected
        assert not api_get(broker.management, f"users/{quote(user.name, safe='')}")["tags"]
    with broker.connect("sessions"):  # the password set the second time is still the same
        pass


def test_the_admin_declares_the_shared_topology_again_and_nothing_else(
    broker: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    declare_topology(broker.url("admin"))  # the fixture did it once; again is harmless
    vhost = quote(broker.vhost, safe="")
    for item in topo.shared_declarations():
        if isinstance(item, topo.Exchange):
            assert api_get(broker.management, f"exchanges/{vhost}/{item.name}")["type"] == item.kind
        elif isinstance(item, topo.Queue):
            found = api_get(broker.management, f"queues/{vhost}/{item.name}")
            assert found["arguments"].get("x-queue-type") == item.arguments.get("x-queue-type")
        else:
            bindings = api_get(
                broker.management, f"bindings/{vhost}/e/{item.exchange}/q/{item.queue}"
            )
            assert len(bindings) == 1
    admin = connections("admin")
    refused(lambda: admin.channel().queue_declare("not-puller"))
    refused(lambda: admin.channel().exchange_declare("amq.puller", "fanout"))


def test_a_refused_management_login_is_one_line_without_the_password(broker: Broker) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    with pytest.raises(BrokerSetupError) as raised:
        setup(broker.management, broker.vhost, [], credentials=("guest", wrong))
    message = str(raised.value)
    assert "401" in message
    assert "guest" in message
    assert wrong not in message
    assert "\n" not in message


# -- the worker --------------------------------------------------------------------------------


def test_a_worker_uses_its_own_queue_answers_announces_and_reads_the_history(
    broker: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    worker = connections("worker-1")
    own_node_queue(worker, "node-1")
    publish(worker, topo.REPLIES.name, b"an answer", routing_key="puller.reply.nobody")
    publish(worker, topo.PRESENCE.name, b"a presence announcement")
    marker = f"marker {uuid.uuid4().hex}".encode()
    publish(worker, topo.HISTORY.name, marker)  # a history marker, through the exchange
    read_stream_until(worker, topo.HISTORY_STREAM_NAME, marker)


def test_a_worker_keeps_and_reads_the_desired_state_and_takes_the_keepers_token(
    broker: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    worker = connections("worker-1")
    snapshot = f"a snapshot {uuid.uuid4().hex}".encode()
    publish(worker, topo.DESIRED.name, snapshot, user_id=broker.users["worker-1"].name)
    read_stream_until(worker, topo.DESIRED_STREAM.name, snapshot)
    publish(worker, topo.KEEPER.name, b"a token")
    channel = worker.channel()
    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(topo.KEEPER_TOKEN.name, lambda *_: None)
    refused(lambda: worker.channel().queue_bind(topo.DESIRED_STREAM.name, topo.PULLS.name))


def test_a_worker_for_any_node_takes_any_node_queue_but_no_reply_queue(
    connections: Callable[[str], pika.BlockingConnection],
) -> None:
    worker = connections("workers")
    own_node_queue(worker, f"node-{uuid.uuid4().hex[:6]}")
    refused(lambda: worker.channel().queue_declare(f"{topo.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"))


def test_a_worker_may_not_publish_pull_requests(
    connections: Callable[[str], pika.BlockingConnection],
) -> None:
    worker = connections("worker-1")
    refused(lambda: publish(worker, topo.PULLS.name, b"{}"))


def test_a_worker_may_not_publish_to_the_default_exchange(
    connections: Callable[[str], pika.BlockingConnection],
) -> None:
    """The default exchange ("", ``amq.default`` to permissions) reaches every queue by its
    name; a marker goes into the history stream through the ``puller.history`` exchange."""
    worker = connections("worker-1")
    text = refused(lambda: publish(worker, "", b"m", routing_key=topo.HISTORY_STREAM_NAME))
    assert "amq.default" in text


def test_a_worker_may_not_take_another_node_queue(
    connections: Callable[[str], pika.BlockingConnection],
) -> None:
    other = connections("worker-2")
    own_node_queue(other, "node-2")
    worker = connections("worker-1")
    queue = topo.node_queue_name("node-2")
    refused(lambda: worker.channel().basic_consume(queue, lambda *_: None))
    refused(lambda: worker.channel().queue_declare(queue, exclusive=True, auto_delete=True))
    refused(lambda: worker.channel().queue_delete(queue))
    other.close()  # node-2's queue is gone: declaring it is refused all the same
    refused(lambda: worker.channel().queue_declare(queue, exclusive=True, auto_delete=True))


# -- the publisher -----------------------------------------------------------------------------


def test_a_publisher_requests_gets_answers_and_reads_the_presence_stream(
    connections: Callable[[str], pika.BlockingConnection],
) -> None:
    publisher = connections("sessions")
    reply_queue, reply_binding = topo.reply_queue(f"{topo.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}")
    replies = publisher.channel()
    replies.queue_declare(reply_queue.name, exclusive=True, auto_delete=True)
    replies.queue_bind(reply_binding.queue, reply_binding.exchange, reply_binding.routing_key)
    worker = connections("worker-1")
    requests = own_node_queue(worker, "node-1")

    request_id = uuid.uuid4().hex
    publish(
        publisher,
        topo.PULLS.name,
        b"a request",
        reply_to=reply_queue.name,
        correlation_id=request_id,
    )
    publish(publisher, topo.HISTORY.name, b"the request's copy", correlation_id=request_id)
    request, _ = get_one(worker, requests, topo.node_queue_name("node-1"))
    publish(
        worker,
        topo.REPLIES.name,
        b"the answer",
        routing_key=request.reply_to,
        correlation_id=request.correlation_id,
    )
    answer, body = get_one(publisher, replies, reply_queue.name)
    assert (body, answer.correlation_id) == (b"the answer", request_id)

    marker = f"roster marker {uuid.uuid4().hex}".encode()
    publish(publisher, topo.PRESENCE.name, marker)  # how the roster knows it has read enough
    read_stream_until(publisher, topo.PRESENCE_STREAM.name, marker)


def test_a_publisher_may_not_read_a_node_queue_nor_answer(
    connections: Callable[[str], pika.BlockingConnection],
) -> None:
    worker = connections("worker-1")
    own_node_queue(worker, "node-1")
    publisher = connections("sessions")
    queue = topo.node_queue_name("node-1")
    refused(lambda: publisher.channel().basic_consume(queue, lambda *_: None))
    refused(lambda: publisher.channel().basic_get(queue))
    refused(lambda: publish(publisher, topo.REPLIES.name, b"a forged answer", routing_key="x"))
    refused(lambda: publisher.channel().queue_declare(f"{topo.NODE_QUEUE_PREFIX}fake"))
    refused(lambda: publisher.channel().queue_declare("", exclusive=True))  # amq.gen-…
    refused(lambda: publisher.channel().basic_consume(topo.HISTORY_STREAM_NAME, lambda *_: None))


# -- the shared topology belongs to the admin --------------------------------------------------


@pytest.mark.parametrize("user", ["worker-1", "workers", "sessions"])
@pytest.mark.parametrize(
    "item",
    [item for item in topo.shared_declarations() if not isinstance(item, topo.Binding)],
    ids=lambda item: f"{type(item).__name__.lower()}-{item.name}",
)
def test_workers_and_publishers_may_not_declare_the_shared_topology(
    connections: Callable[[str], pika.BlockingConnection], user: str, item: topo.Declaration
) -> None:
    connection = connections(user)
    if isinstance(item, topo.Exchange):
        refused(
            lambda: connection.channel().exchange_declare(
                item.name, exchange_type=item.kind, durable=item.durable
            )
        )
        refused(lambda: connection.channel().exchange_delete(item.name))
    else:
        assert isinstance(item, topo.Queue)
        refused(
            lambda: connection.channel().queue_declare(
                item.name, durable=item.durable, arguments=dict(item.arguments)
            )
        )
        refused(lambda: connection.channel().queue_delete(item.name))
    # what it may do instead: declare it passively, which takes no permission
    channel = connection.channel()
    if isinstance(item, topo.Exchange):
        channel.exchange_declare(item.name, passive=True)
    else:
        channel.queue_declare(item.name, passive=True)


# -- the command ------------------------------------------------------------------------------


def test_the_command_makes_the_users_keeps_their_passwords_and_declares_the_topology(
    rabbitmq: RabbitMqContainer,
    management: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    suffix = uuid.uuid4().hex[:8]
    vhost = f"cli-{suffix}"
    ops, sessions, worker = f"ops-{suffix}", f"sessions-{suffix}", f"node-a-{suffix}"
    guest_password = tmp_path / "guest-password"
    guest_password.write_text("guest\n")
    passwords = tmp_path / "passwords"
    host, port = rabbitmq.get_container_host_ip(), rabbitmq.get_exposed_port(5672)
    argv = [
        "broker-setup",
        f"--management-url={management}",
        "--management-user=guest",
        f"--management-password-file={guest_password}",
        f"--vhost={vhost}",
        f"--passwords-dir={passwords}",
        f"--admin={ops}",
        f"--publisher={sessions}",
        f"--worker={worker}:a",
        f"--declare-topology=amqp://{host}:{port}",
    ]
    assert cli.main(argv) == cli.EXIT_OK
    first = capsys.readouterr()
    written = {path.name: path.read_text().strip() for path in passwords.iterdir()}
    assert sorted(written) == sorted([ops, sessions, worker])
    for path in passwords.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600
    assert cli.main(argv) == cli.EXIT_OK  # again: same passwords, same permissions
    second = capsys.readouterr()
    assert {path.name: path.read_text().strip() for path in passwords.iterdir()} == written
    for text in (first.out, first.err, second.out, second.err):
        assert not any(password in text for password in written.values())
    assert "topology declared" in second.out

    worker_url = f"amqp://{worker}:{quote(written[worker], safe='')}@{host}:{port}/{vhost}"
    with pika.BlockingConnection(pika.URLParameters(worker_url)) as connection:
        own_node_queue(connection, "a")  # the topology is there, and the user may use its queue
        refused(lambda: own_node_queue(connection, "b"))


# -- the whole pull ----------------------------------------------------------------------------


def test_a_pull_works_with_least_privilege_users(broker: Broker) -> None:
    """Workers and the publisher with only their role's permissions, on a topology the admin
    declared: the roster lists the nodes, a pull reaches every node and every node answers."""
    cluster = start_cluster(broker.url("workers"), nodes=2)
    try:
        image = cluster.registry.push_files(
            f"test/{uuid.uuid4().hex[:10]}", "1", {"payload.txt": uuid.uuid4().bytes}
        )
        with Publisher(broker.url("sessions")) as publisher:
            deadline = time.monotonic() + 30
            while {info.node for info in publisher.nodes()} != {"node-1", "node-2"}:
                assert time.monotonic() < deadline, "the workers did not announce themselves"
                time.sleep(0.2)
            report = publisher.pull(image, timeout=60)  # every node in the roster
        assert report.ok, report
        assert sorted(result.node for result in report.nodes) == ["node-1", "node-2"]
    finally:
        cluster.remove()


def test_without_the_topology_users_say_what_is_missing_until_the_admin_declares_it(
    rabbitmq: RabbitMqContainer, management: str
) -> None:
    """Restricted users cannot declare the shared topology: they wait for it, saying why,
    and go on by themselves once the admin has declared it."""
    users = users_for_test()
    broker = Broker(
        management,
        f"bare-{uuid.uuid4().hex[:8]}",
        rabbitmq.get_container_host_ip(),
        int(rabbitmq.get_exposed_port(5672)),
        users,
    )
    setup(management, broker.vhost, list(users.values()), credentials=GUEST)
    root = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    cluster = LocalCluster(root=root, amqp_url=broker.url("workers"), nodes=1)
    try:
        cluster.registry.start()
        engine = NodeEngine("node-1", root / "node-1")
        cluster.engines.append(engine)
        engine.start()
        worker = WorkerProcess(
            node="node-1",
            docker_host=engine.docker_host,
            amqp_url=broker.url("workers"),
            log_path=root / "node-1" / "worker.log",
        )
        cluster.workers.append(worker)
        worker.launch()
        deadline = time.monotonic() + 30
        while "broker-setup" not in str(_ready_reason(worker)):
            assert time.monotonic() < deadline, _ready_reason(worker)
            time.sleep(0.2)
        with (
            Publisher(broker.url("sessions"), connect_timeout=3) as publisher,
            pytest.raises(BrokerUnavailable, match="broker-setup"),
        ):
            publisher.request("busybox")
        # Closing the publisher closed every connection it gave up on (one was still closing
        # when this was a ResourceWarning for an open socket, seen in CI): collect now, so a
        # leak shows in this test.
        gc.collect()
        declare_topology(broker.url("admin"))
        worker.wait_serving(timeout=60)
        image = cluster.registry.push_files("late/x", "1", {"f": b"x"})
        with Publisher(broker.url("sessions")) as publisher:
            assert publisher.pull(image, expect=1, timeout=60).ok
    finally:
        cluster.remove()


def _ready_reason(worker: WorkerProcess) -> object:
    try:
        return worker.health("/ready")[1].get("reason")
    except OSError as error:
        return error
