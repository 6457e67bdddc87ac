"""Workers whose nodes run containerd, not Docker (``PULLER_IMAGE_STORE=containerd``), on
real parts: two containerd daemons (CRI plugin on, as on a Kubernetes node), a registry,
RabbitMQ, and the worker running ``ctr``."""

from __future__ import annotations

import base64
import gc
import json
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import ErrorKind, PruneResult, PullFailed, Status
from contract.reference import parse_reference
from localcluster.cluster import WorkerProcess
from localcluster.engines import NodeContainerd
from localcluster.registry import Login, Registry, docker_config
from publisher import Publisher
from tests.integration.conftest import PRESENCE_INTERVAL, ROSTER_MAX_AGE, new_vhost
from tests.integration.tcp_proxy import TcpProxy
from worker.pruning.disk_watch import engine_disk
from worker.pruning.pruner import PruneRule, prune
from worker.pruning.usage import UsageLog
from worker.stores.containerd import ContainerdStore
from worker.stores.containerd.events import PROBE_PREFIX
from worker.stores.containerd.platforms import Platform
from worker.stores.contract import ImageInfo, PullProgress
from worker.stores.registry_logins import DockerConfig

pytestmark = pytest.mark.integration

NODES = 2
STALL_TIMEOUT = 3.0
USER = "puller-ci"
PASSWORD = f"pw-{uuid.uuid4().hex}"
DAY = 86400.0
"""New for each run, so that finding it anywhere means it leaked from this run."""


class ContainerdCluster:
    def __init__(self, root: Path, amqp_url: str) -> None:
        self.registry = Registry(root / "registry")
        self.nodes = [NodeContainerd(f"node-{i}", root / f"node-{i}") for i in range(1, 3)]
        self.docker_config = root / "docker-config"
        """Every worker's ``DOCKER_CONFIG``: a test writes ``config.json`` there, as a
        Kubernetes Secret is mounted, and removes it."""
        self.workers = [
            WorkerProcess(
                node=node.name,
                docker_host="unix:///nonexistent/docker.sock",  # not used: containerd is
                amqp_url=amqp_url,
                log_path=node.root / "worker.log",
                extra_env={
                    "PULLER_IMAGE_STORE": "containerd",
                    "CONTAINERD_ADDRESS": str(node.socket),
                    "PULLER_PRESENCE_INTERVAL": str(PRESENCE_INTERVAL),
                    "PULLER_STALL_TIMEOUT": str(STALL_TIMEOUT),
                    "PULLER_PULL_RETRIES": "0",
                    "PULLER_SHUTDOWN_GRACE": "1",
                    "DOCKER_CONFIG": str(self.docker_config),
                },
            )
            for node in self.nodes
        ]

    def start(self) -> None:
        self.registry.start()
        for node in self.nodes:
            node.start()
        for worker in self.workers:  # their startups overlap
            worker.launch()
        for worker in self.workers:
            worker.wait_serving()

    def remove(self) -> None:
        for worker in self.workers:
            worker.stop()
        for node in self.nodes:
            node.remove()
        self.registry.stop()

    def listed(self, node: NodeContainerd, name: str) -> str | None:
        """The digest containerd lists ``name`` under in the kubelet's namespace."""
        for line in node.ctr("images", "ls").splitlines()[1:]:
            columns = line.split()
            if columns and columns[0] == name:
                return columns[2]
        return None


