"""A registry that requires a login, on real parts: ``docker-registry`` with htpasswd
(bcrypt) auth, real node engines, real workers and a real RabbitMQ.

Two nodes on a vhost of their own: ``node-1`` has no docker config at all (``DOCKER_CONFIG``
unset, a home with no ``.docker``); ``node-2`` has ``DOCKER_CONFIG`` pointing at a directory
whose ``config.json`` each test writes (or removes) while the worker runs, as a Kubernetes
Secret would be mounted and rotated. Every reply and every worker log line is searched for
the password.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import ErrorKind, Status
from localcluster.cluster import LocalCluster
from localcluster.registry import Login, Registry, docker_config
from publisher import Publisher, PullReport
from tests.integration.conftest import ROSTER_MAX_AGE, engine_has, new_vhost, start_cluster
from worker.stores.registry_logins import DockerConfig

pytestmark = pytest.mark.integration

USER = "puller-ci"
PASSWORD = f"pw-{uuid.uuid4().hex}"
"""New for each run, so that finding it anywhere means it leaked from this run."""
WRONG_PASSWORD = f"wrong-{uuid.uuid4().hex}"
NO_CONFIG_NODE = "node-1"
CONFIG_NODE = "node-2"
NODES = (NO_CONFIG_NODE, CONFIG_NODE)


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("private-registry"), login=Login(USER, PASSWORD))
    registry.start()
    yield registry
    registry.remove()


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``node-2``'s ``DOCKER_CONFIG``."""
    return tmp_path_factory.mktemp("docker-config")


@pytest.fixture(scope="module")
def login_cluster(
    rabbitmq: RabbitMqContainer, tmp_path_factory: pytest.TempPathFactory, config_dir: Path
) -> Iterator[LocalCluster]:
    empty_home = tmp_path_factory.mktemp("home-without-docker-config")
    # Empty is unset, for docker and for the worker alike.
    cluster = start_cluster(new_vhost(rabbitmq), nodes=1, DOCKER_CONFIG="", HOME=str(empty_home))
    try:
        cluster.worker_env["DOCKER_CONFIG"] = str(config_dir)
        cluster.add_node(CONFIG_NODE)
    except BaseException:
        cluster.remove()
        raise
    yield cluster
    cluster.remove()


