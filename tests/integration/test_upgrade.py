"""An upgrade from the history the marker design wrote: a rolling upgrade (old and new workers
side by side, then all new) with a node away across it loses no request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import HistoryMarker, InvalidMessage, decode_history
from contract import topology as topo
from localcluster.cluster import LocalCluster, WorkerProcess
from publisher import Publisher
from tests.integration.conftest import (
    ROSTER_MAX_AGE,
    engine_has,
    new_vhost,
    old_worker_command,
    old_worker_source,
    start_cluster,
)
from tests.waiting import eventually

pytestmark = pytest.mark.integration

MARKER_COMMIT = "9241b57"
"""main before catch-up without markers: its workers put a marker into the history on every
connection, and a checkpoint marker at most every 30 s."""
QUICK_CHECKPOINTS = (
    "import worker.catch_up.replay as r; init = r.CatchUp.__init__; "
    "r.CatchUp.__init__ = lambda self, *a, **k: init(self, *a, **{**k, 'checkpoint_interval': 1})"
)
"""Run before the old worker: its checkpoints every second, not 30 s (not a setting then)."""


@pytest.fixture
def cluster(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    cluster = start_cluster(new_vhost(rabbitmq), nodes=0)
    yield cluster
    cluster.remove()


def markers_by_node(url: str) -> Counter[str]:
    """The history's markers, by the node that wrote them."""
    found: Counter[str] = Counter()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        for method, _properties, body in channel.consume(
            topo.HISTORY_STREAM_NAME, arguments={"x-stream-offset": "first"}, inactivity_timeout=1
        ):
            if method is None:
                break
            channel.basic_ack(method.delivery_tag)
            try:
                entry = decode_history(body)
            except InvalidMessage:
                continue
            if isinstance(entry, HistoryMarker):
                found[entry.node] += 1
    finally:
        connection.close()
    return found


def upgrade(worker: WorkerProcess) -> None:
    """Stops the old worker and starts today's on the same node (engine and state kept)."""
    worker.stop()
    worker.command = None
    worker.start()


def test_a_rolling_upgrade_from_the_marker_history_loses_no_request_of_a_node_away(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    old = old_worker_command(old_worker_source(MARKER_COMMIT, tmp_path), QUICK_CHECKPOINTS)
    first, second, away = (cluster.add_node(f"node-{n}", command=old) for n in (1, 2, 3))
    images = [
        cluster.registry.push_files(f"test/upgrade-{n}", "1", {"n": n.encode()}) for n in "1234"
    ]
    with Publisher(cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        assert publisher.pull(images[0], expect=3, timeout=60).ok
        # The old design's history: each node's connection marker, and checkpoints after it.
        eventually(
            lambda: all(markers_by_node(cluster.amqp_url)[w.node] >= 2 for w in cluster.workers),
            "the old workers wrote no checkpoint marker",
            timeout=30,
        )
        away.stop()
        live = [first.node, second.node]
        assert publisher.pull(images[1], nodes=live, timeout=60).ok
        upgrade(first)  # old and new side by side
        assert publisher.pull(images[2], nodes=live, timeout=60).ok
        upgrade(second)
        assert publisher.pull(images[3], nodes=live, timeout=60).ok
    written = markers_by_node(cluster.amqp_url)
    upgrade(away)  # back, and new: it catches up through the old markers
    eventually(
        lambda: away.metric("puller_worker_caught_up") == 1, "the node away never caught up", 60
    )
    for image in images:
        assert all(engine_has(cluster, image).values()), image
    assert away.metric("puller_worker_replayed_total") >= 3  # from the history, not live
    assert away.metric("puller_worker_replay_failed_total") == 0
    assert markers_by_node(cluster.amqp_url) == written, "today's workers write no marker"
