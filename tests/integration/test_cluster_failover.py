"""puller on a real 3-node RabbitMQ cluster: losing the broker node the workers are on, during
a pull, costs nothing; the streams are replicated; a node that was away catches up even when
the history's leader went away meanwhile."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract import BrokerUnavailable, Status
from contract import topology as topo
from contract.connection import spread_order
from localcluster.broker_cluster import BrokerCluster
from localcluster.cluster import LocalCluster, WorkerProcess
from publisher import Publisher
from publisher.broker_setup import declare_topology
from publisher.report import PullReport
from tests.integration.conftest import ROSTER_MAX_AGE, engine_has, start_cluster
from tests.integration.tcp_proxy import TcpProxy
from tests.waiting import eventually

NODES = 3
LAYER = 30_000_000
THROTTLE = 20_000_000
"""Bytes a second through the proxy to the registry: the pull lasts a few seconds."""


def ordered(urls: list[str], first: int) -> str:
    """``PULLER_AMQP_URL`` for the cluster, trying broker node ``first`` (1-based) first."""
    return ",".join(urls[first - 1 :] + urls[: first - 1])


@pytest.fixture(scope="module")
def vhost(broker_cluster: BrokerCluster) -> str:
    name = f"failover-{uuid.uuid4().hex[:8]}"
    broker_cluster.add_vhost(name)
    return name


@pytest.fixture(scope="module")
def nodes(broker_cluster: BrokerCluster, vhost: str) -> Iterator[LocalCluster]:
    """Workers that try broker node 1 first."""
    cluster = start_cluster(
        ordered(broker_cluster.urls(vhost), 1),
        nodes=NODES,
        PULLER_HEARTBEAT="2",
        PULLER_BROKER_ORDER="listed",
    )
    yield cluster
    cluster.remove()


@pytest.fixture
def publisher(broker_cluster: BrokerCluster, vhost: str) -> Iterator[Publisher]:
    """A publisher on broker node 2."""
    url = ordered(broker_cluster.urls(vhost), 2)
    with Publisher(url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


def wait_ready(workers: list[WorkerProcess], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers:
        while True:
            try:
                if worker.health("/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{worker.node} is not ready again"
            time.sleep(0.2)


def test_the_streams_are_replicated_on_every_broker_node(
    nodes: LocalCluster, broker_cluster: BrokerCluster, vhost: str
) -> None:
    for stream in (topo.HISTORY_STREAM_NAME, topo.PRESENCE_STREAM.name):
        assert broker_cluster.stream_members(stream, vhost) == {1, 2, 3}, stream


def broker_in_use(worker: WorkerProcess, broker_cluster: BrokerCluster) -> int:
    """The broker node (1-based) the worker's log says it serves through."""
    for line in worker.log_path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("event") == "serving":
            found = re.fullmatch(r"127\.0\.0\.1:(\d+) vhost .*", entry["broker"])
            assert found is not None, entry
            return next(n.index for n in broker_cluster.nodes if n.amqp_port == int(found[1]))
    raise AssertionError(f"{worker.node} never served")


def test_workers_given_every_broker_spread_over_them_by_node_name(
    nodes: LocalCluster, broker_cluster: BrokerCluster, tmp_path: Path
) -> None:
    vhost = f"spread-{uuid.uuid4().hex[:8]}"
    broker_cluster.add_vhost(vhost)
    # The streams first, with a replica up on every node: a worker that asks a node for a
    # stream before its replica there has started is refused and moves on to the next broker.
    declare_topology(broker_cluster.urls(vhost)[0])
    streams = (topo.HISTORY_STREAM_NAME, topo.PRESENCE_STREAM.name)
    eventually(
        lambda: all(
            broker_cluster.stream_members(s, vhost, online=True) == {1, 2, 3} for s in streams
        ),
        "the new vhost's streams have a replica up on every broker node",
        60,
    )
    names = ["node-1", "node-2", "node-4"]
    expected = {name: spread_order(NODES, name)[0] + 1 for name in names}
    assert sorted(expected.values()) == [1, 2, 3]  # these names cover every broker node
    workers = [
        WorkerProcess(
            node=name,
            docker_host=nodes.engines[0].docker_host,  # one engine will do: nothing is pulled
            amqp_url=",".join(broker_cluster.urls(vhost)),  # listed in node order, 1 first
            log_path=tmp_path / f"{name}.log",
            extra_env={"PULLER_PRESENCE_INTERVAL": "1"},
        )
        for name in names
    ]
    try:
        for worker in workers:
            worker.launch()
        for worker in workers:
            worker.wait_serving()
        assert {w.node: broker_in_use(w, broker_cluster) for w in workers} == expected
    finally:
        for worker in workers:
            worker.stop()