@pytest.fixture(scope="module")
def cluster(rabbitmq: RabbitMqContainer) -> Iterator[ContainerdCluster]:
    built = ContainerdCluster(Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp")), new_vhost(rabbitmq))
    try:
        built.start()
        yield built
    finally:
        built.remove()


@pytest.fixture
def publisher(cluster: ContainerdCluster) -> Iterator[Publisher]:
    for node in cluster.nodes:
        if node.process is None:
            node.start()
    for worker in cluster.workers:
        if not worker.alive:
            worker.start()
    with Publisher(cluster.workers[0].amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


def test_a_pull_puts_the_image_into_every_nodes_containerd_where_the_kubelet_looks(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    repository = f"cd/{uuid.uuid4().hex[:8]}"
    image = cluster.registry.push_sized(repository, "1", [2_000_000])
    digest = cluster.registry.manifest_digest(repository, "1")

    report = publisher.pull(image, expect=NODES, timeout=60)

    assert report.ok, report
    assert sorted(r.node for r in report.nodes) == ["node-1", "node-2"]
    assert {r.status for r in report.nodes} == {Status.PULLED}
    assert {r.digest for r in report.nodes} == {digest}
    manifest = json.loads(cluster.nodes[0].ctr("content", "get", digest))
    assert {r.image_id for r in report.nodes} == {manifest["config"]["digest"]}
    for node in cluster.nodes:
        assert cluster.listed(node, image) == digest, node.ctr("images", "ls")
        assert node.ctr("images", "ls", "-q", namespace="default").strip() == ""

    again = publisher.pull(image, expect=NODES, timeout=60)
    assert {r.status for r in again.nodes} == {Status.PRESENT}, again
    assert {r.digest for r in again.nodes} == {digest}


def test_a_present_image_is_answered_from_memory_until_containerd_says_it_changed(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    """After one look through ``ctr``, ``present`` comes from memory; an image removed
    outside puller is forgotten from containerd's own event, and pulled again."""
    image = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [300_000])
    assert {r.status for r in publisher.pull(image, expect=NODES, timeout=60).nodes} == {
        Status.PULLED
    }
    before = [w.metric("puller_worker_answered_from_memory_total") for w in cluster.workers]
    for _ in range(3):
        report = publisher.pull(image, expect=NODES, timeout=30)
        assert {r.status for r in report.nodes} == {Status.PRESENT}, report
    after = [w.metric("puller_worker_answered_from_memory_total") for w in cluster.workers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]

    removed = cluster.nodes[0]
    removed.ctr("images", "rm", image)
    deadline = time.monotonic() + 10
    while {r.node for r in publisher.status(image, expect=NODES, timeout=30).absent} != {
        removed.name
    }:
        assert time.monotonic() < deadline, "the worker still says present from memory"
        time.sleep(0.2)
    by_node = {r.node: r.status for r in publisher.pull(image, expect=NODES, timeout=60).nodes}
    assert by_node == {"node-1": Status.PULLED, "node-2": Status.PRESENT}
    assert cluster.listed(removed, image) is not None
    for node in cluster.nodes:  # the probes that saw the subscription open are gone
        namespaces = node.ctr("namespaces", "ls", "-q").split()
        assert not [n for n in namespaces if n.startswith(PROBE_PREFIX)], namespaces


@pytest.fixture(scope="module")
def private_registry(cluster: ContainerdCluster) -> Iterator[Registry]:
    registry = Registry(cluster.nodes[0].root.parent / "private", login=Login(USER, PASSWORD))
    registry.start()
    yield registry
    registry.remove()


def test_a_login_in_docker_config_lets_every_node_pull_and_is_never_shown(
    cluster: ContainerdCluster, publisher: Publisher, private_registry: Registry
) -> None:
    image = private_registry.push_files(
        f"cd-private/{uuid.uuid4().hex[:8]}", "1", {"payload.txt": uuid.uuid4().bytes}
    )
    config = cluster.docker_config / "config.json"

    without = publisher.pull(image, expect=NODES, timeout=60)
    assert {r.error.kind for r in without.nodes if r.error} == {ErrorKind.UNAUTHORIZED}, without
    for result in without.nodes:
        assert result.error is not None
        assert f"registry {private_registry.address} needs a login" in result.error.message
        assert f"looked in {config} (DOCKER_CONFIG={cluster.docker_config}): no such file" in (
            result.error.message
        )

    docker_config(cluster.docker_config, private_registry.address, USER, PASSWORD)
    try:
        report = publisher.pull(image, expect=NODES, timeout=60)  # no restart: read at each pull
    finally:
        config.unlink()
    assert report.ok, report
    assert {r.status for r in report.nodes} == {Status.PULLED}
    for node in cluster.nodes:
        assert cluster.listed(node, image) is not None
    replies = json.dumps([without.to_json(), report.to_json()])
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, token):
        assert secret not in replies
        for worker in cluster.workers:
            assert secret not in worker.log_path.read_text(errors="replace"), worker.node


def test_in_process_ctr_gets_the_password_by_terminal_never_on_its_command_line(
    tmp_path: Path, cluster: ContainerdCluster, private_registry: Registry
) -> None:
    """The command line of every process on the node is readable by any other (``ps``):
    sampled all through a slowed pull, ``ctr``'s names the user only."""
    node = cluster.nodes[1]
    store = ContainerdStore(
        str(node.socket),
        stall_timeout=STALL_TIMEOUT,
        pull_timeout=60,
        docker_config=DockerConfig(tmp_path),
    )
    pushed = private_registry.push_sized(f"cd-private/{uuid.uuid4().hex[:8]}", "1", [1_500_000])
    proxy = TcpProxy(("127.0.0.1", private_registry.port))
    image = parse_reference(pushed.replace(private_registry.address, proxy.address))
    seen: list[str] = []
    done = threading.Event()

    def sample_command_lines() -> None:
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    line = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
                except OSError:
                    continue
                if b"images\0pull" in line and str(node.socket).encode() in line:
                    seen.append(line.replace(b"\0", b" ").decode(errors="replace"))
            time.sleep(0.005)

    try:
        docker_config(tmp_path, proxy.address, USER, f"wrong-{PASSWORD}")
        with pytest.raises(PullFailed) as refused:
            store.pull(image)
        assert refused.value.kind is ErrorKind.UNAUTHORIZED
        assert f"registry {proxy.address} refused the worker's login from {tmp_path}" in (
            refused.value.message
        )

        docker_config(tmp_path, proxy.address, USER, PASSWORD)
        proxy.throttle(500_000)  # about 3 s of pulling to be seen in
        sampler = threading.Thread(target=sample_command_lines)
        sampler.start()
        try:
            info = store.pull(image)
        finally:
            done.set()
            sampler.join()
        assert info == store.find_image(image)
    finally:
        proxy.close()
        store.close()
    assert seen, "the sampler never saw ctr's command line"
    assert all(f"--user {USER} " in line for line in seen), seen[:3]
    assert not [line for line in seen if PASSWORD in line]
    gc.collect()  # the terminal's descriptors are closed: an open one would warn and fail


def test_the_roster_names_containerd_and_its_version(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    roster = publisher.nodes()
    assert [n.node for n in roster] == ["node-1", "node-2"]
    version = cluster.nodes[0].ctr("version").split("Server:")[1].split()[1]
    assert {n.engine for n in roster} == {version}


def test_failures_say_what_happened(cluster: ContainerdCluster, publisher: Publisher) -> None:
    missing = f"{cluster.registry.address}/cd/{uuid.uuid4().hex[:8]}:nope"
    report = publisher.pull(missing, expect=NODES, timeout=60)
    assert {r.error.kind for r in report.nodes if r.error} == {ErrorKind.NOT_FOUND}, report
    assert len(report.failed) == NODES

    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    try:
        proxy.close()  # nothing listens there any more
        refused = f"{proxy.address}/cd/x:1"
        report = publisher.pull(refused, expect=NODES, timeout=60)
        kinds = {r.error.kind for r in report.nodes if r.error}
        assert kinds == {ErrorKind.REGISTRY_UNREACHABLE}, report
    finally:
        proxy.close()


def test_a_registry_gone_silent_mid_layer_gives_stalled(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    image = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [6_000_000])
    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    try:
        proxy.go_silent_after(1_000_000)
        started = time.monotonic()
        report = publisher.pull(
            image.replace(cluster.registry.address, proxy.address), expect=NODES, timeout=60
        )
        took = time.monotonic() - started
    finally:
        proxy.close()
    assert {r.error.kind for r in report.nodes if r.error} == {ErrorKind.STALLED}, report
    assert all("PULLER_STALL_TIMEOUT" in r.error.message for r in report.nodes if r.error)
    assert took < 30
    assert all(worker.alive for worker in cluster.workers)


def test_a_stopped_containerd_is_reported_and_the_image_comes_once_it_is_back(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    image = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [500_000])
    down = cluster.nodes[0]
    down.stop()
    try:
        report = publisher.pull(image, expect=NODES, timeout=60)
        by_node = {r.node: r for r in report.nodes}
        assert by_node["node-2"].status is Status.PULLED, report
        failed = by_node["node-1"]
        assert failed.error is not None and failed.error.kind is ErrorKind.ENGINE_UNAVAILABLE
        assert "CONTAINERD_ADDRESS" in failed.error.message
        assert cluster.workers[0].alive
    finally:
        down.start()
    deadline = time.monotonic() + 60
    while cluster.listed(down, image) is None:  # pulled by itself once containerd answers
        assert time.monotonic() < deadline, "the image did not come after containerd was back"
        time.sleep(0.2)


def test_a_prune_over_the_wire_answers_from_every_containerd_node(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    image = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [100_000])
    assert publisher.pull(image, expect=NODES, timeout=60).ok
    before = [node.ctr("images", "ls", "-q") for node in cluster.nodes]

    report = publisher.prune(0, dry_run=True, expect=NODES, timeout=60)

    assert report.ok, report
    assert len(report.answers) == NODES
    for answer in report.answers:
        assert isinstance(answer, PruneResult) and answer.dry_run
        assert any(image in removed.names for removed in answer.removed), answer
    assert [node.ctr("images", "ls", "-q") for node in cluster.nodes] == before


def test_in_process_pruning_removes_every_name_of_what_no_container_uses(
    tmp_path: Path, cluster: ContainerdCluster
) -> None:
    """On a containerd of its own: an image a container was made from (as the kubelet
    makes them, never started) and one on the keep list stay; the rest go whole, every
    name, and their content is collected."""
    node = NodeContainerd("pruned", tmp_path / "containerd")
    node.start()
    store = ContainerdStore(
        str(node.socket), stall_timeout=STALL_TIMEOUT, pull_timeout=60, root=str(node.root)
    )
    usage = UsageLog(tmp_path / "image-usage.json")
    try:
        used, kept, unused, aliased = (
            parse_reference(
                cluster.registry.push_files(f"prune/{uuid.uuid4().hex[:8]}", "1", {"f": b"%d" % n})
            )
            for n in range(4)
        )
        ids = {image: store.pull(image).image_id for image in (used, kept, unused, aliased)}
        second = f"{cluster.registry.address}/prune/alias:{uuid.uuid4().hex[:6]}"
        node.ctr("images", "tag", str(aliased), second)
        node.ctr("containers", "create", str(used), f"c-{uuid.uuid4().hex[:6]}", "/f")
        unused_manifest = cluster.listed(node, str(unused))

        listed = {image.image_id: image for image in store.images()}
        assert set(listed) == set(ids.values())
        assert listed[ids[aliased]].names == tuple(sorted((str(aliased), second)))
        assert store.images_in_use() == {ids[used]}

        now = time.time() + 100 * DAY
        usage.saw(ids.values(), now - 400 * DAY)
        for image_id in ids.values():
            usage.record(image_id, now - 90 * DAY)
        # Kept by the digest of what its tag pointed at, which names no image in the
        # listing: the store gives each tag's repository@digest.
        kept_by_digest = f"{str(kept).rsplit(':', 1)[0]}@{cluster.listed(node, str(kept))}"
        rule = PruneRule(unused_for=30 * DAY, keep=(kept_by_digest,))
        outcome = prune(store, rule, usage, now)

        assert outcome.errors == ()
        assert (outcome.kept_in_use, outcome.kept_listed) == (1, 1)
        assert sorted(r.image_id for r in outcome.removed) == sorted((ids[unused], ids[aliased]))
        assert outcome.bytes_freed > 0
        left = node.ctr("images", "ls", "-q").split()
        assert str(used) in left and str(kept) in left and ids[used] in left
        for gone in (str(unused), str(aliased), second, ids[unused], ids[aliased]):
            assert gone not in left, left
        assert unused_manifest not in node.ctr("content", "ls", "-q").split()
        assert store.remove_image(ids[unused]) is False  # gone already
        assert engine_disk(store, None).total > 0  # PULLER_CONTAINERD_ROOT, as the worker sees it
    finally:
        store.close()
        node.remove()


def test_sigterm_during_a_pull_kills_ctr_and_answers_cancelled(
    cluster: ContainerdCluster, publisher: Publisher
) -> None:
    image = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [20_000_000])
    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    stopping = cluster.workers[0]
    try:
        proxy.throttle(500_000)  # slow, not silent: the pull is moving when the stop comes
        request_id = publisher.request(image.replace(cluster.registry.address, proxy.address))
        deadline = time.monotonic() + 30
        while stopping.metric("puller_worker_pulls_in_flight") < 1:
            assert time.monotonic() < deadline, "the pull did not start"
            time.sleep(0.05)
        stopping.signal(signal.SIGTERM)
        assert stopping.process is not None
        assert stopping.process.wait(timeout=40) == 0
        # Only the stopped node's answer is awaited: the other's throttled pull takes 40 s.
        deadline = time.monotonic() + 30
        while stopping.node not in (answers := {r.node: r for r in publisher.results(request_id)}):
            assert time.monotonic() < deadline, f"no answer from {stopping.node}: {answers}"
            time.sleep(0.05)
    finally:
        proxy.close()
    mine = answers[stopping.node]
    assert mine.error is not None and mine.error.kind is ErrorKind.CANCELLED, mine
    assert "shutting down" in mine.error.message
    leftover = subprocess.run(
        ["pgrep", "-f", f"ctr --address {cluster.nodes[0].socket}"],
        capture_output=True,
        check=False,
    )
    assert leftover.stdout == b"", "a ctr outlived its worker"


def test_in_process_a_pull_can_be_interrupted_and_leaves_nothing_open(
    cluster: ContainerdCluster,
) -> None:
    """The store itself, in this process, where an unclosed pipe or an unreaped ``ctr``
    is a ResourceWarning and fails the test."""
    node = cluster.nodes[1]
    store = ContainerdStore(str(node.socket), stall_timeout=STALL_TIMEOUT, pull_timeout=60)
    small = parse_reference(cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [1]))
    assert store.find_image(small) is None
    assert store.pull(small) == store.find_image(small)

    big = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [20_000_000])
    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    progress: list[PullProgress] = []
    outcome: list[BaseException | ImageInfo] = []
    slow = parse_reference(big.replace(cluster.registry.address, proxy.address))

    def pull() -> None:
        try:
            outcome.append(store.pull(slow, progress.append))
        except PullFailed as failure:
            outcome.append(failure)

    try:
        proxy.throttle(500_000)
        puller = threading.Thread(target=pull)
        puller.start()
        deadline = time.monotonic() + 30
        while not any(p.done for p in progress):
            assert time.monotonic() < deadline, "no progress came"
            time.sleep(0.05)
        store.interrupt(slow)
        puller.join(timeout=10)
    finally:
        proxy.close()
    assert not puller.is_alive()
    failure = outcome[0]
    assert isinstance(failure, PullFailed) and failure.kind is ErrorKind.CANCELLED, failure
    assert "interrupted" in str(failure)
    assert progress[-1].total >= 20_000_000
    gc.collect()


