"""The desired state on real parts: a keeper writes it, a node whose missed range of the
history is gone recovers from it, and another worker takes the keeper's place when the
keeper goes. Real broker (stream plugin), engines, registry and worker processes."""

from __future__ import annotations

import json
import signal
import time
import uuid

import pika
import pika.exceptions
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import HISTORY_STREAM, PullRequest, parse_reference, topology
from localcluster.cluster import WorkerProcess
from tests.integration.conftest import engine_has, new_vhost, start_cluster
from tests.integration.test_catch_up import (
    declare_topology,
    first_offset,
    history_tail,
    logged,
    new_image,
    publish_confirmed,
    reads_the_tail,
    ready,
    wait_for,
)

pytestmark = pytest.mark.integration

DESIRED_STREAM = "puller.desired.stream"
"""Named here, not imported: the test runs against a worker without it, to fail there."""
INTERVAL = "0.5"
"""The keeper's ``PULLER_DESIRED_STATE_INTERVAL`` in these tests: seconds, not minutes."""


def newest_snapshot(url: str) -> dict[str, object] | None:
    """The newest snapshot in the desired state stream, as JSON (``None``: none yet)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    newest = None
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        for method, _properties, body in channel.consume(
            DESIRED_STREAM, arguments={"x-stream-offset": "first"}, inactivity_timeout=0.5
        ):
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            newest = json.loads(body)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 404:
            raise
    finally:
        if connection.is_open:
            connection.close()
    return newest


def snapshot_images(url: str) -> set[str]:
    snapshot = newest_snapshot(url) or {}
    requests = snapshot.get("requests", [])
    assert isinstance(requests, list)
    return {str(request["image"]) for request in requests}


def snapshot_through(url: str) -> int:
    snapshot = newest_snapshot(url) or {}
    through = snapshot.get("through_offset", -1)
    assert isinstance(through, int)
    return through


def keeper(worker: WorkerProcess) -> bool:
    return worker.metric("puller_worker_keeper") == 1


def test_a_node_whose_missed_range_is_gone_recovers_every_image_from_the_desired_state(
    rabbitmq: RabbitMqContainer,
) -> None:
    url = new_vhost(rabbitmq)
    cluster = start_cluster(
        url,
        nodes=0,
        PULLER_HISTORY_MAX_AGE="3600",
        PULLER_STREAM_PORT=reads_the_tail(rabbitmq),
        PULLER_DESIRED_STATE_INTERVAL=INTERVAL,
    )
    try:
        declare_topology(url, small_history())
        publish_confirmed(url, [PullRequest.new(parse_reference(new_image(cluster)))])
        node = cluster.add_node("node-1")
        state = node.state_dir / "history-offset.json"
        wait_for(lambda: ready(node) and state.exists(), "node-1 caught up, its place saved")
        saved = json.loads(state.read_text())["offset"]
        other = cluster.add_node("node-2")
        node.stop()
        wait_for(lambda: keeper(other), "node-2 the keeper once node-1 is gone")

        images = [new_image(cluster) for _ in range(3)]
        publish_confirmed(url, [PullRequest.new(parse_reference(image)) for image in images])
        wait_for(
            lambda: set(images) <= snapshot_images(url), "the keeper's snapshot holds the images"
        )
        lose_history_after(url, saved)
        tail = history_tail(rabbitmq, url)
        assert tail is not None
        wait_for(lambda: snapshot_through(url) >= tail, "the keeper's snapshot reaches the end")

        node.start()
        wait_for(lambda: ready(node), "node-1 caught up")
        assert all(engine_has(cluster, image)["node-1"] for image in images), "every image"
        assert node.metric("puller_worker_history_gaps_total", outcome="recovered") == 1
        assert node.metric("puller_worker_history_gap_unrecovered") == 0
        _, body = node.health("/ready")
        assert body["history_gap"] == "recovered"
        [warning] = logged(node, "the history lost")
        assert warning["level"] == "warning" and "reconciling" in str(warning["event"])
        assert logged(node, "recovered the lost history entries")
    finally:
        cluster.remove()


def test_when_the_keeper_goes_another_worker_keeps_the_desired_state_and_new_nodes_use_it(
    rabbitmq: RabbitMqContainer,
) -> None:
    """Then a node that joins pulls each image of the snapshot once (two pulls) instead of
    replaying the history's five entries up to where the snapshot reaches."""
    url = new_vhost(rabbitmq)
    cluster = start_cluster(
        url,
        nodes=2,
        PULLER_STREAM_PORT=reads_the_tail(rabbitmq),
        PULLER_DESIRED_STATE_INTERVAL=INTERVAL,
    )
    try:
        first = new_image(cluster)
        publish_confirmed(url, [PullRequest.new(parse_reference(first)) for _ in range(4)])
        wait_for(lambda: first in snapshot_images(url), "a snapshot with the first image")
        [holder] = [worker for worker in cluster.workers if keeper(worker)]
        [heir] = [worker for worker in cluster.workers if worker is not holder]
        assert holder.process is not None
        holder.signal(signal.SIGKILL)
        holder.process.wait(timeout=30)

        wait_for(lambda: keeper(heir), f"{heir.node} the keeper")
        second = new_image(cluster)
        publish_confirmed(url, [PullRequest.new(parse_reference(second))])
        wait_for(lambda: second in snapshot_images(url), "a snapshot with the second image")
        snapshot = newest_snapshot(url)
        assert snapshot is not None
        assert snapshot["written_by"] == heir.node
        assert {first, second} <= snapshot_images(url), "merged with the last keeper's"

        tail = history_tail(rabbitmq, url)
        assert tail is not None
        wait_for(lambda: snapshot_through(url) >= tail, "the keeper's snapshot reaches the end")
        node = cluster.add_node("node-new")
        wait_for(lambda: ready(node), "the new node caught up")
        assert engine_has(cluster, first)["node-new"] and engine_has(cluster, second)["node-new"]
        assert node.metric("puller_worker_history_started_from_desired_total") == 1
        # One pull per image of the snapshot, not one per request of the history.
        assert node.metric("puller_worker_replayed_total") == 2
        assert logged(node, "started from the desired state")
        _, body = node.health("/ready")
        assert body["history_gap"] == "none"
    finally:
        cluster.remove()


def small_history() -> topology.Queue:
    """Small segments and size bound: retention drops the oldest segments within seconds."""
    return topology.Queue(
        HISTORY_STREAM,
        durable=True,
        arguments={
            "x-queue-type": "stream",
            "x-max-length-bytes": 16_000,
            "x-stream-max-segment-size-bytes": 4_000,
        },
    )


def lose_history_after(url: str, saved: int) -> None:
    """Fills the history until retention dropped what came after ``saved``."""

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
    assert first_offset(url) - saved - 2 >= 2, "retention dropped the stopped node's range"