def test_losing_the_workers_broker_node_during_a_pull_loses_nothing(
    nodes: LocalCluster, broker_cluster: BrokerCluster, publisher: Publisher
) -> None:
    proxy = TcpProxy(("127.0.0.1", nodes.registry.port))
    try:
        proxy.throttle(THROTTLE)
        name = f"failover/{uuid.uuid4().hex[:8]}"
        nodes.registry.push_sized(name, "1", [LAYER])
        image = f"{proxy.address}/{name}:1"
        request_id = publisher.request(image)
        deadline = time.monotonic() + 30
        while not all(w.metric("puller_worker_pulls_in_flight") >= 1 for w in nodes.workers):
            assert time.monotonic() < deadline, "the pulls did not start"
            time.sleep(0.05)
        broker_cluster.stop_node(1, kill=True)  # every worker's broker, mid-pull
        try:
            results = publisher.results(request_id, expect=NODES, timeout=90)
            wait_ready(nodes.workers)
        finally:
            broker_cluster.start_node(1)
    finally:
        proxy.close()
    assert sorted(r.node for r in results) == [w.node for w in nodes.workers]
    assert all(r.status is Status.PULLED for r in results), results
    assert all(engine_has(nodes, f"{proxy.address}/{name}:1").values())
    for worker in nodes.workers:
        assert worker.metric("puller_worker_broker_connections_total") >= 2


def test_losing_the_publishers_broker_node_during_a_pull_still_gets_every_answer(
    nodes: LocalCluster, broker_cluster: BrokerCluster, publisher: Publisher
) -> None:
    # The publisher is on broker node 2, the workers on node 1. Its reply queue dies with
    # node 2: it must reconnect to another node and ask again, within pull()'s timeout.
    proxy = TcpProxy(("127.0.0.1", nodes.registry.port))
    outcome: dict[str, object] = {}
    try:
        proxy.throttle(THROTTLE)
        name = f"failover/{uuid.uuid4().hex[:8]}"
        nodes.registry.push_sized(name, "1", [LAYER])
        image = f"{proxy.address}/{name}:1"
        waiting = threading.Thread(
            target=lambda: outcome.__setitem__("report", publisher.pull(image, timeout=90))
        )
        waiting.start()
        deadline = time.monotonic() + 30
        while not all(w.metric("puller_worker_pulls_in_flight") >= 1 for w in nodes.workers):
            assert time.monotonic() < deadline, "the pulls did not start"
            time.sleep(0.05)
        broker_cluster.stop_node(2, kill=True)
        try:
            waiting.join(timeout=120)
        finally:
            broker_cluster.start_node(2)
    finally:
        proxy.close()
    report = outcome["report"]
    assert isinstance(report, PullReport)
    assert report.ok, json.dumps(report.to_json(), indent=1)
    assert sorted(r.node for r in report.nodes) == [w.node for w in nodes.workers]
    assert all(r.status in (Status.PULLED, Status.PRESENT) for r in report.nodes)
    assert any("published again" in note for note in report.notes), report.notes
    assert all(engine_has(nodes, image).values())


def test_a_node_that_was_away_catches_up_after_the_historys_leader_went_away(
    nodes: LocalCluster, broker_cluster: BrokerCluster, publisher: Publisher, vhost: str
) -> None:
    away = nodes.workers[0]
    away.stop()
    image = nodes.registry.push_files(f"missed/{uuid.uuid4().hex[:8]}", "1", {"f": b"x"})
    publisher.request(image)
    leader = broker_cluster.stream_leader(topo.HISTORY_STREAM_NAME, vhost)
    broker_cluster.stop_node(leader, kill=True)
    try:
        away.start()
        deadline = time.monotonic() + 60
        while away.metric("puller_worker_caught_up") < 1:
            assert time.monotonic() < deadline, "the node did not catch up"
            time.sleep(0.2)
        assert engine_has(nodes, image)[nodes.engines[0].name]
    finally:
        broker_cluster.start_node(leader)


@pytest.mark.long  # 45 s, mostly two nodes booting again; the one-node losses above stay in CI
def test_with_two_of_three_broker_nodes_gone_errors_are_clear_and_all_recovers(
    nodes: LocalCluster, broker_cluster: BrokerCluster, vhost: str
) -> None:
    url = ordered(broker_cluster.urls(vhost), 3)
    broker_cluster.stop_node(1, kill=True)
    broker_cluster.stop_node(2, kill=True)
    try:
        started = time.monotonic()
        with (
            Publisher(url, connect_timeout=5) as publisher,
            pytest.raises(BrokerUnavailable, match=r"did not confirm|cannot connect|lost"),
        ):
            publisher.request("busybox")
        assert time.monotonic() - started < 5 + 5 + 5  # connect, confirm grace, slack
        for worker in nodes.workers:
            # Ready or not (a worker whose broker node is up keeps its queue and may
            # serve live requests), it says why, and it is alive.
            _, ready = worker.health("/ready")
            assert ready.get("reason"), ready
            assert worker.health("/alive")[0] == 200
    finally:
        broker_cluster.start_node(1, 2)
    wait_ready(nodes.workers, timeout=120)
    image = nodes.registry.push_files(f"back/{uuid.uuid4().hex[:8]}", "1", {"f": b"y"})
    with Publisher(url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        assert publisher.pull(image, expect=NODES, timeout=60).ok
