"""Real services for the integration suite: RabbitMQ in a container (testcontainers), a real
registry, and one real Docker Engine plus a real ``puller-worker`` per node.

Nothing here skips: a missing service is started, and if it cannot be, the tests fail.
"""

from __future__ import annotations

import io
import os
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import docker
import pytest
import requests
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract.stream_tail import Endpoint, Login, StreamUnavailable, read_tail
from localcluster.broker_cluster import BrokerCluster
from localcluster.cluster import LocalCluster
from localcluster.engines import ensure_host_engine
from localcluster.images import ensure_rabbitmq_image, host_client
from localcluster.processes import free_port, wait_until
from localcluster.tls import Certificates, make_certificates
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


STREAM_PORT = 5552
STREAM_TLS_PORT = 5551


def with_stream_plugin(container: RabbitMqContainer, directory: Path) -> RabbitMqContainer:
    """``container`` with the management and stream plugins enabled (its enabled_plugins
    file, written in ``directory``, mounted read-only)."""
    plugins = directory / "enabled_plugins"
    plugins.write_text("[rabbitmq_management,rabbitmq_stream].\n")
    plugins.chmod(0o644)
    return container.with_volume_mapping(plugins, "/etc/rabbitmq/enabled_plugins")


def stream_config(port: int, tls_port: int | None = None) -> str:
    """rabbitmq.conf lines for the stream listeners, advertised (``Metadata``) at the ports
    published on 127.0.0.1, where the tests reach them."""
    config = f"""\
stream.listeners.tcp.default = {STREAM_PORT}
stream.advertised_host = 127.0.0.1
stream.advertised_port = {port}
"""
    if tls_port is not None:
        config += f"""\
stream.listeners.ssl.default = {STREAM_TLS_PORT}
stream.advertised_tls_host = 127.0.0.1
stream.advertised_tls_port = {tls_port}
"""
    return config


def wait_for_stream_port(port: int, tls: ssl.SSLContext | None = None) -> None:
    """Until the stream plugin answers on ``port`` (it starts after AMQP's listener, and
    Docker's proxy accepts connections before anything listens)."""

    def answers() -> bool:
        try:
            read_tail(Endpoint("127.0.0.1", port), Login(*GUEST, "/", tls), "puller-probe")
        except StreamUnavailable as error:
            return "does not exist" in str(error)
        return True

    wait_until(answers, "RabbitMQ's stream port", 60)


@pytest.fixture(scope="session")
def rabbitmq(
    host_docker: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitMqContainer]:
    """The test broker, its management API published too (see :func:`new_vhost`), and its
    stream port (:func:`stream_port`)."""
    port = free_port()
    directory = tmp_path_factory.mktemp("rabbitmq")
    config = directory / "rabbitmq.conf"
    config.write_text("loopback_users = none\nlisteners.tcp.default = 5672\n" + stream_config(port))
    config.chmod(0o644)  # the broker runs as its own user
    container = with_stream_plugin(
        RabbitMqContainer(ensure_rabbitmq_image(host_docker))
        .with_exposed_ports(MANAGEMENT_PORT)
        .with_bind_ports(STREAM_PORT, port)
        .with_volume_mapping(config, "/etc/rabbitmq/rabbitmq.conf"),
        directory,
    )
    with container:
        base = management_url(container)
        # The plugin starts after AMQP's listener, which is what the container waited for.
        wait_until(lambda: bool(api_get(base, "overview")), "RabbitMQ's management API", 60)
        wait_for_stream_port(port)
        _STREAM_PORTS[int(container.get_exposed_port(5672))] = port
        yield container


_STREAM_PORTS: dict[int, int] = {}
"""The test brokers' stream ports on 127.0.0.1, by their AMQP port there: the clusters'
workers read the history's end where a deployment's would, not through the fallback."""


def stream_port(rabbitmq: RabbitMqContainer) -> int:
    """The test broker's stream-protocol port on 127.0.0.1."""
    return int(rabbitmq.get_exposed_port(STREAM_PORT))


