"""Where the history ends, read over the stream protocol (``WorkerBroker.read_tail``) on real
RabbitMQ 3.10 brokers with the plugin: exact after single entries and bursts, ``None`` on an
empty stream, through TLS with the host name checked, and on a 3-node cluster from the
stream's leader when the worker is connected to a replica's node. The true end each time is
the last offset an AMQP reader of the whole stream is given."""

from __future__ import annotations

import uuid

import pika
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import BrokerUnavailable
from contract import topology as topo
from contract.connection import BrokerTls
from contract.stream_tail import Endpoint, Login, StreamUnavailable, read_tail
from localcluster.broker_cluster import BrokerCluster
from tests.integration.conftest import TlsRabbitMq, new_vhost, stream_port
from worker.broker import WorkerBroker

pytestmark = pytest.mark.integration


def a_stream(cluster_size: int | None = None) -> topo.Queue:
    """A stream of its own, so that tests sharing a broker and vhost stay apart."""
    arguments: dict[str, object] = {"x-queue-type": "stream"}
    if cluster_size is not None:
        arguments["x-initial-cluster-size"] = cluster_size
    return topo.Queue(f"tail-{uuid.uuid4().hex[:8]}", durable=True, arguments=arguments)


def connect(url: str, tls: BrokerTls | None = None) -> pika.BlockingConnection:
    parameters = pika.URLParameters(url)
    if tls is not None:
        parameters.ssl_options = pika.SSLOptions(tls.context(), server_hostname=parameters.host)
    return pika.BlockingConnection(parameters)


def declare(url: str, stream: topo.Queue, tls: BrokerTls | None = None) -> None:
    connection = connect(url, tls)
    connection.channel().queue_declare(stream.name, durable=True, arguments=dict(stream.arguments))
    connection.close()


def publish(url: str, stream: topo.Queue, count: int, tls: BrokerTls | None = None) -> None:
    """``count`` entries in one go (unconfirmed: RabbitMQ batches them into chunks)."""
    connection = connect(url, tls)
    channel = connection.channel()
    for number in range(count):
        channel.basic_publish("", stream.name, f"entry {number}".encode())
    connection.close()


def true_end(url: str, stream: topo.Queue, count: int, tls: BrokerTls | None = None) -> int:
    """The offset of the last of the stream's ``count`` entries, read over AMQP from the
    first (a reader is given only committed entries: they are all in once this returns)."""
    connection = connect(url, tls)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=count)  # all of them, and nothing left to reject
    offsets: list[int] = []
    for method, properties, _body in channel.consume(
        stream.name, arguments={"x-stream-offset": "first"}, inactivity_timeout=20
    ):
        assert method is not None, f"only {len(offsets)} of {count} entries came"
        channel.basic_ack(method.delivery_tag)
        offsets.append(properties.headers["x-stream-offset"])
        if len(offsets) == count:
            break
    connection.close()
    return int(offsets[-1])


def test_the_tail_is_the_streams_end_after_single_entries_and_bursts(
    rabbitmq: RabbitMqContainer,
) -> None:
    url, stream = new_vhost(rabbitmq), a_stream()
    declare(url, stream)
    broker = WorkerBroker(
        url,
        "tail",
        prefetch=1,
        heartbeat=30,
        history_stream=stream,
        stream_port=stream_port(rabbitmq),
    )
    assert broker.read_tail() is None
    published = 0
    for count in (1, 1, 40, 1, 300, 2):
        publish(url, stream, count)
        published += count
        assert broker.read_tail() == true_end(url, stream, published), count
    assert broker.tail_reads_off_leader == 0


def test_no_stream_is_a_clear_error(rabbitmq: RabbitMqContainer) -> None:
    broker = WorkerBroker(
        new_vhost(rabbitmq), "tail", prefetch=1, heartbeat=30, stream_port=stream_port(rabbitmq)
    )
    with pytest.raises(BrokerUnavailable, match=r"puller\.history\.stream.*does not exist"):
        broker.read_tail()


def test_the_tail_through_tls(tls_rabbitmq: TlsRabbitMq) -> None:
    tls = BrokerTls(ca_file=tls_rabbitmq.certificates.ca_file)
    url, stream = tls_rabbitmq.url, a_stream()
    declare(url, stream, tls)
    broker = WorkerBroker(
        url,
        "tail",
        prefetch=1,
        heartbeat=30,
        history_stream=stream,
        tls=tls,
        stream_port=tls_rabbitmq.stream_tls_port,
    )
    assert broker.read_tail() is None
    publish(url, stream, 25, tls)
    assert broker.read_tail() == true_end(url, stream, 25, tls)
    # The certificate names 127.0.0.1 and localhost; the same port by another address fails.
    login = Login("guest", "guest", "/", tls.context())
    other_name = Endpoint("127.0.0.2", tls_rabbitmq.stream_tls_port)
    with pytest.raises(StreamUnavailable, match=r"TLS to the stream port .* failed"):
        read_tail(other_name, login, stream.name)


def test_the_tail_is_read_on_the_leader_of_a_cluster(broker_cluster: BrokerCluster) -> None:
    stream = a_stream(cluster_size=3)
    declare(broker_cluster.node_url(1), stream)
    leader = broker_cluster.stream_leader(stream.name)
    replica = next(node for node in broker_cluster.nodes if node.index != leader)
    writer_url = broker_cluster.node_url(leader)
    broker = WorkerBroker(
        broker_cluster.node_url(replica.index),
        "tail",
        prefetch=1,
        heartbeat=30,
        history_stream=stream,
        stream_port=replica.stream_port,
    )
    published = 0
    for count in (1, 200):
        publish(writer_url, stream, count)
        published += count
        assert broker.read_tail() == true_end(writer_url, stream, published)
    assert broker.tail_reads_off_leader == 0
    reading = read_tail(
        Endpoint("127.0.0.1", replica.stream_port), Login("guest", "guest", "/"), stream.name
    )
    assert reading.read_at == Endpoint("127.0.0.1", broker_cluster.node(leader).stream_port)
    with pika.BlockingConnection(pika.URLParameters(writer_url)) as connection:
        connection.channel().queue_delete(stream.name)
