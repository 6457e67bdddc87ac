"""puller under faults, on real parts: a stopped engine, a registry that goes silent, a slow
pull longer than three heartbeats, SIGTERM during a pull, and a broker restart.

These tests have a RabbitMQ of their own, on a fixed port, so that it can be killed and
started again under the workers' feet.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import docker
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import BrokerUnavailable, ErrorKind, Status
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.images import ensure_rabbitmq_image
from localcluster.registry import free_port
from publisher import Publisher
from tests.integration.conftest import NODES, ROSTER_MAX_AGE, engine_has, run_cli, start_cluster
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

STALL_TIMEOUT = 5.0
RETRY_DELAY = 1.0
HEARTBEAT = 2


@pytest.fixture(scope="module")
def own_broker(host_docker: docker.DockerClient) -> Iterator[RabbitMqContainer]:
    container = RabbitMqContainer(ensure_rabbitmq_image(host_docker)).with_bind_ports(
        5672, free_port()
    )
    with container:
        yield container


def broker_url(broker: RabbitMqContainer) -> str:
    port = broker.get_exposed_port(5672)
    return f"amqp://guest:guest@127.0.0.1:{port}/{quote('/', safe='')}"


@pytest.fixture(scope="module")
def fault_cluster(own_broker: RabbitMqContainer) -> Iterator[LocalCluster]:
    cluster = start_cluster(
        broker_url(own_broker),
        PULLER_STALL_TIMEOUT=str(STALL_TIMEOUT),
        PULLER_PULL_RETRIES="1",
        PULLER_RETRY_DELAY=str(RETRY_DELAY),
        PULLER_HEARTBEAT=str(HEARTBEAT),
        PULLER_SHUTDOWN_GRACE="1",
    )
    yield cluster
    cluster.remove()


@pytest.fixture
def fault_publisher(fault_cluster: LocalCluster) -> Iterator[Publisher]:
    for engine in fault_cluster.engines:
        if engine.process is None:
            engine.start()
    for worker in fault_cluster.workers:
        if not worker.alive:
            worker.start()
    with Publisher(fault_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


@pytest.fixture
def proxy(fault_cluster: LocalCluster) -> Iterator[TcpProxy]:
    proxy = TcpProxy(("127.0.0.1", fault_cluster.registry.port))
    yield proxy
    proxy.close()


def push_through(cluster: LocalCluster, proxy: TcpProxy, size: int) -> str:
    """Pushes an image with one layer of ``size`` random bytes; names it by the proxy."""
    name = f"test/fault-{uuid.uuid4().hex[:8]}"
    cluster.registry.push_sized(name, "1", [size])
    return f"{proxy.address}/{name}:1"


def log_events(worker: WorkerProcess) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if line.startswith("{")
    ]


def test_a_stopped_engine_is_reported_quickly_and_served_again_when_back(
    fault_cluster: LocalCluster, fault_publisher: Publisher
) -> None:
    down = fault_cluster.engines[1]
    down.stop()
    image = fault_cluster.registry.push_files(f"test/e-{uuid.uuid4().hex[:8]}", "1", {"f": b"1"})
    started = time.monotonic()
    report = fault_publisher.pull(image, timeout=60)
    assert time.monotonic() - started < 20
    by_node = {r.node: r for r in report.nodes}
    failed = by_node.pop(down.name)
    assert failed.error is not None
    assert failed.error.kind is ErrorKind.ENGINE_UNAVAILABLE
    assert "dockerd is running" in failed.error.message
    assert {r.status for r in by_node.values()} == {Status.PULLED}
    assert all(worker.alive for worker in fault_cluster.workers)

    down.start()
    again = fault_cluster.registry.push_files(f"test/e-{uuid.uuid4().hex[:8]}", "1", {"f": b"2"})
    report = fault_publisher.pull(again, timeout=60)
    assert report.ok, report
    assert all(engine_has(fault_cluster, again).values())


def test_a_registry_gone_silent_mid_layer_gives_stalled_within_the_stall_timeout(
    fault_cluster: LocalCluster, fault_publisher: Publisher, proxy: TcpProxy
) -> None:
    image = push_through(fault_cluster, proxy, 30_000_000)
    proxy.go_silent_after(2_000_000)
    started = time.monotonic()
    report = fault_publisher.pull(image, timeout=120)
    elapsed = time.monotonic() - started
    # two attempts (one retry), each abandoned after STALL_TIMEOUT of silence
    assert elapsed < 2 * STALL_TIMEOUT + RETRY_DELAY + 20
    assert len(report.nodes) == NODES
    for result in report.nodes:
        assert result.error is not None, result
        assert result.error.kind is ErrorKind.STALLED
        assert "PULLER_STALL_TIMEOUT" in result.error.message
        assert "gave up after 2 attempts" in result.error.message
    assert not any(engine_has(fault_cluster, image.replace(proxy.address, "x")).values())
    assert all(worker.alive for worker in fault_cluster.workers)


def test_a_stalled_pull_is_retried_and_succeeds_once_the_registry_answers_again(
    fault_cluster: LocalCluster, fault_publisher: Publisher, proxy: TcpProxy
) -> None:
    image = push_through(fault_cluster, proxy, 30_000_000)
    proxy.go_silent_after(2_000_000)

    def resume_after_first_stall() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for worker in fault_cluster.workers:
                if any(
                    e.get("event") == "pull attempt failed; retrying"
                    and e.get("kind") == "stalled"
                    and image in str(e.get("error"))
                    for e in log_events(worker)
                ):
                    proxy.resume()
                    return
            time.sleep(0.1)

    resumer = threading.Thread(target=resume_after_first_stall)
    resumer.start()
    report = fault_publisher.pull(image, timeout=120)
    resumer.join()
    assert report.ok, report
    assert all(engine_has(fault_cluster, image).values())
    stalled_nodes = [
        w.node
        for w in fault_cluster.workers
        if any(
            e.get("kind") == "stalled" and str(image) in str(e.get("error")) for e in log_events(w)
        )
    ]
    assert stalled_nodes, "no node stalled: the proxy did not go silent"


def test_a_pull_longer_than_three_heartbeats_completes_on_the_same_connection(
    fault_cluster: LocalCluster,
    fault_publisher: Publisher,
    proxy: TcpProxy,
    own_broker: RabbitMqContainer,
) -> None:
    exit_code, output = own_broker.exec(["rabbitmqctl", "-q", "list_connections", "timeout"])
    assert exit_code == 0
    assert str(HEARTBEAT).encode() in output.split(), "the workers' heartbeat was not negotiated"
    connections_before = [
        sum(e.get("event") == "serving" for e in log_events(w)) for w in fault_cluster.workers
    ]
    image = push_through(fault_cluster, proxy, 12_000_000)
    proxy.throttle(4_000_000 / (4 * HEARTBEAT))  # three nodes share it: well over 3 heartbeats
    started = time.monotonic()
    report = fault_publisher.pull(image, timeout=180)
    took = time.monotonic() - started
    assert report.ok, report
    assert took > 3 * HEARTBEAT
    assert min(r.seconds for r in report.nodes) > 3 * HEARTBEAT
    connections_after = [
        sum(e.get("event") == "serving" for e in log_events(w)) for w in fault_cluster.workers
    ]
    assert connections_after == connections_before, "a worker had to reconnect during the pull"
    for worker in fault_cluster.workers:
        assert not any(
            e.get("event") == "connection lost; reconnecting" for e in log_events(worker)
        )


def test_sigterm_during_a_pull_answers_cancelled_and_exits_0(
    fault_cluster: LocalCluster, fault_publisher: Publisher, proxy: TcpProxy
) -> None:
    image = push_through(fault_cluster, proxy, 30_000_000)
    proxy.go_silent_after(1_000_000)
    stopping = fault_cluster.workers[0]
    request_id = fault_publisher.request(image)
    deadline = time.monotonic() + 30
    while not any(
        e.get("event") == "pulling" and image in str(e.get("image")) for e in log_events(stopping)
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopping.signal(signal.SIGTERM)
    assert stopping.process is not None
    assert stopping.process.wait(timeout=20) == 0
    results = fault_publisher.results(request_id, expect=NODES, timeout=10)
    mine = {r.node: r for r in results}[stopping.node]
    assert mine.error is not None
    assert mine.error.kind is ErrorKind.CANCELLED
    events = [e.get("event") for e in log_events(stopping)]
    assert "grace period over; cancelling" in events
    assert events[-1] == "stopped"


def test_workers_survive_a_broker_restart_and_serve_again(
    fault_cluster: LocalCluster, fault_publisher: Publisher, own_broker: RabbitMqContainer
) -> None:
    assert len(fault_publisher.nodes()) == NODES
    container = own_broker.get_wrapped_container()
    container.kill()
    try:
        started = time.monotonic()
        with (
            Publisher(fault_cluster.amqp_url, connect_timeout=2) as lonely,
            pytest.raises(BrokerUnavailable, match="cannot connect to RabbitMQ"),
        ):
            lonely.request("busybox")
        assert time.monotonic() - started < 10
        cli = run_cli("--amqp-url", fault_cluster.amqp_url, "pull", "busybox", timeout=30)
        assert cli.returncode == 3
        assert "RabbitMQ" in cli.stderr
        time.sleep(2)
    finally:
        container.start()
    deadline = time.monotonic() + 120
    while True:  # the broker boots, then each worker's backoff brings it back
        try:
            if len(fault_publisher.nodes()) == NODES:
                break
        except BrokerUnavailable:
            pass
        assert time.monotonic() < deadline, "the workers did not come back"
        time.sleep(1)
    image = fault_cluster.registry.push_files(f"test/b-{uuid.uuid4().hex[:8]}", "1", {"f": b"3"})
    report = fault_publisher.pull(image, timeout=60)
    assert report.ok, report
    assert all(worker.alive for worker in fault_cluster.workers)
    for worker in fault_cluster.workers:
        events = [e.get("event") for e in log_events(worker)]
        assert "connection lost; reconnecting" in events
        assert events.count("serving") >= 2
