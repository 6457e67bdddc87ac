"""The three-node RabbitMQ cluster the tests and the demo run on
(:mod:`localcluster.broker_cluster`), checked with pika directly: every node serves, a stream is
replicated on all of them, and it outlives the node that holds its leader."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from localcluster.broker_cluster import BrokerCluster
from localcluster.processes import wait_until

pytestmark = pytest.mark.integration

STREAM_ARGUMENTS = {"x-queue-type": "stream", "x-initial-cluster-size": 3}
PERSISTENT = pika.BasicProperties(delivery_mode=2)


@contextlib.contextmanager
def connected(url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def fresh_vhost(cluster: BrokerCluster) -> str:
    vhost = f"bc-{uuid.uuid4().hex[:8]}"
    cluster.add_vhost(vhost)
    return vhost


def declare_stream(cluster: BrokerCluster, vhost: str, through: int = 1) -> str:
    stream = f"stream-{uuid.uuid4().hex[:8]}"
    with connected(cluster.node_url(through, vhost)) as channel:
        channel.queue_declare(stream, durable=True, arguments=STREAM_ARGUMENTS)
    return stream


def publish_confirmed(url: str, queue: str, body: bytes, timeout: float = 10.0) -> bool:
    """Publishes ``body`` to ``queue`` through ``url`` with publisher confirms: whether the
    broker confirmed it within ``timeout``. pika's blocking publish waits for a confirm with no
    end, so the publish runs on a thread of its own, and is cut off (its connection closed) if
    no confirm comes in time."""
    confirmed = threading.Event()
    opened: list[pika.BlockingConnection] = []

    def publish() -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
            opened.append(connection)
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, body, PERSISTENT, mandatory=True)
            confirmed.set()
            connection.close()
        except pika.exceptions.AMQPError:
            return  # refused, unroutable, or cut off: not confirmed

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() and opened:
        with contextlib.suppress(pika.exceptions.AMQPError):  # it may have closed meanwhile
            opened[0].add_callback_threadsafe(opened[0].close)
    thread.join(30)
    return confirmed.is_set()


def read_stream(url: str, stream: str, count: int, timeout: float = 60.0) -> list[bytes]:
    """The first ``count`` messages of ``stream``, read from its start through ``url`` (fewer
    if no more come within ``timeout``)."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    with connected(url) as channel:
        channel.basic_qos(prefetch_count=100)  # a stream consumer needs one
        for method, _, body in channel.consume(
            stream, arguments={"x-stream-offset": "first"}, inactivity_timeout=1
        ):
            if method is not None:
                bodies.append(body)
                channel.basic_ack(method.delivery_tag)
            if len(bodies) >= count or time.monotonic() > deadline:
                break
        channel.cancel()
    return bodies


def wait_replicated(cluster: BrokerCluster, stream: str, vhost: str) -> None:
    everyone = {node.index for node in cluster.nodes}
    wait_until(
        lambda: cluster.stream_members(stream, vhost, online=True) == everyone,
        f"a replica of {stream} up on every node",
        120,
    )


def test_every_node_accepts_connections_and_sees_the_others(
    broker_cluster: BrokerCluster,
) -> None:
    assert len(broker_cluster.urls()) == 3
    assert len({node.amqp_port for node in broker_cluster.nodes}) == 3
    for url in broker_cluster.urls():
        with connected(url) as channel:
            assert channel.is_open
    for node in broker_cluster.nodes:
        assert broker_cluster.running_nodes(node.index) == {1, 2, 3}
        assert node.name.startswith(f"puller-{broker_cluster.token}-")


def test_a_stream_has_a_replica_on_every_node_and_reads_through_any(
    broker_cluster: BrokerCluster,
) -> None:
    vhost = fresh_vhost(broker_cluster)
    stream = declare_stream(broker_cluster, vhost, through=1)
    assert broker_cluster.stream_members(stream, vhost) == {1, 2, 3}
    wait_replicated(broker_cluster, stream, vhost)
    body = uuid.uuid4().bytes

    assert publish_confirmed(broker_cluster.node_url(1, vhost), stream, body)

    assert read_stream(broker_cluster.node_url(3, vhost), stream, 1) == [body]


