"""The store contract's cases (tests/stores/conformance.py) on the unit tests' in-memory store
(tests/fakes/store.py): the fake the other unit tests use keeps the contract the real stores
keep."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from contract import ImageReference, parse_reference
from tests.fakes.store import MemoryStore, RegistryImage
from tests.stores.conformance import Harness, Private, Published, StoreConformance
from worker.stores.contract import store_name
from worker.stores.registry_logins import BasicLogin, DockerConfig

REGISTRY = "registry.fake:5000"
PRIVATE = "private.fake:5000"
THROTTLED = "throttled.fake:5000"
SILENT = "silent.fake:5000"
UNREACHABLE = "nothing-listens.fake:5000"
FAILING = "failing.fake:5000"
USER, PASSWORD = "ci", "pw-of-the-fake"
ROOT = "/var/lib/fake"


class MemoryHarness:
    """The in-memory world: the last store made is the daemon the other methods act on."""

    stall_timeout = 0.3

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.registry: dict[str, RegistryImage] = {}
        self.daemon: MemoryStore | None = None
        self.count = itertools.count()

    def store(
        self, docker_config: DockerConfig | None = None, pull_timeout: float = 60
    ) -> MemoryStore:
        self.daemon = MemoryStore(
            registry=self.registry,
            docker_config=docker_config or DockerConfig(self.directory),
            logins={PRIVATE: BasicLogin(USER, PASSWORD)},
            unreachable={UNREACHABLE},
            failing={FAILING},
            silent={SILENT},
            throttled={THROTTLED: 2_000_000},
            stall_timeout=self.stall_timeout,
            pull_timeout=pull_timeout,
            root=ROOT,
        )
        return self.daemon

    def away_store(self) -> MemoryStore:
        store = self.store()
        store.away.set()
        return store

    def publish(self, size: int = 0, domain: str = REGISTRY) -> Published:
        number = next(self.count)
        image = parse_reference(f"{domain}/conformance/n{number}:1")
        served = RegistryImage(f"sha256:{number:064x}", f"sha256:{number + 10**6:064x}", size or 3)
        self.registry[store_name(image)] = served
        pinned = ImageReference(image.domain, image.path, None, served.digest)
        self.registry[store_name(pinned)] = served
        return Published(image, served.image_id, served.digest, served.size)

    def missing(self) -> ImageReference:
        return parse_reference(f"{REGISTRY}/conformance/n{next(self.count)}:nope")

    def private(self) -> Private:
        return Private(self.publish(domain=PRIVATE), USER, PASSWORD)

    def throttled(self, image: ImageReference) -> ImageReference:
        return self._by(THROTTLED, image)

    def silent(self, image: ImageReference) -> ImageReference:
        return self._by(SILENT, image)

    def unreachable(self) -> ImageReference:
        return parse_reference(f"{UNREACHABLE}/conformance/x:1")

    def failing(self) -> ImageReference:
        return parse_reference(f"{FAILING}/conformance/x:1")

    def remove(self, name: str) -> None:
        self._daemon().drop(name)

    def tag(self, name: str, other: str) -> None:
        daemon = self._daemon()
        daemon.hold(other, daemon.names[name])

    def use(self, name: str) -> Callable[[], None]:
        daemon = self._daemon()
        image_id = daemon.names[name]
        daemon.use(image_id)
        return lambda: daemon.in_use.discard(image_id)

    def data_root(self) -> str:
        return ROOT

    def _by(self, domain: str, image: ImageReference) -> ImageReference:
        routed = ImageReference(domain, image.path, image.tag, image.digest)
        self.registry[store_name(routed)] = self.registry[store_name(image)]
        return routed

    def _daemon(self) -> MemoryStore:
        assert self.daemon is not None
        return self.daemon


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> Harness:
        return MemoryHarness(tmp_path)
