"""Running a fleet of images on real parts: warm-ups, the session lane overtaking them,
where an image is (and drift), a refresh, pruning over the wire, and what a worker from
before these request types answers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import PruneResult, Status
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.prune_race import race_round
from publisher import Publisher
from publisher.report import WarmReport
from tests.integration.conftest import (
    ROSTER_MAX_AGE,
    engine_has,
    new_vhost,
    old_worker_command,
    old_worker_source,
    run_cli,
    start_cluster,
)
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

NODES = 2


@pytest.fixture(scope="module")
def fleet(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    """One pull at a time per node, so that queueing shows."""
    cluster = start_cluster(new_vhost(rabbitmq), nodes=NODES, PULLER_MAX_CONCURRENT_PULLS="1")
    yield cluster
    cluster.remove()


@pytest.fixture
def fleet_publisher(fleet: LocalCluster) -> Iterator[Publisher]:
    with Publisher(fleet.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


@pytest.fixture
def proxy(fleet: LocalCluster) -> Iterator[TcpProxy]:
    proxy = TcpProxy(("127.0.0.1", fleet.registry.port))
    yield proxy
    proxy.close()


def push(cluster: LocalCluster, size: int = 0, name: str | None = None, tag: str = "1") -> str:
    name = name or f"test/fleet-{uuid.uuid4().hex[:8]}"
    if size:
        cluster.registry.push_sized(name, tag, [size])
        return f"{cluster.registry.address}/{name}:{tag}"
    return cluster.registry.push_files(name, tag, {"payload.txt": uuid.uuid4().bytes})


def test_a_warm_up_puts_every_image_on_every_node(
    fleet: LocalCluster, fleet_publisher: Publisher, tmp_path: Path
) -> None:
    images = [push(fleet) for _ in range(6)]
    listing = tmp_path / "images.txt"
    listing.write_text("# the new set\n" + "\n".join(images) + "\n\n" + images[0] + "  # again\n")
    done = run_cli("--amqp-url", fleet.amqp_url, "warm", str(listing), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["images"] == 6
    assert sorted(row["node"] for row in report["nodes"]) == sorted(w.node for w in fleet.workers)
    assert all(row["answered"] == 6 and row["failed"] == 0 for row in report["nodes"])
    for image in images:
        assert all(engine_has(fleet, image).values()), image


def test_a_warm_up_file_saved_with_a_byte_order_mark_is_read(
    fleet: LocalCluster, tmp_path: Path
) -> None:
    image = push(fleet)
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + f"{image}\r\n".encode())  # as Notepad saves it
    done = run_cli("--amqp-url", fleet.amqp_url, "warm", str(listing), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 1
    assert all(engine_has(fleet, image).values())


def test_a_warm_up_reports_failures_by_kind_and_a_bad_file_sends_nothing(
    fleet: LocalCluster, tmp_path: Path
) -> None:
    good = push(fleet)
    missing = f"{fleet.registry.address}/test/none-{uuid.uuid4().hex[:8]}:1"
    listing = tmp_path / "images.txt"
    listing.write_text(f"{good}\n{missing}\n")
    done = run_cli("--amqp-url", fleet.amqp_url, "warm", str(listing))
    assert done.returncode == 1
    assert f"failed: {NODES} x not_found" in done.stdout
    assert missing in done.stdout

    broken = tmp_path / "broken.txt"
    fresh = push(fleet)
    broken.write_text(f"{fresh}\nNot An Image!\n")
    refused = run_cli("--amqp-url", fleet.amqp_url, "warm", str(broken))
    assert refused.returncode == 2
    assert "line 2" in refused.stderr
    assert not any(engine_has(fleet, fresh).values())  # nothing was published


def test_a_session_pull_overtakes_a_queued_warm_up(
    fleet: LocalCluster, fleet_publisher: Publisher, proxy: TcpProxy
) -> None:
    # Ten warm-ups that take a while each (one pull at a time per node, a slow link).
    warm = [f"{proxy.address}/{push(fleet, 400_000).split('/', 1)[1]}" for _ in range(10)]
    session = f"{proxy.address}/{push(fleet).split('/', 1)[1]}"
    proxy.throttle(1_000_000)
    finished: dict[str, WarmReport] = {}

    def warm_up() -> None:
        finished["report"] = fleet_publisher.warm(warm, timeout=120)

    thread = threading.Thread(target=warm_up)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (fleet.workers[0].metric("puller_worker_pulls_in_flight") >= 1):
            assert time.monotonic() < deadline, "the warm-up did not start"
            time.sleep(0.05)
        report = fleet_publisher.pull(session, timeout=60)
        # Asked of each node's own engine at once: how many warm-ups it has so far.
        held = [engine_has(fleet, image) for image in warm]
        snapshot = {
            engine.name: sum(found[engine.name] for found in held) for engine in fleet.engines
        }
    finally:
        thread.join(timeout=150)
        proxy.throttle(None)
    assert report.ok, report
    # Each node answered the session while most of its warm-ups were still queued.
    assert len(snapshot) == NODES
    assert all(count <= 3 for count in snapshot.values()), snapshot
    assert finished["report"].ok
    assert all(node.answered == len(warm) for node in finished["report"].by_node.values())


def test_warm_ups_a_killed_worker_had_in_hand_are_pulled_when_it_comes_back(
    fleet: LocalCluster, fleet_publisher: Publisher, proxy: TcpProxy
) -> None:
    # Warm-ups are acknowledged on receipt: the broker forgets them. A worker killed with
    # them in hand must still pull them, from the history, when it comes back.
    warm = [f"{proxy.address}/{push(fleet, 300_000).split('/', 1)[1]}" for _ in range(6)]
    victim = fleet.workers[1]
    proxy.throttle(600_000)
    thread = threading.Thread(target=lambda: fleet_publisher.warm(warm, timeout=5))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while victim.metric("puller_worker_pulls_in_flight") < 1:
            assert time.monotonic() < deadline, "the warm-up did not start"
            time.sleep(0.05)
        assert victim.process is not None
        victim.process.kill()  # SIGKILL: nothing in hand is answered or saved
        victim.process.wait(timeout=10)
        thread.join(timeout=30)
        proxy.throttle(None)
        victim.start()
        deadline = time.monotonic() + 90
        while not all(engine_has(fleet, image)[fleet.engines[1].name] for image in warm):
            assert time.monotonic() < deadline, "the killed worker's warm-ups were lost"
            time.sleep(0.5)
    finally:
        proxy.throttle(None)
        if not victim.alive:
            victim.start()
    # The last image is in the engine a moment before the worker hears its pull end and
    # counts the history entry done: caught up follows, it is not there at once.
    deadline = time.monotonic() + 30
    while victim.metric("puller_worker_caught_up") < 1:
        assert time.monotonic() < deadline, "the restarted worker never caught up"
        time.sleep(0.1)
    assert victim.metric("puller_worker_replayed_total") >= 1  # from the history, not live


def test_status_finds_an_image_and_flags_drift_that_a_refresh_ends(
    fleet: LocalCluster, fleet_publisher: Publisher
) -> None:
    name = f"test/drift-{uuid.uuid4().hex[:8]}"
    image = push(fleet, name=name, tag="latest")
    absent = fleet_publisher.status(image)
    assert {r.status for r in absent.nodes} == {Status.ABSENT}
    assert not absent.ok

    assert fleet_publisher.pull(image).ok
    everywhere = fleet_publisher.status(image)
    assert everywhere.ok and not everywhere.drift
    assert all(r.digest and r.image_id for r in everywhere.nodes)

    push(fleet, name=name, tag="latest")  # the tag moves
    # One node gets the moved tag outside puller (a `docker run` pulling on its own).
    first = fleet.workers[0].node
    client = fleet.engines[0].client()
    try:
        client.images.pull(image)
    finally:
        client.close()
    drifted = run_cli("--amqp-url", fleet.amqp_url, "status", image, "--json")
    assert drifted.returncode == 1
    document = json.loads(drifted.stdout)
    assert document["drift"] is True
    assert len(document["versions"]) == 2
    text = run_cli("--amqp-url", fleet.amqp_url, "status", image).stdout
    assert "DRIFT" in text and "--refresh" in text

    refreshed = run_cli("--amqp-url", fleet.amqp_url, "pull", image, "--refresh", "--json")
    assert refreshed.returncode == 0, refreshed.stderr
    rows = {row["node"]: row["status"] for row in json.loads(refreshed.stdout)["nodes"]}
    assert rows.pop(first) == "present"  # it already had the new image
    assert set(rows.values()) == {"pulled"}
    assert fleet_publisher.status(image).ok


def test_prune_over_the_wire_keeps_the_keep_list_and_a_dry_run_removes_nothing(
    fleet: LocalCluster, fleet_publisher: Publisher, tmp_path: Path
) -> None:
    kept, gone = push(fleet), push(fleet)
    assert fleet_publisher.pull(kept).ok and fleet_publisher.pull(gone).ok
    keep = tmp_path / "keep.txt"
    keep.write_text(f"{kept}\n")

    dry = run_cli(
        "--amqp-url",
        fleet.amqp_url,
        "prune",
        "--unused-for",
        "0s",
        "--keep",
        str(keep),
        "--dry-run",
        "--json",
    )
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert would["dry_run"] is True
    for row in would["nodes"]:
        names = [n for removed in row["removed"] for n in removed["names"]]
        assert gone in names and kept not in names
        assert row["kept_listed"] >= 1
    assert all(engine_has(fleet, gone).values())

    done = fleet_publisher.prune(0.0, keep=[kept])
    assert done.ok, done
    assert done.bytes_freed > 0
    for answer in done.answers:
        assert isinstance(answer, PruneResult)
        assert any(gone in removed.names for removed in answer.removed)
    assert not any(engine_has(fleet, gone).values())
    assert all(engine_has(fleet, kept).values())


def test_a_prune_racing_pulls_never_removes_an_image_a_node_answered_for(
    fleet: LocalCluster, fleet_publisher: Publisher
) -> None:
    # Each round: a prune of images unused for 1 s, and pulls of those images sent as soon
    # as a node has begun removing them (see localcluster/prune_race.py).
    engines = {
        worker.node: engine for worker, engine in zip(fleet.workers, fleet.engines, strict=True)
    }
    for _ in range(2):
        result = race_round(
            fleet_publisher,
            fleet.registry,
            engines,
            images=8,
            unused_for=1.0,
            after_first_removal=True,
        )
        assert result.answered == 8 * NODES
        assert result.lost == (), f"answered present or pulled, then removed: {result.lost}"


def test_a_usage_log_from_a_clock_a_year_ahead_or_with_infinity_keeps_no_image_for_good(
    fleet: LocalCluster, fleet_publisher: Publisher
) -> None:
    ahead, infinite = push(fleet), push(fleet)
    assert fleet_publisher.pull(ahead).ok and fleet_publisher.pull(infinite).ok
    client = fleet.engines[0].client()
    try:
        ids = {name: str(client.images.get(name).id) for name in (ahead, infinite)}
    finally:
        client.close()
    node = fleet.workers[0]
    node.stop()
    year = 365 * 86400.0
    used_ahead = json.dumps({"seen": time.time() - 60, "used": time.time() + year})
    (node.state_dir / "image-usage.json").write_text(
        f'{{"version": 1, "images": {{"{ids[ahead]}": {used_ahead}, '
        f'"{ids[infinite]}": {{"seen": Infinity, "used": Infinity}}}}}}'
    )
    node.start()
    deadline = time.monotonic() + 30
    while any(engine_has(fleet, name)["node-1"] for name in (ahead, infinite)):
        assert time.monotonic() < deadline, "kept: the usage log's times still count"
        assert fleet_publisher.prune(1.0, nodes=["node-1"]).ok
        time.sleep(0.5)
    log = node.log_path.read_text()
    assert "the clock was ahead" in log and "not finite numbers" in log


OLD_COMMIT = "0b8e49e"
"""The last commit before warm-ups, checks and prunes: its worker is an "older worker"."""


@pytest.fixture(scope="module")
def old_worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return old_worker_source(OLD_COMMIT, tmp_path_factory.mktemp("old-worker"))


def test_an_older_worker_answers_the_new_request_types_as_the_contract_says(
    fleet: LocalCluster, fleet_publisher: Publisher, old_worker: Path
) -> None:
    # The worker of the commit before this contract change, run from its own source, on
    # the first node's engine under a name of its own.
    old = WorkerProcess(
        node=f"old-{uuid.uuid4().hex[:6]}",
        docker_host=fleet.engines[0].docker_host,
        amqp_url=fleet.amqp_url,
        log_path=fleet.root / "old-worker.log",
        extra_env=dict(fleet.worker_env),
        command=old_worker_command(old_worker),
    )
    old.start()
    try:
        image = push(fleet)
        status = fleet_publisher.status(image, expect=NODES + 1)
        assert status.older_workers == (old.node,)
        assert {r.status for r in status.nodes if r.node != old.node} == {Status.ABSENT}
        text = run_cli(
            "--amqp-url", fleet.amqp_url, "status", image, "--expect", str(NODES + 1)
        ).stdout
        assert "predates" in text

        pruned = fleet_publisher.prune(10 * 365 * 86400.0, dry_run=True, expect=NODES + 1)
        rows = {row["node"]: row for row in pruned.to_json()["nodes"]}
        assert rows[old.node]["older_worker"] is True
        assert not pruned.ok
        assert all("removed" in row for node, row in rows.items() if node != old.node)

        # A warm-up reaches it too: it does not know the lane and pulls at once.
        warmed = fleet_publisher.warm([image], expect=NODES + 1, timeout=60)
        assert warmed.ok, warmed.to_json()
        assert warmed.by_node[old.node].answered == 1
    finally:
        old.stop()
