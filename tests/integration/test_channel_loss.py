"""The broker takes a channel or a consumer from a worker whose connection stays open.

Each way leaves the worker connected; each must bring it back to consuming its node's queue
and answering the next broadcast, never leave it deaf while its presence says it is fine.
One worker on a vhost of its own: what these tests delete is shared by a vhost's workers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote, unquote, urlsplit

import pika
import pytest
import requests
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import PULL_EXCHANGE, REPLY_EXCHANGE, PullRequest
from contract import topology as topo
from contract.reference import parse_reference
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.processes import wait_until
from publisher import Publisher
from tests.integration.conftest import GUEST, ROSTER_MAX_AGE, new_vhost, start_cluster
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

RECOVERY = 10.0
"""Seconds a worker has to consume its queue again (it takes well under one)."""


@pytest.fixture(scope="module")
def lone_cluster(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    # A stop cuts the pull the history test leaves hanging without waiting for it.
    cluster = start_cluster(new_vhost(rabbitmq), nodes=1, PULLER_SHUTDOWN_GRACE="0.5")
    yield cluster
    cluster.remove()


@pytest.fixture
def worker(lone_cluster: LocalCluster) -> WorkerProcess:
    [worker] = lone_cluster.workers
    worker.wait_serving(RECOVERY)
    return worker


def vhost_of(cluster: LocalCluster) -> str:
    return unquote(urlsplit(cluster.amqp_url).path.lstrip("/"))


def delete(management: str, cluster: LocalCluster, kind: str, name: str) -> None:
    """Deletes exchange or queue ``name`` of the cluster's vhost through the management API."""
    vhost = quote(vhost_of(cluster), safe="")
    url = f"{management}/api/{kind}/{vhost}/{quote(name, safe='')}"
    response = requests.delete(url, auth=GUEST, timeout=10)
    assert response.status_code == 204, response.text


def connections(worker: WorkerProcess) -> float:
    return worker.metric("puller_worker_broker_connections_total")


def logged(worker: WorkerProcess, text: str, **fields: object) -> bool:
    """The worker's log has a line whose event starts with ``text``, with ``fields``."""
    events = (json.loads(line) for line in worker.log_path.read_text().splitlines() if line)
    return any(
        str(event.get("event")).startswith(text) and fields.items() <= event.items()
        for event in events
    )


def pushed(cluster: LocalCluster) -> str:
    """A new small image in the cluster's registry."""
    return cluster.registry.push_files(
        f"test/chan-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
    )


