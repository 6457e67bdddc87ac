"""The store contract's cases (tests/stores/conformance.py) on both real stores: the Docker
Engine's on a real ``dockerd``, containerd's on a real ``containerd`` (CRI plugin on), each
pulling from a real registry (one with a login too). The daemons and registries are shared by
the module; each case pushes images of its own."""

from __future__ import annotations

import http.server
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from contract import ImageReference, parse_reference
from localcluster.engines import NodeContainerd, NodeEngine
from localcluster.registry import MANIFEST_V2, Login, Registry
from tests.integration.tcp_proxy import TcpProxy
from tests.stores.conformance import Harness, Private, Published, Store, StoreConformance
from worker.stores.containerd import ContainerdStore
from worker.stores.docker import DockerEngine
from worker.stores.registry_logins import DockerConfig

pytestmark = pytest.mark.integration

STALL_TIMEOUT = 2.0
THROTTLE = 1_000_000
"""Bytes a second through a throttled way to the registry."""
USER = "conformance"
PASSWORD = f"pw-{uuid.uuid4().hex}"


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A registry that answers everything with 503."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Registries:
    root: Path
    open: Registry
    private: Registry
    failing: http.server.ThreadingHTTPServer


@pytest.fixture(scope="module")
def registries() -> Iterator[Registries]:
    root = Path(tempfile.mkdtemp(prefix="pt-conformance-", dir="/tmp"))
    made = Registries(
        root,
        Registry(root / "registry"),
        Registry(root / "private", login=Login(USER, PASSWORD)),
        http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable),
    )
    threading.Thread(target=made.failing.serve_forever, daemon=True).start()
    try:
        made.open.start()
        made.private.start()
        yield made
    finally:
        made.failing.shutdown()
        made.failing.server_close()
        made.open.remove()
        made.private.remove()
        shutil.rmtree(root, ignore_errors=True)


class RealHarness:
    """What both real harnesses share: the registries, and ways to them."""

    stall_timeout = STALL_TIMEOUT

    def __init__(self, registries: Registries, directory: Path) -> None:
        self.registries = registries
        self.directory = directory
        self.stores: list[Store] = []
        self.proxies: list[TcpProxy] = []

    def close(self) -> None:
        for store in self.stores:
            store.close()
        for proxy in self.proxies:
            proxy.close()

    def made(self, store: Store) -> Store:
        self.stores.append(store)
        return store

    def publish(self, size: int = 0, registry: Registry | None = None) -> Published:
        registry = registry or self.registries.open
        repository = f"conformance/{uuid.uuid4().hex[:10]}"
        if size:
            name = registry.push_sized(repository, "1", [size])
        else:
            name = registry.push_files(repository, "1", {"f": uuid.uuid4().bytes})
        manifest = requests.get(
            f"{registry.url}/v2/{repository}/manifests/1",
            headers={"Accept": MANIFEST_V2},
            auth=None if registry.login is None else registry.login.basic,
            timeout=30,
        )
        manifest.raise_for_status()
        layers = manifest.json()["layers"]
        return Published(
            parse_reference(name),
            manifest.json()["config"]["digest"],
            manifest.headers["Docker-Content-Digest"],
            sum(layer["size"] for layer in layers),
        )

    def missing(self) -> ImageReference:
        return parse_reference(f"{self.registries.open.address}/conformance/none:nope")

    def private(self) -> Private:
        return Private(self.publish(registry=self.registries.private), USER, PASSWORD)

    def throttled(self, image: ImageReference) -> ImageReference:
        proxy = self._proxy()
        proxy.throttle(THROTTLE)
        return ImageReference(proxy.address, image.path, image.tag, image.digest)

    def silent(self, image: ImageReference) -> ImageReference:
        proxy = self._proxy()
        proxy.go_silent_after(500_000)
        return ImageReference(proxy.address, image.path, image.tag, image.digest)

    def unreachable(self) -> ImageReference:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return parse_reference(f"127.0.0.1:{port}/conformance/x:1")

    def failing(self) -> ImageReference:
        port = self.registries.failing.server_address[1]
        return parse_reference(f"127.0.0.1:{port}/conformance/x:1")

    def _proxy(self) -> TcpProxy:
        proxy = TcpProxy(("127.0.0.1", self.registries.open.port))
        self.proxies.append(proxy)
        return proxy


