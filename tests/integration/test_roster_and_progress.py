"""The roster of live nodes, waits that name the nodes that did not answer, and progress."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pika
import pika.exceptions
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import (
    CONTENT_TYPE,
    PRESENCE_MISSES,
    NodePresence,
    NodeProgress,
    NodeResult,
    PullRequest,
    Status,
    decode_presence_stream,
    parse_reference,
)
from contract import topology as topo
from localcluster.cluster import LocalCluster
from localcluster.processes import wait_until
from publisher import Publisher
from tests.integration.conftest import (
    NODES,
    PRESENCE_INTERVAL,
    ROSTER_MAX_AGE,
    engine_has,
    new_vhost,
    run_cli,
    start_cluster,
)
from tests.integration.test_faults import run_cli_in_background
from worker.presence import JITTER

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_cluster(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    """A cluster of its own, in its own vhost: these tests stop and freeze workers."""
    cluster = start_cluster(new_vhost(rabbitmq))
    yield cluster
    cluster.remove()


@pytest.fixture
def own_publisher(own_cluster: LocalCluster) -> Iterator[Publisher]:
    for worker in own_cluster.workers:  # every node up, whatever an earlier test did
        if not worker.alive:
            worker.start()
    with Publisher(own_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


def node_names(cluster: LocalCluster) -> list[str]:
    return sorted(worker.node for worker in cluster.workers)


def test_the_roster_lists_exactly_the_running_workers(
    own_cluster: LocalCluster, own_publisher: Publisher
) -> None:
    roster = own_publisher.nodes()
    assert [info.node for info in roster] == node_names(own_cluster)
    now = time.time()
    for info in roster:
        assert info.version
        assert info.engine  # the engine's version, asked by the worker
        assert info.started_at <= info.last_seen <= now + 1
        assert now - info.last_seen < ROSTER_MAX_AGE


def test_a_stopped_worker_leaves_the_roster_and_a_restarted_one_returns(
    own_cluster: LocalCluster, own_publisher: Publisher
) -> None:
    leaving = own_cluster.workers[1]
    leaving.stop()  # SIGTERM: it says it is leaving
    assert [i.node for i in own_publisher.nodes()] == [
        n for n in node_names(own_cluster) if n != leaving.node
    ]
    leaving.start()
    assert [i.node for i in own_publisher.nodes()] == node_names(own_cluster)


def test_a_killed_worker_drops_out_after_the_roster_max_age(
    own_cluster: LocalCluster, own_publisher: Publisher
) -> None:
    killed = own_cluster.workers[2]
    killed.signal(signal.SIGKILL)  # no goodbye
    assert killed.process is not None
    killed.process.wait(10)
    deadline = time.monotonic() + ROSTER_MAX_AGE + 3 * PRESENCE_INTERVAL
    while killed.node in [i.node for i in own_publisher.nodes()]:
        assert time.monotonic() < deadline, "a dead node stayed in the roster"
        time.sleep(0.5)


def test_a_frozen_worker_is_reported_no_reply_while_the_others_pull(
    own_cluster: LocalCluster, own_publisher: Publisher
) -> None:
    image, cli_image = (
        own_cluster.registry.push_files(
            f"test/frozen-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
        )
        for _ in range(2)
    )
    frozen = own_cluster.workers[0]
    frozen.signal(signal.SIGSTOP)
    try:
        # The CLI waits out its timeout while the library waits out its own.
        cli = run_cli_in_background(
            "--amqp-url", own_cluster.amqp_url, "pull", cli_image, "--timeout", "5", "--json"
        )
        try:
            started = time.monotonic()
            report = own_publisher.pull(image, timeout=5)  # waits for the whole roster
            waited = time.monotonic() - started
            cli_out, cli_err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
    finally:
        frozen.signal(signal.SIGCONT)
    assert 5 <= waited < 15
    statuses = {r.node: r.status for r in report.nodes}
    assert statuses.pop(frozen.node) is Status.NO_REPLY
    assert set(statuses.values()) == {Status.PULLED}
    assert len(statuses) == NODES - 1
    assert not report.ok
    assert [r.node for r in report.no_reply] == [frozen.node]
    assert cli.returncode == 1
    printed = {n["node"]: n["status"] for n in json.loads(cli_out)["nodes"]}
    assert printed[frozen.node] == "no_reply"
    assert f"did not answer within 5s: {frozen.node}" in cli_err
    has = engine_has(own_cluster, image)
    assert [node for node, there in has.items() if there] == [
        n for n in node_names(own_cluster) if n != frozen.node
    ]


def test_waiting_for_named_nodes(own_cluster: LocalCluster, own_publisher: Publisher) -> None:
    image = own_cluster.registry.push_files(
        f"test/named-{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
    )
    report = own_publisher.pull(image, nodes=["node-1", "node-9"], timeout=3)
    statuses = {r.node: r.status for r in report.nodes}
    assert statuses["node-1"] is Status.PULLED
    assert statuses["node-9"] is Status.NO_REPLY
    assert report.missing == 1
    assert not report.ok


def test_a_large_layer_reports_progress_that_grows_to_the_total(
    own_cluster: LocalCluster, own_publisher: Publisher
) -> None:
    layer = 40_000_000
    image = own_cluster.registry.push_sized(f"test/big-{uuid.uuid4().hex[:8]}", "1", [layer])
    progress: list[NodeProgress] = []
    results: list[NodeResult] = []
    report = own_publisher.pull(
        image, timeout=120, on_progress=progress.append, on_result=results.append
    )
    assert report.ok, report
    assert sorted(r.node for r in results) == node_names(own_cluster)
    for node in node_names(own_cluster):
        mine = [p for p in progress if p.node == node]
        assert len(mine) >= 2, f"{node} sent {len(mine)} progress message(s)"
        dones = [p.done for p in mine]
        assert dones == sorted(dones)
        assert mine[-1].done == mine[-1].total
        assert layer <= mine[-1].total < layer * 1.01  # the compressed layer's size
        assert dones[0] < mine[-1].total


def progress_per_request(amqp_url: str, bodies: dict[str, bytes], nodes: int) -> Counter[str]:
    """Publishes each request body as it is (as any publisher may) on a reply queue of our
    own, waits for every node's result to each, and counts the progress reports that came
    for each request id."""
    counted: Counter[str] = Counter()
    results: Counter[str] = Counter()
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        reply_to = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(reply_to, topo.REPLIES.name, routing_key=reply_to)
        for request_id, body in bodies.items():
            properties = pika.BasicProperties(
                content_type=CONTENT_TYPE, reply_to=reply_to, correlation_id=request_id
            )
            channel.basic_publish(topo.PULLS.name, "", body, properties)
        for _method, _properties, body in channel.consume(reply_to, inactivity_timeout=60):
            assert body is not None, f"answers missing after 60 s: {results}"
            reply = json.loads(body)
            if reply["type"] == "progress":
                counted[reply["request_id"]] += 1
            else:
                assert reply["status"] == "pulled", reply
                results[reply["request_id"]] += 1
            if all(results[request_id] == nodes for request_id in bodies):
                break
    return counted


def test_nodes_send_progress_only_to_a_requester_that_asks_and_as_before_to_one_that_does_not_say(
    own_cluster: LocalCluster, own_publisher: Publisher
) -> None:
    images = [
        own_cluster.registry.push_sized(f"test/quiet-{uuid.uuid4().hex[:8]}", "1", [10_000_000])
        for _ in range(2)
    ]
    quiet, older = (json.loads(PullRequest.new(parse_reference(i)).encode()) for i in images)
    quiet["progress"] = False
    del older["progress"]  # an older publisher's request: it says nothing of progress
    counted = progress_per_request(
        own_cluster.amqp_url,
        {body["request_id"]: json.dumps(body).encode() for body in (quiet, older)},
        NODES,
    )
    assert counted[older["request_id"]] >= NODES  # the pulls lasted long enough to report
    assert counted[quiet["request_id"]] == 0


def test_cli_nodes_lists_the_roster(own_cluster: LocalCluster, own_publisher: Publisher) -> None:
    deadline = time.monotonic() + 20
    while True:  # a worker's first announcements precede its catch-up
        done = run_cli("--amqp-url", own_cluster.amqp_url, "nodes", "--json")
        assert done.returncode == 0, done.stderr
        listed = json.loads(done.stdout)["nodes"]
        if all(n["caught_up"] for n in listed) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [n["node"] for n in listed] == node_names(own_cluster)
    assert set(listed[0]) == {
        "node",
        "version",
        "engine",
        "started_at",
        "last_seen",
        "state",
        "caught_up",
        "replay_pending",
        "replay_failed",
        "history_gap",
        "history_lost",
        "interval",
    }
    assert {n["caught_up"] for n in listed} == {True}  # an empty history: nothing to replay
    plain = run_cli("--amqp-url", own_cluster.amqp_url, "nodes")
    assert [line.split()[0] for line in plain.stdout.splitlines()] == node_names(own_cluster)
    assert all(line.endswith("caught up") for line in plain.stdout.splitlines())


STRETCH_RATE = 1.0
"""Announcements a second a stretching cluster aims at: two nodes count as large."""


def presence_stream(amqp_url: str, since: float, seconds: float) -> list[NodePresence]:
    """The announcements in the presence stream from ``since`` (Unix time), read for
    ``seconds``."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        found = []
        deadline = time.monotonic() + seconds
        for method, _properties, body in channel.consume(
            topo.PRESENCE_STREAM.name,
            arguments={"x-stream-offset": datetime.fromtimestamp(since, UTC)},
            inactivity_timeout=0.2,
        ):
            if time.monotonic() > deadline:
                break
            if method is None:
                continue
            channel.basic_ack(method.delivery_tag)
            message = decode_presence_stream(body)
            if isinstance(message, NodePresence) and message.last_seen >= since:
                found.append(message)
        return found
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):  # a stream refuses the requeue
            connection.close()


