"""The worker's Dockerfile builds, and docker-compose runs RabbitMQ with a worker that pulls."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from contract import BrokerUnavailable, NoNodes, Status
from localcluster.cluster import LocalCluster
from localcluster.images import PROJECT_ROOT, build_worker_image, ensure_rabbitmq_image
from localcluster.processes import free_port
from publisher import Publisher

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def compose_project(host_docker: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """``docker-compose up`` of the project's own docker-compose.yml; yields (AMQP URL, node)."""
    node = f"compose-{uuid.uuid4().hex[:6]}"
    port = free_port()
    env = {
        **os.environ,
        "RABBITMQ_IMAGE": ensure_rabbitmq_image(host_docker),
        "WORKER_IMAGE": build_worker_image(host_docker),
        "AMQP_HOST_PORT": str(port),
        "PULLER_NODE_NAME": node,
    }
    compose = [
        "docker-compose",
        "--project-name",
        node,
        "--file",
        str(Path(PROJECT_ROOT) / "docker-compose.yml"),
    ]
    subprocess.run(
        [*compose, "up", "--detach", "--no-build"],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:{port}/%2F", node
    finally:
        logs = subprocess.run(
            [*compose, "logs", "--no-color", "worker"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        print(logs.stdout[-3000:])
        subprocess.run(
            [*compose, "down", "--volumes"], env=env, check=False, capture_output=True, timeout=300
        )


def test_compose_worker_pulls_through_the_engine_it_is_given(
    compose_project: tuple[str, str], cluster: LocalCluster, host_docker: docker.DockerClient
) -> None:
    amqp_url, node = compose_project
    image = cluster.registry.push_files(
        f"test/compose-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
    )
    deadline = time.monotonic() + 120
    while True:  # RabbitMQ and the worker come up in their own time
        try:
            with Publisher(amqp_url) as publisher:
                report = publisher.pull(image, expect=1, timeout=60)
            break
        except (BrokerUnavailable, NoNodes):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    [result] = report.nodes
    assert result.node == node
    assert result.status is Status.PULLED, result
    host_docker.images.get(image)  # raises if the worker did not pull into this engine
    host_docker.images.remove(image, force=True)
