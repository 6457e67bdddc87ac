"""Nodes that were away catch up from the history: real broker, engines, registry, workers."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import pika
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import (
    HISTORY_EXCHANGE,
    HISTORY_STREAM,
    HistoryGap,
    PullRequest,
    Status,
    parse_reference,
    topology,
)
from contract.connection import declare
from contract.stream_tail import Endpoint, Login, read_tail
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.processes import free_port
from publisher import Publisher
from tests.integration.conftest import (
    ROSTER_MAX_AGE,
    engine_has,
    new_vhost,
    start_cluster,
    stream_port,
)
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def own_cluster(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    """Three nodes on a vhost of their own: an empty history. The workers read where it
    ends over the stream protocol."""
    cluster = start_cluster(new_vhost(rabbitmq), PULLER_STREAM_PORT=reads_the_tail(rabbitmq))
    yield cluster
    cluster.remove()


def reads_the_tail(rabbitmq: RabbitMqContainer) -> str:
    """``PULLER_STREAM_PORT`` for the test broker."""
    return str(stream_port(rabbitmq))


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def pulls(worker: WorkerProcess) -> float:
    """Pull attempts the worker started (ended, or running now)."""
    return worker.metric("puller_worker_pulls_total") + pulling(worker)


def pulling(worker: WorkerProcess) -> float:
    return worker.metric("puller_worker_pulls_in_flight")


def replayed(worker: WorkerProcess) -> float:
    return worker.metric("puller_worker_replayed_total")


def ready(worker: WorkerProcess) -> bool:
    return worker.health("/ready")[0] == 200


def pulling_now(worker: WorkerProcess, image: str) -> bool:
    """Whether this run of the worker began pulling ``image`` and has not answered for it,
    as its log says."""
    lines = worker.log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    mine = [e.get("event") for e in events if e.get("image") == image]
    return "pulling" in mine and "answered" not in mine


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
    assert pulls(away) == 1


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
    assert replayed(late) == len(images)

    with Publisher(own_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        wait_for(
            lambda: any(n.node == "node-4" and n.caught_up for n in publisher.nodes()),
            "node-4 caught up in the roster",
        )

    late.stop()
    late.start()
    wait_for(lambda: ready(late), "node-4 ready after a restart")
    assert replayed(late) == 0, "a restart replayed what was done"


def publish_to_history(cluster: LocalCluster, *requests: PullRequest) -> None:
    """Straight into the history, as no publisher would: no live node hears of them."""
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        for request in requests:
            channel.basic_publish(HISTORY_EXCHANGE, "", request.encode())
    finally:
        connection.close()


def test_requests_older_than_the_window_are_not_replayed(own_cluster: LocalCluster) -> None:
    old_image, recent_image = new_image(own_cluster), new_image(own_cluster)
    hour = 3600.0
    publish_to_history(
        own_cluster,
        *(
            PullRequest(
                image=parse_reference(image),
                request_id=uuid.uuid4().hex,
                requested_at=time.time() - age,
            )
            for image, age in ((old_image, 2 * hour), (recent_image, 0.0))
        ),
    )

    own_cluster.worker_env["PULLER_HISTORY_MAX_AGE"] = str(hour)
    late = own_cluster.add_node("node-4")
    wait_for(lambda: ready(late), "node-4 ready")
    assert engine_has(own_cluster, recent_image)["node-4"] is True
    assert engine_has(own_cluster, old_image)["node-4"] is False
    assert late.metric("puller_worker_replay_skipped_total", reason="too_old") == 1
    assert replayed(late) == 1


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
        wait_for(lambda: pulling(late) == 1, "node-4 pulling from the history")
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
        # Into the history only: node-4's replay is the one pull through the proxy and hangs
        # mid-layer, where a stop cancels it. (Pulled live too, by nodes 1 to 3, the proxy's
        # megabyte went to them, and node-4's engine waited for the registry's first answer,
        # which no stop can cut short: its worker took 15 s to exit.)
        publish_to_history(own_cluster, PullRequest.new(parse_reference(slow)))

        own_cluster.worker_env["PULLER_SHUTDOWN_GRACE"] = "1"
        late = own_cluster.add_node("node-4")
        wait_for(
            lambda: (
                all(engine_has(own_cluster, image)["node-4"] for image in done_before)
                and pulling(late) == 1
            ),
            "node-4 done with the first two and replaying the slow pull",
        )
        late.stop()  # SIGTERM mid-pull: the slow pull is cancelled
        late.start()
        wait_for(lambda: pulling(late) == 1, "node-4 replaying again")
        time.sleep(2)
        assert replayed(late) == 1, "only the unfinished pull is replayed"
        assert late.health("/ready")[0] == 503

        proxy.resume()
        wait_for(lambda: ready(late), "node-4 ready once the slow pull ends", timeout=120)
        assert engine_has(own_cluster, slow)["node-4"] is True
        assert pulls(late) == 1
    finally:
        proxy.close()


def test_a_recreated_history_stream_does_not_wedge_workers_that_restart(
    own_cluster: LocalCluster,
) -> None:
    with Publisher(own_cluster.amqp_url) as publisher:
        for _ in range(3):
            assert publisher.pull(new_image(own_cluster), expect=3, timeout=60).ok
    missed_nothing, away = own_cluster.workers[0], own_cluster.workers[2]
    missed_nothing.stop()
    away.stop()
    # What changing the retention takes, or what a broker that lost its disk does:
    # the stream is deleted and declared again, and its offsets start again from 0.
    connection = pika.BlockingConnection(pika.URLParameters(own_cluster.amqp_url))
    try:
        channel = connection.channel()
        channel.queue_delete(HISTORY_STREAM)
        stream = topology.history_stream()
        channel.queue_declare(stream.name, durable=True, arguments=dict(stream.arguments))
        channel.queue_bind(stream.name, HISTORY_EXCHANGE)
    finally:
        connection.close()
    image = new_image(own_cluster)
    with Publisher(own_cluster.amqp_url) as publisher:
        assert publisher.pull(image, nodes=["node-2"], timeout=60).ok

    missed_nothing.start()
    away.start()
    wait_for(lambda: ready(missed_nothing), "node-1 ready after the stream was recreated")
    wait_for(lambda: ready(away), "node-3 ready after the stream was recreated")
    wait_for(lambda: engine_has(own_cluster, image)["node-3"], "the missed image on node-3")
    assert replayed(away) >= 1


def test_a_history_entry_the_worker_dies_on_twice_is_skipped_and_the_rest_replayed(
    rabbitmq: RabbitMqContainer,
) -> None:
    cluster = start_cluster(
        new_vhost(rabbitmq), nodes=0, PULLER_STREAM_PORT=reads_the_tail(rabbitmq)
    )
    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    try:
        before = [new_image(cluster) for _ in range(2)]
        name = f"catch-up/poison-{uuid.uuid4().hex[:8]}"
        cluster.registry.push_sized(name, "1", [8_000_000])
        poison = f"{proxy.address}/{name}:1"  # its pull hangs: the worker is in it when killed
        after = [new_image(cluster) for _ in range(2)]
        proxy.go_silent_after(1_000_000)
        requests = [PullRequest.new(parse_reference(image)) for image in [*before, poison, *after]]
        connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
        try:
            channel = connection.channel()
            for item in topology.shared_declarations():  # a fresh vhost: no worker did yet
                declare(channel, item)
            for request in requests:
                channel.basic_publish(HISTORY_EXCHANGE, "", request.encode())
        finally:
            connection.close()

        cluster.worker_env["PULLER_STALL_TIMEOUT"] = "300"
        node = cluster.add_node("node-1")
        kills = 0
        while not ready(node):
            # Kill -9 (what the OOM killer does) whenever the worker is in that entry's pull.
            assert kills <= 3, "the worker was killed in that entry on every start"
            wait_for(
                lambda: ready(node) or pulling_now(node, poison),
                "the worker caught up, or in the entry that kills it",
            )
            if not ready(node):
                assert node.process is not None
                node.process.kill()
                node.process.wait(10)
                kills += 1
                node.start()
        assert kills == 2, "killed in it on the first two starts, skipped on the third"
        held = {image: engine_has(cluster, image)["node-1"] for image in [*before, poison, *after]}
        assert held == {**dict.fromkeys([*before, *after], True), poison: False}
        assert node.metric("puller_worker_replay_skipped_total", reason="stopped_the_worker") == 1
        assert replayed(node) == len(after), "only what came after it; the rest was done"
        skip = next(
            json.loads(line)
            for line in node.log_path.read_text().splitlines()
            if "skipped a history entry" in line
        )
        assert (skip["level"], skip["request_id"], skip["image"]) == (
            "error",
            requests[2].request_id,
            poison,
        )
    finally:
        proxy.close()
        cluster.remove()


# -- catching up without markers (issue 25) -------------------------------------------------------

SWEEPS = "puller_worker_history_sweeps_total"
DELIVERIES = "puller_worker_history_deliveries_total"


def declare_topology(url: str, history: topology.Queue | None = None) -> None:
    """Puller's shared topology on a fresh vhost, before any worker (``history``: the
    history stream with other settings, which the workers then use as they find it)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for item in topology.shared_declarations(history or topology.history_stream()):
            declare(channel, item)
    finally:
        connection.close()