def test_a_large_roster_stretches_the_interval_and_a_killed_node_still_leaves_in_three_of_them(
    rabbitmq: RabbitMqContainer,
) -> None:
    cluster = start_cluster(
        new_vhost(rabbitmq), nodes=2, PULLER_PRESENCE_TARGET_RATE=str(STRETCH_RATE)
    )
    stretched = 2 / STRETCH_RATE
    assert stretched > PRESENCE_INTERVAL and PRESENCE_MISSES * stretched > ROSTER_MAX_AGE
    try:
        with Publisher(cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
            # Each worker counts the census's consumers (two) and stretches its interval.
            wait_until(
                lambda: [i.interval for i in publisher.nodes()] == [stretched, stretched],
                "both nodes to declare the stretched interval",
                timeout=20,
            )
            since = time.time()
            announced = presence_stream(cluster.amqp_url, since, 2 * stretched + 1)
            first = [a for a in announced if a.node == cluster.workers[0].node]
            assert len(first) >= 2
            assert {a.interval for a in first} == {stretched}
            gaps = [b.last_seen - a.last_seen for a, b in itertools.pairwise(first)]
            assert min(gaps) >= (1 - JITTER) * stretched - 0.05, gaps  # not every 1 s

            killed = cluster.workers[1]
            killed.signal(signal.SIGKILL)  # no goodbye
            assert killed.process is not None
            killed.process.wait(10)
            [last] = [i for i in publisher.nodes() if i.node == killed.node]
            bound = last.silent_after(ROSTER_MAX_AGE)
            assert bound == PRESENCE_MISSES * stretched
            while True:
                asked = time.time()
                listed = killed.node in [i.node for i in publisher.nodes()]
                answered = time.time()
                if not listed:
                    break
                # Gone within the bound (plus what a loaded machine adds to the read).
                assert asked < last.last_seen + bound + 5, "a dead node stayed in the roster"
                time.sleep(0.2)
            # ... and not before: readers judged it by its own interval, not their 4 s.
            assert answered > last.last_seen + bound
    finally:
        cluster.remove()