def test_in_process_an_index_is_pulled_for_the_nodes_arm_variant(
    cluster: ContainerdCluster,
) -> None:
    """An index listing arm/v6 before arm/v7: an arm/v7 node fetches and answers arm/v7's
    image, not the first arm one; an arm64 node arm64's. (Any machine unpacks any
    platform's layers; nothing is run.)"""
    node = cluster.nodes[1]
    repository = f"cd/{uuid.uuid4().hex[:8]}"
    platforms = [("arm", "v6"), ("arm", "v7"), ("arm64", ""), ("amd64", "")]
    ids = cluster.registry.push_index(repository, "1", platforms)
    image = parse_reference(f"{cluster.registry.address}/{repository}:1")
    arm_v7 = Platform("linux", "arm", "v7")
    store = ContainerdStore(
        str(node.socket), stall_timeout=STALL_TIMEOUT, pull_timeout=60, node=arm_v7
    )
    assert store.pull(image).image_id == ids["arm/v7"]
    fetched = node.ctr("content", "ls", "-q")
    assert ids["arm/v7"] in fetched and ids["arm/v6"] not in fetched
    arm64 = Platform("linux", "arm64", "v8")
    store = ContainerdStore(
        str(node.socket), stall_timeout=STALL_TIMEOUT, pull_timeout=60, node=arm64
    )
    assert store.pull(image).image_id == ids["arm64/"]