def new_vhost(rabbitmq: RabbitMqContainer) -> str:
    """A fresh vhost on the test broker, so that tests which need an empty one get it. Made
    through the management API: each ``rabbitmqctl`` call costs a second or more."""
    vhost = f"puller-{uuid.uuid4().hex[:8]}"
    base = management_url(rabbitmq)
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    for path, body in ((f"vhosts/{vhost}", None), (f"permissions/{vhost}/guest", everything)):
        response = requests.put(f"{base}/api/{path}", json=body, auth=GUEST, timeout=30)
        assert response.status_code in (201, 204), (path, response.status_code, response.text)
    host = rabbitmq.get_container_host_ip()
    port = rabbitmq.get_exposed_port(5672)
    return f"amqp://guest:guest@{host}:{port}/{quote(vhost, safe='')}"


@pytest.fixture(scope="session")
def amqp_url(rabbitmq: RabbitMqContainer) -> str:
    return new_vhost(rabbitmq)


def old_worker_source(commit: str, target: Path) -> Path:
    """The worker (and what it imports) as it was at ``commit``, unpacked into ``target``:
    run it with its folder first on ``sys.path`` (see :func:`old_worker_command`)."""
    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", commit, "worker", "contract", "serving"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def old_worker_command(source: Path, prelude: str = "") -> list[str]:
    """Runs the worker unpacked at ``source`` (by :func:`old_worker_source`) with this
    interpreter; ``prelude``: Python run after its imports are set up, before it starts."""
    return [
        sys.executable,
        "-c",
        # Its source first on the path (before the working directory's worker/).
        f"import sys, runpy; sys.path.insert(0, {str(source)!r})\n{prelude}\n"
        "runpy.run_module('worker.main', run_name='__main__')",
    ]


def start_cluster(
    amqp_url: str, nodes: int = NODES, registry_port: int = 0, **worker_env: str
) -> LocalCluster:
    root = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    amqp_port = urlsplit(amqp_url.split(",", maxsplit=1)[0]).port
    if amqp_port in _STREAM_PORTS:
        worker_env = {"PULLER_STREAM_PORT": str(_STREAM_PORTS[amqp_port]), **worker_env}
    cluster = LocalCluster(
        root=root,
        amqp_url=amqp_url,
        nodes=nodes,
        registry_port=registry_port,
        worker_env={"PULLER_PRESENCE_INTERVAL": str(PRESENCE_INTERVAL), **worker_env},
    )
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def cluster(amqp_url: str) -> Iterator[LocalCluster]:
    """Shared by tests that leave every node as they found it. Retries come quickly: a pull
    from a registry that cannot be reached fails after its retries (1 + 2 + 4 s by default)."""
    cluster = start_cluster(amqp_url, PULLER_RETRY_DELAY="0.2")
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


def run_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the installed ``puller`` command (the one beside this interpreter); ``env``: more
    variables."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "puller"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


RABBITMQ_TLS_PORT = 5671
TLS_DIRECTORY_IN_CONTAINER = "/etc/rabbitmq/tls"


@dataclass(frozen=True)
class TlsRabbitMq:
    """A broker with TLS (``url``, amqps) and plain AMQP (``plain_url``) on 127.0.0.1, default
    vhost. Its certificate, from ``certificates.ca_file``, names localhost and 127.0.0.1."""

    url: str
    plain_url: str
    certificates: Certificates
    container: RabbitMqContainer
    stream_port: int
    stream_tls_port: int


def rabbitmq_tls_config(directory: str, stream_port: int, stream_tls_port: int) -> str:
    """rabbitmq.conf for both listeners, AMQP's and the stream protocol's; a client
    certificate is checked if sent, not required."""
    return (
        stream_config(stream_port, stream_tls_port)
        + f"""\
loopback_users = none
listeners.tcp.default = 5672
listeners.ssl.default = {RABBITMQ_TLS_PORT}
ssl_options.cacertfile = {directory}/ca.pem
ssl_options.certfile = {directory}/server.pem
ssl_options.keyfile = {directory}/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
"""
    )


