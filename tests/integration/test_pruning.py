"""Eviction on a real Docker Engine: what is removed, and above all what never is.

One node engine and one registry of its own (no broker: pruning is below the wire). Each
test pulls small images, gives them ages through the usage log, prunes through
``DockerEngine`` and asks the engine itself what is left.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from contract import parse_reference
from localcluster.engines import NodeEngine
from localcluster.registry import Registry
from worker.pruning.disk_watch import DiskWatch, engine_disk
from worker.pruning.pruner import Pruner, PruneRule, prune, read_keep_file
from worker.pruning.usage import UsageLog
from worker.stores.contract import DiskUsage
from worker.stores.docker import DockerEngine

pytestmark = pytest.mark.integration

DAY = 86400.0


class Node:
    def __init__(self, engine: NodeEngine, registry: Registry) -> None:
        self.engine = engine
        self.registry = registry
        self.store = DockerEngine(engine.docker_host, stall_timeout=30, pull_timeout=60)
        self.client = engine.client()

    def image(self, tag: str = "1", size: int | None = None) -> str:
        """A new image in the registry, pulled onto the engine; its name."""
        repository = f"prune/{uuid.uuid4().hex[:10]}"
        if size is None:
            name = self.registry.push_files(repository, tag, {"f": uuid.uuid4().bytes})
        else:
            name = self.registry.push_sized(repository, tag, [size])
        self.store.pull(parse_reference(name))
        return name

    def image_id(self, name: str) -> str:
        return str(self.client.images.get(name).id)

    def has(self, name: str) -> bool:
        try:
            self.client.images.get(name)
        except docker.errors.ImageNotFound:
            return False
        return True

    def clean(self) -> None:
        for container in self.client.containers.list(all=True):
            container.remove(force=True)
        for held in self.client.images.list():
            self.client.images.remove(held.id, force=True)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="pt-prune-", dir="/tmp"))
    registry = Registry(root / "registry")
    engine = NodeEngine("prune-node", root / "engine")
    try:
        registry.start()
        engine.start()
        made = Node(engine, registry)
        yield made
        made.client.close()
        made.store.close()
    finally:
        engine.remove()
        registry.remove()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clean_node(node: Node) -> Iterator[Node]:
    node.clean()
    yield node
    node.clean()


@pytest.fixture
def usage(tmp_path: Path) -> UsageLog:
    return UsageLog(tmp_path / "image-usage.json")


def aged(node: Node, usage: UsageLog, now: float, names: dict[str, float]) -> None:
    """Gives each image a last use ``days`` ago."""
    ids = [node.image_id(name) for name in names]
    usage.saw(ids, now - 400 * DAY)
    for image_id, days in zip(ids, names.values(), strict=True):
        usage.record(image_id, now - days * DAY)


def test_an_image_a_stopped_container_uses_survives(clean_node: Node, usage: UsageLog) -> None:
    node, now = clean_node, 1e10
    used, unused = node.image(), node.image()
    aged(node, usage, now, {used: 90, unused: 90})
    container = node.client.containers.create(used, command=["/payload"])  # never started
    outcome = prune(node.store, PruneRule(unused_for=30 * DAY), usage, now)
    assert node.has(used) and not node.has(unused)
    assert outcome.kept_in_use == 1
    assert [r.names for r in outcome.removed] == [(unused,)]
    assert outcome.bytes_freed > 0 and outcome.errors == ()
    container.remove()


def test_the_keep_list_survives_and_a_many_named_image_goes_whole(
    clean_node: Node, usage: UsageLog, tmp_path: Path
) -> None:
    node, now = clean_node, 1e10
    kept, by_digest, doomed = node.image(), node.image(), node.image()
    # A second repository and tag for the doomed image: removable only name by name.
    second = f"{node.registry.address}/prune/alias"
    node.client.images.get(doomed).tag(second, "x")
    node.client.images.get(doomed).tag(second, "y")
    digest_reference = node.client.images.get(by_digest).attrs["RepoDigests"][0]
    keep_file = tmp_path / "keep.txt"
    keep_file.write_text(f"# never these\n{kept}\n\n{digest_reference}  # pinned\n")
    aged(node, usage, now, {kept: 60, by_digest: 60, doomed: 60})
    rule = PruneRule(unused_for=30 * DAY, keep=read_keep_file(keep_file))
    outcome = prune(node.store, rule, usage, now)
    assert node.has(kept) and node.has(by_digest)
    assert not node.has(doomed) and not node.has(f"{second}:x") and not node.has(f"{second}:y")
    assert outcome.kept_listed == 2 and len(outcome.removed) == 1
    assert set(outcome.removed[0].names) == {doomed, f"{second}:x", f"{second}:y"}


def test_a_dry_run_removes_nothing(clean_node: Node, usage: UsageLog) -> None:
    node, now = clean_node, 1e10
    names = [node.image(), node.image()]
    aged(node, usage, now, dict.fromkeys(names, 45.0))
    before = sorted(i.id for i in node.client.images.list())
    outcome = prune(node.store, PruneRule(unused_for=30 * DAY, dry_run=True), usage, now)
    assert sorted(i.id for i in node.client.images.list()) == before
    assert outcome.dry_run and len(outcome.removed) == 2 and outcome.bytes_freed > 0


def test_oldest_unused_first_within_a_budget(clean_node: Node, usage: UsageLog) -> None:
    node, now = clean_node, 1e10
    a, b, c, d = (node.image(size=20_000) for _ in range(4))
    aged(node, usage, now, {a: 10, b: 40, c: 20, d: 1})
    outcome = prune(node.store, PruneRule(bytes_to_free=30_000), usage, now)
    assert [r.names for r in outcome.removed] == [(b,), (c,)]
    assert outcome.bytes_freed >= 30_000
    assert [node.has(x) for x in (a, b, c, d)] == [True, False, False, True]


def test_over_the_high_water_mark_the_node_prunes_down_to_the_low_mark(
    clean_node: Node, usage: UsageLog, tmp_path: Path
) -> None:
    node = clean_node
    size = 100_000
    names = [node.image(size=size) for _ in range(5)]
    now = time.time()
    aged(node, usage, now, dict(zip(names, (5.0, 4.0, 3.0, 2.0, 0.0), strict=True)))
    keep_file = tmp_path / "keep"
    keep_file.write_text(f"{names[0]}\n")  # the oldest, but listed
    node.client.containers.create(names[1], command=["/x"])  # the next, but in use

    real = engine_disk(node.store, None)  # the engine's data root is visible here
    assert real.total > 0

    def simulated() -> DiskUsage:
        """A disk of 1 MB holding 400 kB of other data plus the engine's images (real)."""
        used = 400_000 + sum(i.size_bytes for i in node.store.images())
        return DiskUsage(real.path, 1_000_000, used, 1_000_000 - used)

    assert simulated().used_percent >= 89  # 900 kB of 1 MB
    watch = DiskWatch(
        Pruner(node.store, usage),
        simulated,
        high_water=85,
        low_water=75,
        keep_file=keep_file,
        min_idle=3600,
    )
    outcome = watch.check()
    assert outcome is not None
    # Oldest first, skipping the listed and the used ones, until under 75 %; the image
    # used just now is never taken.
    assert [r.names for r in outcome.removed] == [(names[2],), (names[3],)]
    assert [node.has(n) for n in names] == [True, True, False, False, True]
    assert simulated().used_percent < 75
    assert watch.check() is None  # under the mark now
