"""What a stolen worker or publisher credential can pile up, on a real RabbitMQ set up by
``broker-setup`` (users and bounds), with pika directly as the attacker and a real worker.

No permission can say "exclusive only": a worker's user may declare its node's queue durable
and shared, which took the node's requests for good (the worker refused with 405, requests
piling up without end, publishers told a node had them). Now the worker takes its queue back,
an operator policy bounds what such a queue holds and how long it outlives its last use, and
the vhost's limits bound how many queues and connections there are.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import NoNodes
from contract import topology as topo
from contract.connection import RESOURCE_LOCKED
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.engines import NodeEngine
from publisher import Publisher
from publisher.broker_setup import Bounds
from tests.integration.conftest import PRESENCE_INTERVAL
from tests.integration.test_broker_users import Broker, opened_connections, set_up_vhost

BOUNDS = Bounds(queue_expires=2.0, queue_max_length=20, max_queues=40, max_connections=30)
SQUAT = {"x-max-length": 1_000_000, "x-expires": 86_400_000}
"""What a squatter asks for: a day, a million messages. The operator policy's lower values win."""


@pytest.fixture(scope="module")
def bounded(rabbitmq: RabbitMqContainer, management: str) -> Broker:
    return set_up_vhost(rabbitmq, management, "bounded", BOUNDS)


@pytest.fixture
def connections(bounded: Broker) -> Iterator[Callable[[str], pika.BlockingConnection]]:
    yield from opened_connections(bounded)


def squat(connection: pika.BlockingConnection, queue: str, hold: bool = False) -> None:
    """Declares ``queue`` durable and shared, bound for pull requests; then leaves, or with
    ``hold`` stays on it as a consumer (taking one request at a time): a queue in use does
    not expire."""
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments=SQUAT)
    channel.queue_bind(queue, topo.PULLS.name)
    if hold:
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(queue, lambda *_: None)
    else:
        connection.close()


def depth(bounded: Broker, queue: str) -> int:
    with bounded.connect("admin") as connection:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count


