"""TLS to RabbitMQ and secrets from files, on a real broker with a TLS listener and a CA
made for the test (see ``tls_rabbitmq``): workers, publisher, CLI and HTTP API all speak
``amqps://``; a wrong CA fails clearly; and the password shows up nowhere."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract import BrokerUnavailable
from contract.connection import BrokerTls
from localcluster.cluster import LocalCluster, WorkerProcess, worker_command
from publisher import Publisher
from publisher.roster import NodeInfo
from tests.integration.conftest import ROSTER_MAX_AGE, TlsRabbitMq, run_cli, start_cluster
from tests.integration.test_least_privilege import as_user

NODES = 2
USER = "puller-tls"
PASSWORD = f"pw-{uuid.uuid4().hex}"
"""Unique enough that finding it anywhere in the output means it leaked."""

seen_output: list[str] = []
"""Everything the tests here were told by puller, searched for the password at the end."""


@pytest.fixture(scope="module")
def secret_url(tls_rabbitmq: TlsRabbitMq) -> str:
    for command in (
        ["rabbitmqctl", "add_user", USER, PASSWORD],
        ["rabbitmqctl", "set_permissions", "-p", "/", USER, ".*", ".*", ".*"],
    ):
        code, output = tls_rabbitmq.container.exec(command)
        assert code == 0, output
    return as_user(tls_rabbitmq.url, USER, PASSWORD)


@pytest.fixture(scope="module")
def url_file(secret_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "amqp-url"
    path.write_text(secret_url + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def tls_env(tls_rabbitmq: TlsRabbitMq, url_file: Path) -> dict[str, str]:
    """How a Kubernetes pod would be given the broker: a mounted Secret and a CA file."""
    return {
        "PULLER_AMQP_URL_FILE": str(url_file),
        "PULLER_TLS_CA_FILE": str(tls_rabbitmq.certificates.ca_file),
    }


@pytest.fixture(scope="module")
def tls_cluster(secret_url: str, tls_env: dict[str, str]) -> Iterator[LocalCluster]:
    cluster = start_cluster(secret_url, NODES, 0, **tls_env)
    yield cluster
    for path in sorted(cluster.root.rglob("*.log")):
        seen_output.append(path.read_text(errors="replace"))
    cluster.remove()


def fresh(cluster: LocalCluster) -> str:
    return cluster.registry.push_files(
        f"tls/{uuid.uuid4().hex[:8]}", "1", {"f.txt": uuid.uuid4().bytes}
    )


def test_a_pull_over_tls_reaches_every_node(
    tls_cluster: LocalCluster, secret_url: str, tls_rabbitmq: TlsRabbitMq
) -> None:
    tls = BrokerTls(ca_file=tls_rabbitmq.certificates.ca_file)
    with Publisher(secret_url, tls=tls, roster_max_age=ROSTER_MAX_AGE) as publisher:
        report = publisher.pull(fresh(tls_cluster), expect=NODES, timeout=60)
    assert report.ok, report.to_json()
    code, listing = tls_rabbitmq.container.exec(
        ["rabbitmqctl", "list_connections", "user", "ssl", "--quiet"]
    )
    assert code == 0
    mine = [line.split() for line in listing.decode().splitlines() if line.startswith(USER)]
    assert len(mine) >= NODES and all(fields[-1] == "true" for fields in mine), listing


def test_the_cli_and_the_http_api_work_over_tls_with_the_url_from_a_file(
    tls_cluster: LocalCluster, tls_env: dict[str, str]
) -> None:
    nodes = run_cli("nodes", "--json", env=tls_env)
    seen_output.extend((nodes.stdout, nodes.stderr))
    assert nodes.returncode == 0, nodes.stderr
    assert len(json.loads(nodes.stdout)["nodes"]) == NODES
    gateway = tls_cluster.start_gateway(0, **tls_env)
    body = json.dumps({"id": "tls-session", "image_name": fresh(tls_cluster)}).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"http://127.0.0.1:{gateway.port}/pull_images", data=body),
        timeout=10,
    ) as response:
        answer = json.loads(response.read())["pull_images"]
    assert answer["reached_nodes"] is True
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/ready", timeout=10) as ready:
        seen_output.append(ready.read().decode())


def test_a_wrong_ca_fails_clearly_and_never_falls_back_to_plain_amqp(
    tls_cluster: LocalCluster, secret_url: str, tls_rabbitmq: TlsRabbitMq
) -> None:
    wrong = BrokerTls(ca_file=tls_rabbitmq.certificates.other_ca_file)
    with (
        Publisher(secret_url, tls=wrong, connect_timeout=3) as publisher,
        pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED") as refused,
    ):
        publisher.request(fresh(tls_cluster))
    seen_output.append(str(refused.value))
    worker = WorkerProcess(
        node="wrong-ca",
        docker_host=tls_cluster.engines[0].docker_host,
        amqp_url=secret_url,
        log_path=tls_cluster.root / "wrong-ca" / "worker.log",
        extra_env={"PULLER_TLS_CA_FILE": str(tls_rabbitmq.certificates.other_ca_file)},
    )
    worker.launch()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, ready = worker.health("/ready")
            except OSError:
                status, ready = 0, {}
            if "CERTIFICATE_VERIFY_FAILED" in str(ready.get("reason", "")):
                break
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        assert status == 503
        seen_output.append(json.dumps(ready))
    finally:
        worker.stop()
    assert "wrong-ca" not in [info.node for info in _roster(secret_url, tls_rabbitmq)]


def test_tls_files_with_a_plain_url_stop_the_worker_at_start(
    tls_rabbitmq: TlsRabbitMq, secret_url: str
) -> None:
    plain = secret_url.replace("amqps://", "amqp://")
    result = subprocess.run(
        worker_command(),
        env={
            "PATH": "/usr/bin:/bin",
            "PULLER_AMQP_URL": plain,
            "PULLER_TLS_CA_FILE": str(tls_rabbitmq.certificates.ca_file),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    seen_output.extend((result.stdout, result.stderr))
    assert result.returncode == 2, result
    assert "amqps://" in result.stderr


def test_a_wrong_password_is_never_repeated(
    tls_rabbitmq: TlsRabbitMq, tls_env: dict[str, str], tmp_path: Path
) -> None:
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    wrong_file = tmp_path / "url"
    wrong_file.write_text(as_user(tls_rabbitmq.url, USER, wrong_password))
    result = run_cli("nodes", env={**tls_env, "PULLER_AMQP_URL_FILE": str(wrong_file)})
    assert result.returncode == 3, result
    assert "ACCESS_REFUSED" in result.stderr or "authentication" in result.stderr.lower()
    assert wrong_password not in result.stdout + result.stderr


def test_the_password_is_in_no_log_line_answer_or_error(tls_cluster: LocalCluster) -> None:
    """Runs last in this module: everything seen above, and every log written so far."""
    for path in sorted(tls_cluster.root.rglob("*.log")):
        seen_output.append(path.read_text(errors="replace"))
    assert len(seen_output) > 5
    leaks = [text[:200] for text in seen_output if PASSWORD in text]
    assert not leaks, leaks


def _roster(url: str, tls_rabbitmq: TlsRabbitMq) -> list[NodeInfo]:
    tls = BrokerTls(ca_file=tls_rabbitmq.certificates.ca_file)
    with Publisher(url, tls=tls, roster_max_age=ROSTER_MAX_AGE) as publisher:
        return list(publisher.nodes())