class DockerHarness(RealHarness):
    def __init__(self, registries: Registries, directory: Path, engine: NodeEngine) -> None:
        super().__init__(registries, directory)
        self.engine = engine
        self.client = engine.client()

    def close(self) -> None:
        super().close()
        self.client.close()

    def store(self, docker_config: DockerConfig | None = None, pull_timeout: float = 60) -> Store:
        return self.made(
            DockerEngine(
                self.engine.docker_host,
                stall_timeout=STALL_TIMEOUT,
                pull_timeout=pull_timeout,
                docker_config=docker_config or DockerConfig(self.directory),
            )
        )

    def away_store(self) -> Store:
        return self.made(
            DockerEngine("unix:///nonexistent/docker.sock", stall_timeout=2, pull_timeout=60)
        )

    def remove(self, name: str) -> None:
        self.client.images.remove(name)

    def tag(self, name: str, other: str) -> None:
        repository, _, tag = other.rpartition(":")
        assert self.client.images.get(name).tag(repository, tag)

    def use(self, name: str) -> Callable[[], None]:
        container = self.client.containers.create(name, command=["/f"])
        return lambda: container.remove(force=True)

    def data_root(self) -> str:
        return str(self.engine.root / "data")


class ContainerdHarness(RealHarness):
    def __init__(self, registries: Registries, directory: Path, node: NodeContainerd) -> None:
        super().__init__(registries, directory)
        self.node = node

    def store(self, docker_config: DockerConfig | None = None, pull_timeout: float = 60) -> Store:
        return self.made(
            ContainerdStore(
                str(self.node.socket),
                stall_timeout=STALL_TIMEOUT,
                pull_timeout=pull_timeout,
                docker_config=docker_config or DockerConfig(self.directory),
                root=str(self.node.root / "root"),
            )
        )

    def away_store(self) -> Store:
        return self.made(
            ContainerdStore("/nonexistent/containerd.sock", stall_timeout=2, pull_timeout=60)
        )

    def remove(self, name: str) -> None:
        self.node.ctr("images", "rm", name)

    def tag(self, name: str, other: str) -> None:
        self.node.ctr("images", "tag", name, other)

    def use(self, name: str) -> Callable[[], None]:
        container = f"c-{uuid.uuid4().hex[:8]}"
        self.node.ctr("containers", "create", name, container, "/f")

        def remove() -> None:
            self.node.ctr("containers", "rm", container)

        return remove

    def data_root(self) -> str:
        return str(self.node.root / "root")


@pytest.fixture(scope="module")
def engine() -> Iterator[NodeEngine]:
    node = NodeEngine("conformance", Path(tempfile.mkdtemp(prefix="pt-docker-", dir="/tmp")))
    try:
        node.start()
        yield node
    finally:
        node.remove()


@pytest.fixture(scope="module")
def containerd() -> Iterator[NodeContainerd]:
    node = NodeContainerd("conformance", Path(tempfile.mkdtemp(prefix="pt-cd-", dir="/tmp")))
    try:
        node.start()
        yield node
    finally:
        node.remove()


class TestDockerStore(StoreConformance):
    @pytest.fixture
    def harness(
        self, registries: Registries, engine: NodeEngine, tmp_path: Path
    ) -> Iterator[Harness]:
        made = DockerHarness(registries, tmp_path, engine)
        yield made
        made.close()


class TestContainerdStore(StoreConformance):
    @pytest.fixture
    def harness(
        self, registries: Registries, containerd: NodeContainerd, tmp_path: Path
    ) -> Iterator[Harness]:
        made = ContainerdHarness(registries, tmp_path, containerd)
        yield made
        made.close()