def test_in_process_containerd_or_ctr_killed_mid_pull_says_which(
    tmp_path: Path, cluster: ContainerdCluster
) -> None:
    """containerd killed while a layer is copied is the engine going away (retried, and
    pulled again once it is back), not the registry; a ``ctr`` killed by someone else
    says so."""
    node = NodeContainerd("victim", tmp_path / "containerd")
    node.start()
    store = ContainerdStore(str(node.socket), stall_timeout=STALL_TIMEOUT, pull_timeout=60)
    image = cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [20_000_000])
    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    proxy.throttle(500_000)
    slow = parse_reference(image.replace(cluster.registry.address, proxy.address))

    def pull_and(kill: Callable[[], object]) -> PullFailed:
        progress: list[PullProgress] = []
        outcome: list[PullFailed] = []

        def pull_catching() -> None:
            try:
                store.pull(slow, progress.append)
            except PullFailed as failure:
                outcome.append(failure)

        puller = threading.Thread(target=pull_catching)
        puller.start()
        deadline = time.monotonic() + 30
        while not any(p.done for p in progress):
            assert time.monotonic() < deadline, "no progress came"
            time.sleep(0.05)
        kill()
        puller.join(timeout=30)
        assert not puller.is_alive()
        return outcome[0]

    try:
        killed_ctr = pull_and(
            lambda: subprocess.run(
                ["pkill", "-KILL", "-f", f"ctr --address {node.socket}"], check=True
            )
        )
        assert killed_ctr.kind is ErrorKind.ENGINE_ERROR, killed_ctr
        assert "ctr was killed by SIGKILL, not by puller" in str(killed_ctr)

        def kill_containerd() -> None:
            assert node.process is not None
            node.process.kill()
            node.process.wait()
            node.process = None

        killed_containerd = pull_and(kill_containerd)
        assert killed_containerd.kind is ErrorKind.ENGINE_UNAVAILABLE, killed_containerd
    finally:
        proxy.close()
        node.remove()
    gc.collect()


