"""Nodes that were away catch up from the history: real broker, engines, registry, workers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import HISTORY_EXCHANGE, PullRequest, Status, parse_reference
from localcluster.cluster import LocalCluster, WorkerProcess
from publisher import Publisher
from tests.integration.conftest import ROSTER_MAX_AGE, engine_has, new_vhost, start_cluster
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def own_cluster(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    """Three nodes on a vhost of their own: an empty history."""
    cluster = start_cluster(new_vhost(rabbitmq))
    yield cluster
    cluster.remove()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def events(worker: WorkerProcess, name: str) -> list[dict[str, object]]:
    found = []
    for line in worker.log_path.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def ready(worker: WorkerProcess) -> bool:
    return worker.health("/ready")[0] == 200


def new_image(cluster: LocalCluster) -> str:
    return cluster.registry.push_files(
        f"catch-up/{uuid.uuid4().hex[:10]}", "1", {"payload.txt": uuid.uuid4().bytes}
    )


def test_a_pull_published_while_a_worker_was_down_reaches_its_node_when_it_is_back(
    own_cluster: LocalCluster,
) -> None:
    image = new_image(own_cluster)
    away = own_cluster.workers[2]
    away.stop()
    with Publisher(own_cluster.amqp_url) as publisher:
        report = publisher.pull(image, nodes=["node-1", "node-2"], timeout=60)
    assert {r.node: r.status for r in report.nodes} == {
        "node-1": Status.PULLED,
        "node-2": Status.PULLED,
    }
    assert engine_has(own_cluster, image)["node-3"] is False

    away.start()  # no new publish
    wait_for(lambda: engine_has(own_cluster, image)["node-3"], "the image on node-3")
    wait_for(lambda: ready(away), "node-3 ready")
    code, body = away.health("/ready")
    assert (code, body["caught_up"], body["replay_failed"]) == (200, True, 0)
    assert len(events(away, "pulling")) == 1


def test_a_new_node_gets_every_earlier_pull_and_a_restart_keeps_its_place(
    own_cluster: LocalCluster,
) -> None:
    images = [new_image(own_cluster) for _ in range(3)]
    with Publisher(own_cluster.amqp_url) as publisher:
        for image in images:
            assert publisher.pull(image, expect=3, timeout=60).ok

    late = own_cluster.add_node("node-4")
    wait_for(
        lambda: all(engine_has(own_cluster, image)["node-4"] for image in images),
        "every earlier image on node-4",
    )
    wait_for(lambda: ready(late), "node-4 ready")
    assert len(events(late, "replaying")) == len(images)

    with Publisher(own_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        wait_for(
            lambda: any(n.node == "node-4" and n.caught_up for n in publisher.nodes()),
            "node-4 caught up in the roster",
        )

    late.stop()
    late.start()
    wait_for(lambda: ready(late), "node-4 ready after a restart")
    assert events(late, "replaying") == [], "a restart replayed what was done"


def test_requests_older_than_the_window_are_not_replayed(own_cluster: LocalCluster) -> None:
    old_image, recent_image = new_image(own_cluster), new_image(own_cluster)
    hour = 3600.0
    connection = pika.BlockingConnection(pika.URLParameters(own_cluster.amqp_url))
    try:
        channel = connection.channel()
        for image, age in ((old_image, 2 * hour), (recent_image, 0.0)):
            request = PullRequest(
                image=parse_reference(image),
                request_id=uuid.uuid4().hex,
                requested_at=time.time() - age,
            )
            channel.basic_publish(HISTORY_EXCHANGE, "", request.encode())
    finally:
        connection.close()

    own_cluster.worker_env["PULLER_HISTORY_MAX_AGE"] = str(hour)
    late = own_cluster.add_node("node-4")
    wait_for(lambda: ready(late), "node-4 ready")
    assert engine_has(own_cluster, recent_image)["node-4"] is True
    assert engine_has(own_cluster, old_image)["node-4"] is False
    skipped = events(late, "not replaying a request older than the window")
    assert [e["image"] for e in skipped] == [str(parse_reference(old_image))]


def test_ready_waits_for_a_catch_up_pull_held_up_by_a_slow_registry(
    own_cluster: LocalCluster,
) -> None:
    proxy = TcpProxy(("127.0.0.1", own_cluster.registry.port))
    try:
        name = f"catch-up/slow-{uuid.uuid4().hex[:8]}"
        own_cluster.registry.push_sized(name, "1", [8_000_000])
        image = f"{proxy.address}/{name}:1"
        proxy.go_silent_after(1_000_000)  # every pull through it hangs mid-layer
        with Publisher(own_cluster.amqp_url) as publisher:
            publisher.request(image)
        own_cluster.worker_env["PULLER_STALL_TIMEOUT"] = "300"
        late = own_cluster.add_node("node-4")
        wait_for(lambda: bool(events(late, "pulling")), "node-4 pulling from the history")
        time.sleep(2)
        code, body = late.health("/ready")
        assert code == 503, body
        assert body["caught_up"] is False
        assert "catching up" in str(body["reason"])
        assert late.health("/alive")[0] == 200

        proxy.resume()
        wait_for(lambda: ready(late), "node-4 ready once the pull ends", timeout=120)
        assert engine_has(own_cluster, image)["node-4"] is True
    finally:
        proxy.close()


def test_a_worker_restarted_in_the_middle_of_a_replay_neither_pulls_twice_nor_loses_its_place(
    own_cluster: LocalCluster,
) -> None:
    proxy = TcpProxy(("127.0.0.1", own_cluster.registry.port))
    try:
        done_before = [new_image(own_cluster) for _ in range(2)]
        name = f"catch-up/slow-{uuid.uuid4().hex[:8]}"
        own_cluster.registry.push_sized(name, "1", [8_000_000])
        slow = f"{proxy.address}/{name}:1"
        with Publisher(own_cluster.amqp_url) as publisher:
            for image in done_before:
                assert publisher.pull(image, expect=3, timeout=60).ok
            proxy.go_silent_after(1_000_000)
            publisher.request(slow)

        own_cluster.worker_env["PULLER_SHUTDOWN_GRACE"] = "1"
        late = own_cluster.add_node("node-4")
        wait_for(
            lambda: any(e["image"] == slow for e in events(late, "pulling")),
            "node-4 replaying the slow pull",
        )
        assert all(engine_has(own_cluster, image)["node-4"] for image in done_before)
        late.stop()  # SIGTERM mid-pull: the slow pull is cancelled
        late.start()
        wait_for(lambda: bool(events(late, "replaying")), "node-4 replaying again")
        time.sleep(2)
        assert [e["image"] for e in events(late, "replaying")] == [slow]
        assert late.health("/ready")[0] == 503

        proxy.resume()
        wait_for(lambda: ready(late), "node-4 ready once the slow pull ends", timeout=120)
        assert engine_has(own_cluster, slow)["node-4"] is True
        assert [e["image"] for e in events(late, "pulling")] == [slow]
    finally:
        proxy.close()