@pytest.mark.parametrize(
    "kill",
    [  # the clean stop (9 s) is a long run: the SIGKILL case is the harder one
        pytest.param(False, id="rabbitmqctl-stop", marks=pytest.mark.long),
        pytest.param(True, id="sigkill"),
    ],
)
def test_a_stream_outlives_the_node_of_its_leader(
    broker_cluster: BrokerCluster, kill: bool
) -> None:
    vhost = fresh_vhost(broker_cluster)
    stream = declare_stream(broker_cluster, vhost)
    wait_replicated(broker_cluster, stream, vhost)
    before = [f"before-{i}".encode() for i in range(10)]
    for body in before:
        assert publish_confirmed(broker_cluster.node_url(1, vhost), stream, body)
    leader = broker_cluster.stream_leader(stream, vhost)
    survivors = [node.index for node in broker_cluster.nodes if node.index != leader]
    try:
        began = time.monotonic()
        broker_cluster.stop_node(leader, kill=kill)
        stopped = time.monotonic()
        assert not broker_cluster.node(leader).alive

        # Publishes through another node are confirmed once the stream has a new leader.
        after = b"after-the-leader-stopped"
        deadline = stopped + 120
        while not publish_confirmed(broker_cluster.node_url(survivors[0], vhost), stream, after):
            assert time.monotonic() < deadline, "no publish was confirmed after the leader left"
        confirmed = time.monotonic()
        wait_until(
            lambda: broker_cluster.stream_leader(stream, vhost) in survivors,
            "a new leader",
            60,
        )
        new_leader = broker_cluster.stream_leader(stream, vhost)

        # Everything confirmed, before and after, reads through the other survivor. (A
        # publish the broker did not confirm in time may still have been stored: the last
        # message may come more than once.)
        read = read_stream(broker_cluster.node_url(survivors[1], vhost), stream, len(before) + 1)
        assert read[: len(before)] == before
        assert read[len(before) :] == [after]

        restarting = time.monotonic()
        broker_cluster.start_node(leader)
        restarted = time.monotonic()
        for index in (1, 2, 3):
            assert broker_cluster.running_nodes(index) == {1, 2, 3}
        wait_replicated(broker_cluster, stream, vhost)
        # The node that came back caught up with what was written while it was away.
        assert read_stream(broker_cluster.node_url(leader, vhost), stream, len(before) + 1) == [
            *before,
            after,
        ]
        print(
            f"\nstop={'SIGKILL' if kill else 'rabbitmqctl stop'}: node {leader} stopped in"
            f" {stopped - began:.2f} s; first confirmed publish through node {survivors[0]}"
            f" {confirmed - stopped:.2f} s after (new leader: node {new_leader});"
            f" start_node took {restarted - restarting:.1f} s; cluster start took"
            f" {broker_cluster.timings.get('start', 0.0):.1f} s"
        )
    finally:
        if not broker_cluster.node(leader).alive:
            broker_cluster.start_node(leader)


def test_stop_leaves_no_process_and_no_file() -> None:
    root = Path(tempfile.mkdtemp(prefix="pt-brokers-", dir="/tmp"))
    cluster = BrokerCluster(root, size=1)
    try:
        cluster.start()
        pids = set(cluster.processes())
        server = cluster.node(1).process
        assert server is not None
        assert server.pid in pids
        assert pids <= ps_pids()
    finally:
        cluster.stop()

    assert not cluster.processes()
    assert not pids & ps_pids()
    assert not root.exists()
    cluster.stop()  # again: nothing to do


def ps_pids() -> set[int]:
    """The processes ``ps`` lists, but zombies: an exited process the machine's init has not
    reaped yet (here it reaps orphans some seconds late) holds nothing but its id."""
    listing = subprocess.run(
        ["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True, timeout=30
    )
    return {
        int(pid)
        for pid, state in (line.split() for line in listing.stdout.splitlines())
        if not state.startswith("Z")
    }