def test_in_process_the_event_feed_follows_containerd_away_and_back(
    tmp_path: Path, cluster: ContainerdCluster
) -> None:
    """Memory is dropped when containerd goes away (its events could be missed), used again
    once the feed is back, and closing the store leaves no ``ctr events`` behind."""
    node = NodeContainerd("feed", tmp_path / "containerd")
    node.start()
    store = ContainerdStore(str(node.socket), stall_timeout=STALL_TIMEOUT, pull_timeout=60)
    image = parse_reference(cluster.registry.push_sized(f"cd/{uuid.uuid4().hex[:8]}", "1", [1]))

    def known_after_a_look() -> None:
        deadline = time.monotonic() + 15
        while store.known_image(image) is None:
            assert time.monotonic() < deadline, "the image was never answered from memory"
            assert store.find_image(image) is not None
            time.sleep(0.1)

    try:
        store.start()
        store.pull(image)
        known_after_a_look()

        assert node.process is not None
        node.process.kill()
        node.process.wait()
        node.process = None
        deadline = time.monotonic() + 15
        while store.known_image(image) is not None:
            assert time.monotonic() < deadline, "still answered from memory with containerd gone"
            time.sleep(0.05)

        node.start()
        known_after_a_look()
    finally:
        store.close()
        node.remove()
    leftover = subprocess.run(
        ["pgrep", "-f", f"ctr --address {node.socket}"], capture_output=True, check=False
    )
    assert leftover.stdout == b"", "a ctr outlived the store"
    gc.collect()