def assert_answers_again(cluster: LocalCluster, worker: WorkerProcess, before: float) -> None:
    """The worker reconnected (which declares, binds and consumes its queue before the
    connection counts), and answers a broadcast pull."""
    wait_until(
        lambda: connections(worker) > before and worker.serving(),
        "the worker connected again",
        RECOVERY,
        worker.process,
        worker.log_path,
    )
    with Publisher(cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        report = publisher.pull(pushed(cluster), timeout=30)
    assert report.ok, report
    assert [answer.node for answer in report.nodes] == [worker.node]
    assert worker.alive


def test_a_worker_whose_queue_an_administrator_deletes_declares_it_again_and_answers(
    lone_cluster: LocalCluster, worker: WorkerProcess, rabbitmq: RabbitMqContainer
) -> None:
    """RabbitMQ cancels the consumer of a deleted queue and leaves the channel open. The
    management API refuses to delete another connection's exclusive queue; rabbitmqctl
    does not."""
    before = connections(worker)
    queue = topo.node_queue_name(worker.node)
    deleted = rabbitmq.get_wrapped_container().exec_run(
        ["rabbitmqctl", "delete_queue", "-p", vhost_of(lone_cluster), queue]
    )
    assert deleted.exit_code == 0, deleted.output
    assert_answers_again(lone_cluster, worker, before)
    assert logged(worker, "RabbitMQ cancelled this worker's consumer", queue=queue)


def test_a_worker_whose_channel_the_broker_closes_consumes_its_queue_again(
    lone_cluster: LocalCluster, worker: WorkerProcess, management: str
) -> None:
    """A reply to an exchange that is gone makes RabbitMQ close the channel (404) with the
    connection open; the node's queue, exclusive and auto-delete, goes with its consumer."""
    delete(management, lone_cluster, "exchanges", REPLY_EXCHANGE)
    before = connections(worker)
    sender = pika.BlockingConnection(pika.URLParameters(lone_cluster.amqp_url))
    try:  # a request that breaks the contract: the worker answers it at once
        sender.channel().basic_publish(
            PULL_EXCHANGE, "", b"{}", pika.BasicProperties(reply_to="nobody", correlation_id="x")
        )
    finally:
        sender.close()
    assert_answers_again(lone_cluster, worker, before)
    assert logged(worker, "RabbitMQ closed the channel this node's requests come on")


def test_a_publisher_whose_reply_queue_is_deleted_declares_it_again_and_hears_answers(
    lone_cluster: LocalCluster,
    worker: WorkerProcess,
    rabbitmq: RabbitMqContainer,
    management: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same cancel, on the publisher's side: its exclusive reply queue deleted under a
    connection that stays open, no answer could reach it any more."""
    with Publisher(lone_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        assert publisher.pull(pushed(lone_cluster), timeout=30).ok
        vhost = quote(vhost_of(lone_cluster), safe="")
        listed = requests.get(f"{management}/api/queues/{vhost}", auth=GUEST, timeout=10)
        [reply_queue] = [
            queue["name"]
            for queue in listed.json()
            if queue["name"].startswith(topo.REPLY_QUEUE_PREFIX)
        ]
        deleted = rabbitmq.get_wrapped_container().exec_run(
            ["rabbitmqctl", "delete_queue", "-p", vhost_of(lone_cluster), reply_queue]
        )
        assert deleted.exit_code == 0, deleted.output
        report = publisher.pull(pushed(lone_cluster), timeout=RECOVERY)
        assert report.ok, report
    assert f"RabbitMQ cancelled the consumer of reply queue {reply_queue}" in caplog.text


def test_a_publisher_whose_presence_stream_is_deleted_declares_it_again_and_sees_nodes(
    lone_cluster: LocalCluster,
    worker: WorkerProcess,
    management: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reading of the presence stream, cancelled by its deletion, hears no announcement
    again; nor does anyone, until the stream is declared again."""
    with Publisher(lone_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        assert [node.node for node in publisher.nodes()] == [worker.node]
        deleted_at = time.time()
        delete(management, lone_cluster, "queues", topo.PRESENCE_STREAM.name)
        wait_until(
            lambda: [node.last_seen > deleted_at for node in publisher.nodes()] == [True],
            "an announcement made after the deletion in the roster",
            RECOVERY,
        )
    assert f"RabbitMQ cancelled the reading of {topo.PRESENCE_STREAM.name}" in caplog.text


def test_a_worker_whose_history_stream_is_deleted_mid_replay_reads_the_new_one(
    lone_cluster: LocalCluster, worker: WorkerProcess, management: str
) -> None:
    """RabbitMQ cancels the consumer of a deleted stream and leaves the channel open; the
    marker that ends the replay never comes. Held mid-replay by a pull from a registry that
    says nothing."""
    silent = TcpProxy(("127.0.0.1", lone_cluster.registry.port))
    silent.go_silent_after(0)
    try:
        name = f"test/chan-{uuid.uuid4().hex[:8]}"
        lone_cluster.registry.push_files(name, "1", {"f": b"held"})
        held = PullRequest.new(parse_reference(f"{silent.address}/{name}:1"))
        sender = pika.BlockingConnection(pika.URLParameters(lone_cluster.amqp_url))
        try:  # into the history only: the worker meets it when it next catches up
            sender.channel().basic_publish(topo.HISTORY.name, "", held.encode())
        finally:
            sender.close()
        worker.stop()
        worker.start()
        before = connections(worker)
        wait_until(
            lambda: worker.health("/ready")[1]["phase"] == "replaying missed pulls",
            "the worker replaying the held request",
            RECOVERY,
        )
        delete(management, lone_cluster, "queues", topo.HISTORY_STREAM_NAME)
        wait_until(lambda: worker.health("/ready")[0] == 200, "the worker caught up", RECOVERY)
        assert logged(
            worker, "RabbitMQ cancelled this worker's consumer", queue=topo.HISTORY_STREAM_NAME
        )
        assert_answers_again(lone_cluster, worker, before)
    finally:
        silent.close()