def tls_context(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


@pytest.fixture(scope="session")
def tls_rabbitmq(
    host_docker: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRabbitMq]:
    """RabbitMQ from the same image as ``rabbitmq``, with a TLS listener beside the plain one,
    on throwaway certificates (see :mod:`localcluster.tls`)."""
    directory = tmp_path_factory.mktemp("tls-rabbitmq")
    certificates = make_certificates(directory / "certs")
    config = directory / "rabbitmq.conf"
    streams = free_port(), free_port()
    config.write_text(rabbitmq_tls_config(TLS_DIRECTORY_IN_CONTAINER, *streams))
    config.chmod(0o644)  # the broker runs as its own user
    container = with_stream_plugin(
        RabbitMqContainer(ensure_rabbitmq_image(host_docker))
        .with_exposed_ports(RABBITMQ_TLS_PORT)
        .with_bind_ports(STREAM_PORT, streams[0])
        .with_bind_ports(STREAM_TLS_PORT, streams[1])
        .with_volume_mapping(directory / "certs", TLS_DIRECTORY_IN_CONTAINER)
        .with_volume_mapping(config, "/etc/rabbitmq/rabbitmq.conf"),
        directory,
    )
    try:
        try:
            container.start()  # returns once plain AMQP answers
            port = container.get_exposed_port(RABBITMQ_TLS_PORT)
            wait_until(
                lambda: _tls_handshake(port, certificates.ca_file), "RabbitMQ's TLS listener", 30
            )
            wait_for_stream_port(streams[0])
        except Exception as error:
            error.add_note(_container_logs(container))
            raise
        plain_port = container.get_exposed_port(5672)
        yield TlsRabbitMq(
            # The certificate names 127.0.0.1; the host engine publishes ports on it.
            url=f"amqps://guest:guest@127.0.0.1:{port}/",
            plain_url=f"amqp://guest:guest@127.0.0.1:{plain_port}/",
            certificates=certificates,
            container=container,
            stream_port=streams[0],
            stream_tls_port=streams[1],
        )
    finally:
        container.stop()


def _tls_handshake(port: int, cafile: Path) -> bool:
    """Docker's proxy accepts connections before the broker listens; a handshake proves it does."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=2) as connection,
        tls_context(cafile).wrap_socket(connection, server_hostname="127.0.0.1"),
    ):
        return True


def _container_logs(container: RabbitMqContainer) -> str:
    wrapped = container.get_wrapped_container()
    if wrapped is None:
        return "(no container was made)"
    try:
        tail: bytes = wrapped.logs(tail=60)
    except docker.errors.DockerException as error:
        return f"(no container log: {error})"
    return "container log (tail):\n" + tail.decode(errors="replace")


@pytest.fixture(scope="session")
def broker_cluster() -> Iterator[BrokerCluster]:
    """Three fresh RabbitMQ nodes clustered on this machine (never the machine's own broker),
    guest/guest on 127.0.0.1; see :mod:`localcluster.broker_cluster`. Tests that stop a node
    start it again."""
    # Not under pytest's tmp_path: /tmp/pytest-of-root is closed to the rabbitmq user.
    cluster = BrokerCluster(Path(tempfile.mkdtemp(prefix="pt-brokers-", dir="/tmp")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- the management API ------------------------------------------------------------------------


GUEST = ("guest", "guest")
"""The test image's administrator, allowed from non-loopback addresses."""
MANAGEMENT_PORT = 15672


def management_url(rabbitmq: RabbitMqContainer) -> str:
    """The management API: through a published port if the container has one, else at the
    container's own address (the suite's engine runs on this machine, its bridge is routable)."""
    try:
        port = rabbitmq.get_exposed_port(MANAGEMENT_PORT)
    except ConnectionError:
        container = rabbitmq.get_wrapped_container()
        container.reload()
        networks = container.attrs["NetworkSettings"]["Networks"].values()
        address = next(network["IPAddress"] for network in networks if network["IPAddress"])
        return f"http://{address}:{MANAGEMENT_PORT}"
    return f"http://{rabbitmq.get_container_host_ip()}:{port}"


def api_get(base: str, path: str) -> Any:
    response = requests.get(f"{base}/api/{path}", auth=GUEST, timeout=5)
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="session")
def management(rabbitmq: RabbitMqContainer) -> str:
    base = management_url(rabbitmq)
    deadline = time.monotonic() + 60
    while True:  # the plugin starts after AMQP's listener, which is what the fixture waited for
        try:
            api_get(base, "overview")
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        else:
            return base
