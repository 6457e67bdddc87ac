"""puller's two images (the Dockerfile's ``worker`` and ``http`` targets) build here and run
as they are deployed; docker-compose.yml runs a whole system that puts an image on both of
its nodes with one ``POST /pull_images``."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import docker
import pytest
from docker.models.containers import Container
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import Status
from localcluster.cluster import LocalCluster
from localcluster.engines import NodeContainerd
from localcluster.images import (
    PROJECT_ROOT,
    PullerImages,
    build_engine_image,
    build_puller_images,
    ensure_rabbitmq_image,
    ensure_registry_image,
    project_version,
)
from localcluster.processes import free_port, wait_until
from localcluster.registry import make_layer, push_image
from publisher import Publisher
from tests.integration.conftest import new_vhost

pytestmark = pytest.mark.integration

NOBODY = "65534:65534"
HEALTH_INTERVAL_NS = 1_000_000_000
"""The tests run each image's own HEALTHCHECK command every second, not every 15 s: only
the interval is given, so docker takes the command, timeout and retries from the image."""
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m; "
    "print(*sorted(d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()))"
)
DEV_ONLY = {"pip", "setuptools", "wheel", "pytest", "mypy", "ruff", "testcontainers", "celery"}


@pytest.fixture(scope="module")
def images(host_docker: docker.DockerClient) -> PullerImages:
    return build_puller_images(host_docker)


def get(port: int, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def answers_ok(port: int, path: str) -> bool:
    return get(port, path)[0] == 200


def broker_url_for_host_network(rabbitmq: RabbitMqContainer) -> str:
    """A fresh vhost on the test broker, by the address a ``--network host`` container
    reaches it at (and the tests too): 127.0.0.1 and the published port."""
    url = new_vhost(rabbitmq)
    return url.replace(f"@{rabbitmq.get_container_host_ip()}:", "@127.0.0.1:", 1)


@contextmanager
def running(client: docker.DockerClient, image: str, **options: Any) -> Iterator[Container]:
    """``image`` with host networking, a read-only root file system, a small tmpfs /tmp, no
    capabilities, and its HEALTHCHECK every second; removed after, with its volumes."""
    container = client.containers.create(
        image,
        name=f"puller-test-{uuid.uuid4().hex[:8]}",
        network_mode="host",
        read_only=True,
        tmpfs={"/tmp": "size=8m"},  # noqa: S108 - the container's own /tmp
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        healthcheck={"interval": HEALTH_INTERVAL_NS},
        **options,
    )
    try:
        container.start()
        yield container
    finally:
        container.remove(force=True, v=True)  # v: the worker's state directory volume


def run_once(
    client: docker.DockerClient, image: str, command: list[str], entrypoint: str | None = None
) -> str:
    """What ``image`` prints for ``command``. The container is removed with its anonymous
    volumes (the worker image declares one), which ``containers.run(remove=True)`` leaves."""
    container = client.containers.create(image, command, entrypoint=entrypoint)
    try:
        container.start()
        status = container.wait(timeout=60)
        output: bytes = container.logs()
        assert status["StatusCode"] == 0, output
        return output.decode()
    finally:
        container.remove(force=True, v=True)


def health(container: Container) -> str:
    container.reload()
    return str(container.attrs["State"].get("Health", {}).get("Status", "none"))


def wait_for(container: Container, ready: Any, what: str, timeout: float = 60) -> None:
    try:
        wait_until(ready, what, timeout)
    except Exception as error:
        container.reload()
        error.add_note(f"container {container.status}; log (tail):\n{logs(container)}")
        raise


def logs(container: Container) -> str:
    tail: bytes = container.logs(tail=40)
    return tail.decode(errors="replace")


def test_each_image_answers_its_version_and_carries_its_labels(
    images: PullerImages, host_docker: docker.DockerClient
) -> None:
    assert images.version == project_version()
    for image, program in ((images.worker, "puller-worker"), (images.http, "puller-http")):
        assert run_once(host_docker, image, ["--version"]) == f"{program} {images.version}\n"
        config = host_docker.images.get(image).attrs["Config"]
        labels = config["Labels"]
        assert labels["org.opencontainers.image.title"] == program
        assert labels["org.opencontainers.image.version"] == images.version
        assert labels["org.opencontainers.image.revision"] == images.revision
        assert labels["org.opencontainers.image.source"].startswith("https://")
        assert config["Healthcheck"]["Test"][:2] == ["CMD", "python"]
        assert config["Entrypoint"] == [program]
        assert not config["Cmd"]
        installed = run_once(host_docker, image, ["-c", LIST_DISTRIBUTIONS], entrypoint="python")
        distributions = set(installed.split())
        assert {"puller", "pika", "docker", "structlog", "prometheus-client"} <= distributions
        assert not distributions & DEV_ONLY, "the venv holds only runtime dependencies"
    assert host_docker.images.get(images.http).attrs["Config"]["User"] == NOBODY
    # the CLI, in either image; the blob cache, as deploy/'s manifests run it from the worker's
    version = run_once(host_docker, images.http, ["--version"], "puller")
    assert version == f"puller {images.version}\n"
    assert "--upstream" in run_once(host_docker, images.worker, ["--help"], "puller-blob-cache")


def test_http_image_serves_as_nobody_on_a_read_only_root(
    images: PullerImages, host_docker: docker.DockerClient, rabbitmq: RabbitMqContainer
) -> None:
    port = free_port()
    with running(
        host_docker,
        images.http,
        environment={
            "PULLER_AMQP_URL": broker_url_for_host_network(rabbitmq),
            "PULLER_HTTP_PORT": str(port),
        },
    ) as container:
        wait_for(container, lambda: answers_ok(port, "/ready"), "puller-http's /ready")
        assert get(port, "/alive") == (200, {"alive?": True})
        assert get(port, "/ready") == (200, {"ready?": True})
        assert get(port, "/sha") == (200, {"sha": images.revision or None})
        wait_for(container, lambda: health(container) == "healthy", "puller-http healthy")
        # The image's own HEALTHCHECK command ran, only more often.
        image_check = host_docker.images.get(images.http).attrs["Config"]["Healthcheck"]["Test"]
        assert container.attrs["Config"]["Healthcheck"]["Test"] == image_check
        ids = container.exec_run(["python", "-c", "import os; print(os.getuid(), os.getgid())"])
        assert ids.output.decode().split() == ["65534", "65534"]
        assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
        assert container.exec_run(["python", "-c", "open('/tmp/x', 'w')"]).exit_code == 0


def test_worker_image_runs_the_blob_cache_as_any_uid_on_a_read_only_root(
    images: PullerImages, host_docker: docker.DockerClient, cluster: LocalCluster
) -> None:
    """``puller-blob-cache`` from the worker image, as a pod would run it: any uid, a
    read-only root, its directory on a volume (here the container's tmpfs /tmp)."""
    directory = "/tmp/cache"  # noqa: S108 - in the container's own tmpfs /tmp
    blob = os.urandom(300_000)
    repository = f"test/cached-{uuid.uuid4().hex[:8]}"
    digest = cluster.registry.push_blob(repository, blob)
    port = free_port()
    command = ["--upstream", cluster.registry.url, "--listen", f"127.0.0.1:{port}"]
    command += ["--dir", directory, "--max-bytes", "5M"]
    with running(
        host_docker,
        images.worker,
        entrypoint="puller-blob-cache",
        command=command,
        user="12345:12345",
    ) as container:
        wait_for(container, lambda: answers_ok(port, "/alive"), "puller-blob-cache's /alive")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", f"/v2/{repository}/blobs/{digest}")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, blob)
        finally:
            connection.close()
        kept = container.exec_run(["ls", "-n", f"{directory}/blobs"]).output.decode()
        assert digest.split(":", 1)[1] in kept
        assert " 12345 12345 " in kept
        assert get(port, "/alive")[1]["kept_bytes"] == len(blob)


def test_worker_image_pulls_through_a_mounted_socket_as_nobody_with_its_group(
    images: PullerImages,
    host_docker: docker.DockerClient,
    rabbitmq: RabbitMqContainer,
    cluster: LocalCluster,
) -> None:
    """As the Dockerfile suggests where the host allows: --user 65534 --group-add (the
    socket's group), here with the socket of one of the test cluster's engines."""
    engine = cluster.engines[0]
    amqp_url = broker_url_for_host_network(rabbitmq)
    node = f"image-{uuid.uuid4().hex[:6]}"
    port = free_port()
    image = cluster.registry.push_files(
        f"test/image-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
    )
    with running(
        host_docker,
        images.worker,
        user=NOBODY,
        group_add=[str(engine.socket.stat().st_gid)],
        volumes={str(engine.socket): {"bind": "/var/run/docker.sock", "mode": "rw"}},
        environment={
            "PULLER_AMQP_URL": amqp_url,
            "PULLER_NODE_NAME": node,
            "PULLER_HEALTH_PORT": str(port),
        },
    ) as container:
        wait_for(container, lambda: answers_ok(port, "/ready"), "puller-worker's /ready")
        status, body = get(port, "/ready")
        assert status == 200, body
        with Publisher(amqp_url) as publisher:
            report = publisher.pull(image, nodes=[node], timeout=60)
        [result] = report.nodes
        assert result.status is Status.PULLED, result
        client = engine.client()
        try:
            assert client.images.get(image).id == result.image_id
        finally:
            with contextlib.suppress(docker.errors.ImageNotFound):  # leave the shared
                client.images.remove(image, force=True)  # cluster's engine as it was
            client.close()
        wait_for(container, lambda: health(container) == "healthy", "puller-worker healthy")


def test_worker_image_pulls_into_a_mounted_containerd_with_its_own_ctr(
    images: PullerImages,
    host_docker: docker.DockerClient,
    rabbitmq: RabbitMqContainer,
    cluster: LocalCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A node without Docker: the image's ``ctr`` against the node's containerd socket,
    as nobody with the socket's group, into the kubelet's namespace."""
    node_containerd = NodeContainerd("containerd", tmp_path_factory.mktemp("containerd"))
    node_containerd.start()
    try:
        amqp_url = broker_url_for_host_network(rabbitmq)
        node = f"image-{uuid.uuid4().hex[:6]}"
        port = free_port()
        image = cluster.registry.push_files(
            f"test/image-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
        )
        socket_path = node_containerd.socket
        with running(
            host_docker,
            images.worker,
            user=NOBODY,
            group_add=[str(socket_path.stat().st_gid)],
            volumes={str(socket_path): {"bind": "/run/containerd/containerd.sock", "mode": "rw"}},
            environment={
                "PULLER_AMQP_URL": amqp_url,
                "PULLER_NODE_NAME": node,
                "PULLER_HEALTH_PORT": str(port),
                "PULLER_IMAGE_STORE": "containerd",
            },
        ) as container:
            wait_for(container, lambda: answers_ok(port, "/ready"), "puller-worker's /ready")
            with Publisher(amqp_url) as publisher:
                report = publisher.pull(image, nodes=[node], timeout=60)
                [result] = report.nodes
                assert result.status is Status.PULLED, (result, logs(container))
                [again] = publisher.pull(image, nodes=[node], timeout=60).nodes
                assert again.status is Status.PRESENT, again
            listed = node_containerd.ctr("images", "ls", "-q").split()
            assert image in listed, listed
    finally:
        node_containerd.remove()


@dataclass(frozen=True)
class ComposeSystem:
    project: str
    http_port: int
    registry_port: int

    def container(self, client: docker.DockerClient, service: str) -> Container:
        labels = [f"com.docker.compose.project={self.project}"]
        labels.append(f"com.docker.compose.service={service}")
        [container] = client.containers.list(filters={"label": labels})
        return container


@pytest.fixture
def compose_system(
    host_docker: docker.DockerClient, images: PullerImages
) -> Iterator[ComposeSystem]:
    """``docker-compose up`` of the project's docker-compose.yml on ports of its own, with
    the images built here; ``down --volumes`` after."""
    system = ComposeSystem(
        project=f"pullersmoke{uuid.uuid4().hex[:8]}",
        http_port=free_port(),
        registry_port=free_port(),
    )
    env = {
        **os.environ,
        "RABBITMQ_IMAGE": ensure_rabbitmq_image(host_docker),
        "REGISTRY_IMAGE": ensure_registry_image(host_docker),
        "ENGINE_IMAGE": build_engine_image(host_docker),
        "WORKER_IMAGE": images.worker,
        "HTTP_IMAGE": images.http,
        "AMQP_HOST_PORT": str(free_port()),
        "HTTP_HOST_PORT": str(system.http_port),
        "REGISTRY_HOST_PORT": str(system.registry_port),
    }
    compose = [
        "docker-compose",
        "--project-name",
        system.project,
        "--file",
        str(PROJECT_ROOT / "docker-compose.yml"),
    ]
    try:
        up = subprocess.run(
            [*compose, "up", "--detach", "--no-build"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert up.returncode == 0, up.stderr[-4000:]
        yield system
    finally:
        logs = subprocess.run(
            [*compose, "logs", "--no-color", "--tail", "30"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        print(logs.stdout[-6000:])  # shown when the test fails
        # --timeout: the RabbitMQ stand-in's PID 1 is a shell that ignores SIGTERM; nothing
        # here has work in flight that a short grace would cut.
        down = subprocess.run(
            [*compose, "down", "--volumes", "--remove-orphans", "--timeout", "2"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert down.returncode == 0, down.stderr[-4000:]


def test_compose_puts_an_image_on_both_nodes_with_one_pull_images_call(
    compose_system: ComposeSystem, host_docker: docker.DockerClient
) -> None:
    system = compose_system
    wait_until(
        lambda: (
            {row["node"] for row in get(system.http_port, "/nodes")[1]["nodes"]}
            == {"node-1", "node-2"}
        ),
        "both compose workers in puller-http's roster",
        120,
    )
    registry = f"http://127.0.0.1:{system.registry_port}"
    repository = f"smoke/{uuid.uuid4().hex[:10]}"
    push_image(registry, repository, "1", [make_layer({"smoke.txt": uuid.uuid4().bytes})])
    image = f"registry:5000/{repository}:1"  # the registry's name on the compose network

    body = json.dumps({"id": "smoke1", "image_name": image})
    done = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--fail",
            "--header",
            "Content-Type: application/json",
            "--data",
            body,
            f"http://127.0.0.1:{system.http_port}/pull_images",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["pull_images"]
    assert answer["image"] == image
    assert answer["reached_nodes"] is True, answer

    pulls = f"/pulls/{answer['request_id']}"
    wait_until(lambda: get(system.http_port, pulls)[1]["answered"] == 2, "both answers", 60)
    rows = {row["node"]: row for row in get(system.http_port, pulls)[1]["nodes"]}
    assert {node: row["status"] for node, row in rows.items()} == {
        "node-1": "pulled",
        "node-2": "pulled",
    }, rows
    for node in ("node-1", "node-2"):
        engine = system.container(host_docker, f"engine-{node[-1]}")
        found = engine.exec_run(["docker", "image", "inspect", "--format", "{{.Id}}", image])
        assert found.exit_code == 0, found.output.decode(errors="replace")
        assert found.output.decode().strip() == rows[node]["image_id"]


def test_compose_file_names_no_image_that_is_not_a_variable() -> None:
    """Every image in docker-compose.yml can be replaced (machines without Docker Hub)."""
    config = subprocess.run(
        ["docker-compose", "--file", str(PROJECT_ROOT / "docker-compose.yml"), "config"],
        env={
            **os.environ,
            **{
                name: f"example/{name.lower()}:x"
                for name in (
                    "RABBITMQ_IMAGE",
                    "REGISTRY_IMAGE",
                    "ENGINE_IMAGE",
                    "WORKER_IMAGE",
                    "HTTP_IMAGE",
                )
            },
        },
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    images = {
        line.split("image:", 1)[1].strip()
        for line in config.stdout.splitlines()
        if line.strip().startswith("image:")
    }
    assert images == {
        "example/rabbitmq_image:x",
        "example/registry_image:x",
        "example/engine_image:x",
        "example/worker_image:x",
        "example/http_image:x",
    }
