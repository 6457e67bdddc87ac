"""Thousands of slow clients against the real ``puller-http`` and ``puller-worker``, each
process inside a memory group with its Kubernetes limit (deploy/kubernetes/: 256 MiB and
128 MiB): both keep answering their probes and a real call while the connections are open,
after one more byte on each, and once they have all closed at once.

The full figures, and what other slow clients cost, are in bench/slow_clients.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from localcluster.cgroup import MIB, MemoryGroup
from localcluster.cluster import GatewayProcess, WorkerProcess, installed_command, worker_command
from localcluster.engines import HOST_DOCKER_SOCKET
from localcluster.processes import wait_until
from localcluster.slow_clients import Siege, siege
from serving.program import raise_open_file_limit
from tests.integration.conftest import new_vhost

pytestmark = pytest.mark.integration

GATEWAY_LIMIT = 256 * MIB
WORKER_LIMIT = 128 * MIB
GATEWAY_CONNECTIONS = 5000
WORKER_CONNECTIONS = 3000
ANSWER_WITHIN = 1.0


@pytest.fixture(autouse=True)
def enough_open_files() -> None:
    limit = raise_open_file_limit()
    assert limit > GATEWAY_CONNECTIONS + 200, f"this process may open {limit} files only"


def assert_kept_answering(report: Siege, count: int) -> None:
    assert report.oom_kills == 0, "killed for going over its memory limit"
    assert report.error == ""
    assert report.unanswered == []
    slow = [(p.path, round(p.seconds, 3)) for p in report.probes if p.seconds > ANSWER_WITHIN]
    assert slow == [], f"answers slower than {ANSWER_WITHIN} s"
    assert report.held_at_end == count, "the slow connections were not all held: nothing shown"


def test_the_gateway_keeps_answering_5000_slow_clients_inside_its_memory_limit(
    rabbitmq: RabbitMqContainer, tmp_path: Path
) -> None:
    with MemoryGroup(GATEWAY_LIMIT) as group:
        gateway = GatewayProcess(
            new_vhost(rabbitmq),
            tmp_path / "gateway.log",
            command=group.command(installed_command("puller-http", "gateway.main")),
        )
        gateway.start()
        try:
            assert gateway.process is not None
            report = siege(
                gateway.port, gateway.process.pid, GATEWAY_CONNECTIONS, ["/alive", "/nodes"], group
            )
        finally:
            gateway.stop()
    assert_kept_answering(report, GATEWAY_CONNECTIONS)


def test_past_its_limit_of_connections_the_gateway_closes_the_oldest_and_keeps_answering(
    rabbitmq: RabbitMqContainer, tmp_path: Path
) -> None:
    """At its limit the gateway closes the oldest idle connection for each new one, so a
    probe never waits behind the connections an attacker holds."""
    limit = 1000
    with MemoryGroup(GATEWAY_LIMIT) as group:
        gateway = GatewayProcess(
            new_vhost(rabbitmq),
            tmp_path / "gateway.log",
            extra_env={"PULLER_HTTP_MAX_CONNECTIONS": str(limit)},
            command=group.command(installed_command("puller-http", "gateway.main")),
        )
        gateway.start()
        try:
            assert gateway.process is not None
            report = siege(gateway.port, gateway.process.pid, 3 * limit, ["/alive", "/nodes"])
        finally:
            gateway.stop()
    assert report.error == ""
    assert report.unanswered == []
    assert max(p.seconds for p in report.probes) < ANSWER_WITHIN
    assert 0 < report.held_at_end <= limit
    assert "the oldest idle ones are closed to make room" in gateway.log_path.read_text()


@pytest.fixture
def worker_in_memory_group(
    rabbitmq: RabbitMqContainer, host_docker: docker.DockerClient, tmp_path: Path
) -> Iterator[tuple[WorkerProcess, MemoryGroup]]:
    with MemoryGroup(WORKER_LIMIT) as group:
        worker = WorkerProcess(
            node=f"slow-{uuid.uuid4().hex[:6]}",
            docker_host=f"unix://{HOST_DOCKER_SOCKET}",
            amqp_url=new_vhost(rabbitmq),
            log_path=tmp_path / "worker.log",
            command=group.command(worker_command()),
        )
        worker.start()
        try:
            wait_until(
                lambda: worker.health("/ready")[0] == 200,
                "the worker caught up",
                60,
                worker.process,
                worker.log_path,
            )
            yield worker, group
        finally:
            worker.stop()


def test_a_workers_health_port_keeps_answering_3000_slow_clients_inside_its_memory_limit(
    worker_in_memory_group: tuple[WorkerProcess, MemoryGroup],
) -> None:
    worker, group = worker_in_memory_group
    assert worker.process is not None
    report = siege(
        worker.health_port, worker.process.pid, WORKER_CONNECTIONS, ["/alive", "/ready"], group
    )
    assert_kept_answering(report, WORKER_CONNECTIONS)
    assert worker.alive
