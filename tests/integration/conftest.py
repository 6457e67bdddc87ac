"""Real services for the integration suite: RabbitMQ in a container (testcontainers), a real
registry, and one real Docker Engine plus a real ``puller-worker`` per node.

Nothing here skips: a missing service is started, and if it cannot be, the tests fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import docker
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from localcluster.cluster import LocalCluster
from localcluster.engines import ensure_host_engine
from localcluster.images import ensure_rabbitmq_image, host_client
from publisher import Publisher

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # the reaper image cannot be pulled

NODES = 3
PRESENCE_INTERVAL = 1.0
"""Workers under test announce themselves every second, so the roster reacts within seconds."""
ROSTER_MAX_AGE = 4.0


@pytest.fixture(scope="session")
def host_docker() -> Iterator[docker.DockerClient]:
    ensure_host_engine()
    client = host_client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def rabbitmq(host_docker: docker.DockerClient) -> Iterator[RabbitMqContainer]:
    with RabbitMqContainer(ensure_rabbitmq_image(host_docker)) as container:
        yield container


def new_vhost(rabbitmq: RabbitMqContainer) -> str:
    """A fresh vhost on the test broker, so that tests which need an empty one get it."""
    vhost = f"puller-{uuid.uuid4().hex[:8]}"
    for command in (
        ["rabbitmqctl", "add_vhost", vhost],
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
    ):
        exit_code, output = rabbitmq.exec(command)
        assert exit_code == 0, output
    host = rabbitmq.get_container_host_ip()
    port = rabbitmq.get_exposed_port(5672)
    return f"amqp://guest:guest@{host}:{port}/{quote(vhost, safe='')}"


@pytest.fixture(scope="session")
def amqp_url(rabbitmq: RabbitMqContainer) -> str:
    return new_vhost(rabbitmq)


def start_cluster(amqp_url: str, nodes: int = NODES, **worker_env: str) -> LocalCluster:
    root = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    cluster = LocalCluster(
        root=root,
        amqp_url=amqp_url,
        nodes=nodes,
        worker_env={"PULLER_PRESENCE_INTERVAL": str(PRESENCE_INTERVAL), **worker_env},
    )
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def cluster(amqp_url: str) -> Iterator[LocalCluster]:
    """Shared by tests that leave every node as they found it."""
    cluster = start_cluster(amqp_url)
    yield cluster
    cluster.remove()


@pytest.fixture
def publisher(cluster: LocalCluster) -> Iterator[Publisher]:
    with Publisher(cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


@pytest.fixture
def fresh_image(cluster: LocalCluster) -> str:
    """A small image that is in the registry and on no node yet."""
    return cluster.registry.push_files(
        f"test/{uuid.uuid4().hex[:10]}", "1", {"payload.txt": uuid.uuid4().bytes}
    )


def engine_has(cluster: LocalCluster, image: str) -> dict[str, bool]:
    """Asks each node's own Docker Engine, not puller, whether it holds ``image``."""
    found: dict[str, bool] = {}
    for engine in cluster.engines:
        client = engine.client()
        try:
            client.images.get(image)
            found[engine.name] = True
        except docker.errors.ImageNotFound:
            found[engine.name] = False
        finally:
            client.close()
    return found


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs the installed ``puller`` command (the one beside this interpreter)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "puller"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