@pytest.fixture
def login_publisher(login_cluster: LocalCluster, config_dir: Path) -> Iterator[Publisher]:
    (config_dir / "config.json").unlink(missing_ok=True)  # each test writes its own
    with Publisher(login_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


@pytest.fixture
def private_image(private_registry: Registry) -> str:
    return private_registry.push_files(
        f"private/{uuid.uuid4().hex[:10]}", "1", {"payload.txt": uuid.uuid4().bytes}
    )


def pull(publisher: Publisher, image: str) -> tuple[PullReport, dict[str, str | None]]:
    """The report, and each node's error kind (``None`` for no error)."""
    report = publisher.pull(image, nodes=NODES, timeout=30)
    assert [r.node for r in report.nodes] == list(NODES), report
    return report, {r.node: r.error.kind if r.error else None for r in report.nodes}


def message(report: PullReport, node: str) -> str:
    result = next(r for r in report.nodes if r.node == node)
    assert result.error is not None, result
    return result.error.message


@pytest.fixture(scope="module")
def secrets(private_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The password, and the encodings of it that a config.json holds and that the worker
    sends its engine (the ``X-Registry-Auth`` header)."""
    directory = docker_config(
        tmp_path_factory.mktemp("right-login"), private_registry.address, USER, PASSWORD
    )
    header = DockerConfig(directory).login(private_registry.address).header
    assert header is not None
    return [PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), header]


def assert_no_credentials(report: PullReport, cluster: LocalCluster, secrets: list[str]) -> None:
    """No secret is in the replies or in any worker's log, which does tell of the pull."""
    replies = json.dumps(report.to_json())
    deadline = time.monotonic() + 10  # a worker may log a pull just after answering it
    while True:
        logs = {w.node: w.log_path.read_text(errors="replace") for w in cluster.workers}
        if all(report.request_id in log for log in logs.values()):
            break
        assert time.monotonic() < deadline, "a worker's log says nothing of the pull"
        time.sleep(0.05)
    for secret in secrets:
        assert secret not in replies
        for node, log in logs.items():
            assert secret not in log, f"{node}'s log holds a credential"


def test_without_a_login_each_node_answers_unauthorized_and_says_what_to_do(
    login_cluster: LocalCluster,
    login_publisher: Publisher,
    private_registry: Registry,
    private_image: str,
    config_dir: Path,
    secrets: list[str],
) -> None:
    report, kinds = pull(login_publisher, private_image)

    assert kinds == dict.fromkeys(NODES, ErrorKind.UNAUTHORIZED), report
    address = private_registry.address
    for node in NODES:
        text = message(report, node)
        assert f"registry {address} needs a login" in text
        assert "give the worker a docker config.json with credentials for it" in text
        assert "DOCKER_CONFIG=dir" in text
    assert "(DOCKER_CONFIG unset): no such file" in message(report, NO_CONFIG_NODE)
    assert f"{config_dir / 'config.json'} (DOCKER_CONFIG={config_dir}): no such file" in message(
        report, CONFIG_NODE
    )
    assert_no_credentials(report, login_cluster, secrets)


def test_a_login_for_another_registry_is_no_login(
    login_cluster: LocalCluster,
    login_publisher: Publisher,
    private_registry: Registry,
    private_image: str,
    config_dir: Path,
    secrets: list[str],
) -> None:
    docker_config(config_dir, "127.0.0.1:1", USER, PASSWORD)

    report, kinds = pull(login_publisher, private_image)

    assert kinds == dict.fromkeys(NODES, ErrorKind.UNAUTHORIZED), report
    assert f"no login for {private_registry.address}" in message(report, CONFIG_NODE)
    assert_no_credentials(report, login_cluster, secrets)


def test_wrong_credentials_are_unauthorized_and_say_which_file_to_correct(
    login_cluster: LocalCluster,
    login_publisher: Publisher,
    private_registry: Registry,
    private_image: str,
    config_dir: Path,
    secrets: list[str],
) -> None:
    docker_config(config_dir, private_registry.address, USER, WRONG_PASSWORD)

    report, kinds = pull(login_publisher, private_image)

    assert kinds == dict.fromkeys(NODES, ErrorKind.UNAUTHORIZED), report
    text = message(report, CONFIG_NODE)
    assert f"registry {private_registry.address} refused the worker's login" in text
    assert str(config_dir / "config.json") in text
    assert WRONG_PASSWORD not in text
    assert_no_credentials(report, login_cluster, secrets)


def test_with_the_login_in_docker_config_the_pull_succeeds(
    login_cluster: LocalCluster,
    login_publisher: Publisher,
    private_registry: Registry,
    private_image: str,
    config_dir: Path,
    secrets: list[str],
) -> None:
    # Written while the worker runs: the worker reads it at the pull, not at its start.
    docker_config(config_dir, private_registry.address, USER, PASSWORD)

    report, kinds = pull(login_publisher, private_image)

    assert kinds == {NO_CONFIG_NODE: ErrorKind.UNAUTHORIZED, CONFIG_NODE: None}, report
    pulled = next(r for r in report.nodes if r.node == CONFIG_NODE)
    assert pulled.status is Status.PULLED
    assert pulled.digest == private_registry.manifest_digest(*repository_and_tag(private_image))
    assert engine_has(login_cluster, private_image) == {NO_CONFIG_NODE: False, CONFIG_NODE: True}
    assert_no_credentials(report, login_cluster, secrets)


def test_a_corrected_login_is_used_from_the_next_pull_without_a_restart(
    login_cluster: LocalCluster,
    login_publisher: Publisher,
    private_registry: Registry,
    private_image: str,
    config_dir: Path,
    secrets: list[str],
) -> None:
    docker_config(config_dir, private_registry.address, USER, WRONG_PASSWORD)
    assert pull(login_publisher, private_image)[1][CONFIG_NODE] is ErrorKind.UNAUTHORIZED

    docker_config(config_dir, private_registry.address, USER, PASSWORD)  # the Secret, rotated
    report, kinds = pull(login_publisher, private_image)

    assert kinds[CONFIG_NODE] is None, report
    assert_no_credentials(report, login_cluster, secrets)


def repository_and_tag(image: str) -> tuple[str, str]:
    name, tag = image.rsplit(":", 1)
    return name.split("/", 1)[1], tag