def publish_confirmed(url: str, requests: list[PullRequest]) -> None:
    """Into the history only (no live node hears of them), each confirmed."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for request in requests:
            channel.basic_publish(HISTORY_EXCHANGE, "", request.encode())
    finally:
        connection.close()


def history_tail(rabbitmq: RabbitMqContainer, url: str) -> int | None:
    vhost = unquote(urlsplit(url).path[1:])
    at = Endpoint("127.0.0.1", stream_port(rabbitmq))
    return read_tail(at, Login("guest", "guest", vhost), HISTORY_STREAM).offset


def first_offset(url: str) -> int:
    """The offset of the history's first entry (what retention left)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        for method, properties, _body in channel.consume(
            HISTORY_STREAM, arguments={"x-stream-offset": "first"}, inactivity_timeout=10
        ):
            assert method is not None, "the history is empty"
            return int(properties.headers["x-stream-offset"])
    finally:
        connection.close()
    raise AssertionError("unreachable")


def logged(worker: WorkerProcess, text: str) -> list[dict[str, object]]:
    events = [
        json.loads(line) for line in worker.log_path.read_text().splitlines() if line[:1] == "{"
    ]
    return [event for event in events if text in str(event.get("event"))]


def test_a_reconnect_reads_only_what_was_missed_and_writes_nothing_into_the_history(
    rabbitmq: RabbitMqContainer,
) -> None:
    url = new_vhost(rabbitmq)
    parts = urlsplit(url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    via_proxy = urlunsplit(parts._replace(netloc=f"guest:guest@{proxy.address}"))
    cluster = start_cluster(via_proxy, nodes=0, PULLER_STREAM_PORT=reads_the_tail(rabbitmq))
    try:
        image = new_image(cluster)
        declare_topology(url)
        publish_confirmed(url, [PullRequest.new(parse_reference(image))])
        tail = history_tail(rabbitmq, url)
        workers = [cluster.add_node(f"node-{number}") for number in (1, 2, 3)]
        wait_for(lambda: all(ready(worker) for worker in workers), "every worker caught up")
        assert tail is not None
        assert history_tail(rabbitmq, url) == tail, "connecting wrote into the history"
        wait_for(lambda: all(w.metric(SWEEPS) == 1 for w in workers), "every worker swept")
        delivered = [worker.metric(DELIVERIES) for worker in workers]

        proxy.cut()  # every worker loses its broker connection, and cannot come back yet
        wait_for(lambda: not any(ready(worker) for worker in workers), "every worker cut off")
        publish_confirmed(url, [PullRequest.new(parse_reference(image)) for _ in range(10)])
        proxy.mend()
        wait_for(
            lambda: all(
                ready(worker) and worker.metric("puller_worker_broker_connections_total") == 2
                for worker in workers
            ),
            "every worker back and caught up",
        )
        assert history_tail(rabbitmq, url) == tail + 10, "the workers wrote into the history"
        wait_for(lambda: all(w.metric(SWEEPS) == 2 for w in workers), "swept on reconnecting")
        assert history_tail(rabbitmq, url) == tail + 10
        for worker, before in zip(workers, delivered, strict=True):
            assert worker.metric(DELIVERIES) - before <= 10 + 2, worker.node
            assert worker.metric("puller_worker_history_tail_reads_total", outcome="tail") == 2
        assert all(engine_has(cluster, image).values())
    finally:
        proxy.close()
        cluster.remove()


@contextlib.contextmanager
def no_keeper(url: str) -> Iterator[None]:
    """Holds the keeper's token (the first consumer of its queue is the active one), so that
    no worker writes the desired state meanwhile."""
    parameters = pika.URLParameters(url)
    parameters.heartbeat = 0  # nothing serves this connection while it holds the token
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(topology.KEEPER_TOKEN.name, lambda *_delivery: None)
        yield
    finally:
        connection.close()


def test_a_history_that_lost_a_nodes_range_with_no_desired_state_says_so_and_replays_the_rest(
    rabbitmq: RabbitMqContainer,
) -> None:
    url = new_vhost(rabbitmq)
    cluster = start_cluster(
        url, nodes=0, PULLER_HISTORY_MAX_AGE="3600", PULLER_STREAM_PORT=reads_the_tail(rabbitmq)
    )
    try:
        before, after = new_image(cluster), new_image(cluster)
        # Small segments and size bound: retention drops the oldest segments within seconds.
        small = topology.Queue(
            HISTORY_STREAM,
            durable=True,
            arguments={
                "x-queue-type": "stream",
                "x-max-length-bytes": 16_000,
                "x-stream-max-segment-size-bytes": 4_000,
            },
        )
        declare_topology(url, small)
        with no_keeper(url):  # no desired state to recover from
            publish_confirmed(url, [PullRequest.new(parse_reference(before))])
            node = cluster.add_node("node-1")
            state = node.state_dir / "history-offset.json"
            wait_for(lambda: ready(node) and state.exists(), "node-1 caught up, its place saved")
            saved = json.loads(state.read_text())["offset"]
            node.stop()

            def filler() -> PullRequest:  # older than the window: skipped, not pulled
                return PullRequest(
                    image=parse_reference("catch-up/filler:1"),
                    request_id=uuid.uuid4().hex,
                    requested_at=time.time() - 7200,
                )

            for _ in range(100):
                if first_offset(url) > saved + 4:
                    break
                publish_confirmed(url, [filler() for _ in range(20)])
            publish_confirmed(url, [PullRequest.new(parse_reference(after))])
            first = first_offset(url)
            lost = first - saved - 2
            assert lost >= 2, "retention dropped node-1's range"

            node.start()
            wait_for(lambda: ready(node), "node-1 caught up with what is left")
            assert engine_has(cluster, after)["node-1"] is True, "what is left was replayed"
            assert node.metric("puller_worker_history_lost_entries_total") == lost
            assert node.metric("puller_worker_history_gaps_total", outcome="unrecovered") == 1
            assert node.metric("puller_worker_history_gap_unrecovered") == 1
            _, body = node.health("/ready")
            assert (body["history_gap"], body["history_lost"]) == ("unrecovered", lost)
            [warning] = logged(node, "the history lost")
            assert (warning["level"], warning["lost"], warning["first_offset"]) == (
                "warning",
                lost,
                first,
            )
            with Publisher(url, roster_max_age=ROSTER_MAX_AGE) as publisher:
                wait_for(
                    lambda: any(
                        info.node == "node-1"
                        and info.history_gap is HistoryGap.UNRECOVERED
                        and info.history_lost == lost
                        for info in publisher.nodes()
                    ),
                    "node-1's loss in the roster",
                )
    finally:
        cluster.remove()


def test_without_the_stream_port_catch_up_finds_the_end_with_a_marker(
    rabbitmq: RabbitMqContainer,
) -> None:
    closed = free_port()  # nothing listens there: what a broker without the plugin is like
    cluster = start_cluster(new_vhost(rabbitmq), nodes=2, PULLER_STREAM_PORT=str(closed))
    try:
        image = new_image(cluster)
        away = cluster.workers[1]
        away.stop()
        with Publisher(cluster.amqp_url) as publisher:
            assert publisher.pull(image, nodes=["node-1"], timeout=60).ok
        away.start()
        wait_for(lambda: engine_has(cluster, image)["node-2"], "the missed image on node-2")
        wait_for(lambda: ready(away), "node-2 ready")
        assert away.metric("puller_worker_history_tail_reads_total", outcome="fallback") == 1
        assert away.metric("puller_worker_history_tail_reads_total", outcome="tail") == 0
        assert logged(away, "finding it with a marker instead")
    finally:
        cluster.remove()