def test_a_squat_on_an_absent_node_queue_expires_and_publishers_see_no_nodes_again(
    bounded: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    """The any-node worker user can declare any node's queue: one for a node that does not
    run makes publishers believe a node got their requests, until the queue expires."""
    squat(connections("workers"), topo.node_queue_name(f"ghost-{uuid.uuid4().hex[:6]}"))
    with Publisher(bounded.url("sessions"), connect_timeout=5) as publisher:
        publisher.request("busybox:1")  # reached "a node": no NoNodes
        squatted = time.monotonic()
        while True:
            try:
                publisher.request("busybox:1")
            except NoNodes:
                print(f"the squat fooled publishers for {time.monotonic() - squatted:.2f}s")
                break
            assert time.monotonic() - squatted < BOUNDS.queue_expires + 10, "the squat stayed"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def node_1(bounded: Broker) -> Iterator[tuple[LocalCluster, WorkerProcess]]:
    """node-1's engine and its worker (as the node's own user), not started."""
    root = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    cluster = LocalCluster(root=root, amqp_url=bounded.url("worker-1"), nodes=0)
    try:
        cluster.registry.start()
        engine = NodeEngine("node-1", root / "node-1")
        cluster.engines.append(engine)
        engine.start()
        worker = WorkerProcess(
            node="node-1",
            docker_host=engine.docker_host,
            amqp_url=bounded.url("worker-1"),
            log_path=root / "node-1" / "worker.log",
            extra_env={"PULLER_PRESENCE_INTERVAL": str(PRESENCE_INTERVAL)},
        )
        cluster.workers.append(worker)
        yield cluster, worker
    finally:
        cluster.remove()


@pytest.mark.parametrize(
    "phases",
    [
        pytest.param(("before its worker starts",), id="before"),
        pytest.param(  # once more after the worker served and stopped: a 10 s long run
            ("before its worker starts", "while its worker is away"),
            id="before-and-while-away",
            marks=pytest.mark.long,
        ),
    ],
)
def test_a_squatted_node_queue_holds_at_most_the_bound_and_its_worker_takes_it_back(
    bounded: Broker,
    connections: Callable[[str], pika.BlockingConnection],
    node_1: tuple[LocalCluster, WorkerProcess],
    phases: tuple[str, ...],
) -> None:
    """Squatted before the worker ever started, then (long run) again while it was away."""
    cluster, worker = node_1
    queue = topo.node_queue_name("node-1")
    image = cluster.registry.push_files(f"squat/{uuid.uuid4().hex[:8]}", "1", {"f": b"x"})
    with Publisher(bounded.url("sessions")) as publisher:
        for when in phases:
            squat(connections("worker-1"), queue, hold=True)  # the node's own user, staying
            for _ in range(2 * BOUNDS.queue_max_length):
                publisher.request(image)  # "reached a node", and piled up in the squat
            assert depth(bounded, queue) == BOUNDS.queue_max_length

            launched = time.monotonic()
            worker.launch()
            try:
                worker.wait_serving(timeout=30)
                took = time.monotonic() - launched
                print(f"squat {when}: the worker served after {took:.2f}s")
                # Its own now: exclusive to the worker's connection; the squatter cannot take it.
                for user in ("admin", "worker-1"):
                    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as locked:
                        connections(user).channel().queue_declare(queue, passive=True)
                    assert locked.value.reply_code == RESOURCE_LOCKED
                with pytest.raises(pika.exceptions.ChannelClosedByBroker) as locked:
                    squat(connections("worker-1"), queue)
                assert locked.value.reply_code == RESOURCE_LOCKED
                assert publisher.pull(image, expect=1, timeout=60).ok
                assert "shared instead of exclusive" in worker.log_path.read_text()
            finally:
                worker.stop()


def test_a_publisher_user_makes_no_more_queues_than_the_vhost_allows_and_they_expire(
    bounded: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    channel = connections("sessions").channel()
    made = 0
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        for _ in range(BOUNDS.max_queues + 1):
            channel.queue_declare(f"{topo.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}", durable=True)
            made += 1
    assert 0 < made < BOUNDS.max_queues, made  # the two streams count too
    assert "queue limit" in refused.value.reply_text
    deadline = time.monotonic() + BOUNDS.queue_expires + 10
    while True:  # nobody consumes them: they go by themselves
        channel = connections("sessions").channel()
        try:
            channel.queue_declare(f"{topo.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}", durable=True)
        except pika.exceptions.ChannelClosedByBroker:
            assert time.monotonic() < deadline, "the unused reply queues did not expire"
            time.sleep(0.2)
        else:
            break


def test_a_user_opens_no_more_connections_than_the_vhost_allows(
    bounded: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    opened = 0
    with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
        for _ in range(BOUNDS.max_connections + 1):
            connections("sessions")
            opened += 1
    assert opened <= BOUNDS.max_connections
    assert "limit" in str(refused.value), refused.value


def test_the_vhost_has_the_bounds_whatever_a_queue_asks(
    bounded: Broker, connections: Callable[[str], pika.BlockingConnection]
) -> None:
    """The same bounds for a reply queue a publisher declares with arguments of its own."""
    name = f"{topo.REPLY_QUEUE_PREFIX}{uuid.uuid4().hex}"
    publisher = connections("sessions")
    channel = publisher.channel()
    channel.queue_declare(name, durable=True, arguments=SQUAT)
    channel.queue_bind(name, topo.REPLIES.name, name)
    worker = connections("worker-1").channel()
    worker.confirm_delivery()
    for _ in range(2 * BOUNDS.queue_max_length):
        worker.basic_publish(topo.REPLIES.name, name, b"an answer nobody reads")
    assert depth(bounded, name) == BOUNDS.queue_max_length
