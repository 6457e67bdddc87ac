"""A worker held to the DaemonSet's memory limit (128 MiB, a cgroup v1 memory group) under a
flood of distinct missing images, on real parts: its memory stays flat, far under the
limit. The full 10,000-image figure is ``python -m bench.missing_flood``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from localcluster.cluster import LocalCluster, WorkerProcess, worker_command
from localcluster.memory_limit import MemoryGroup, resident_bytes
from publisher import Publisher
from tests.integration.conftest import new_vhost, start_cluster

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
LIMIT = 128 * MIB


@pytest.fixture
def limited_node(
    rabbitmq: RabbitMqContainer,
) -> Iterator[tuple[LocalCluster, WorkerProcess, MemoryGroup]]:
    cluster = start_cluster(new_vhost(rabbitmq), nodes=0, PULLER_MAX_CONCURRENT_PULLS="4")
    group = MemoryGroup(LIMIT).create()
    try:
        node = cluster.add_node("node-1", command=group.command(worker_command()))
        yield cluster, node, group
    finally:
        cluster.remove()
        group.remove()


def flood(cluster: LocalCluster, publisher: Publisher, node: WorkerProcess, count: int) -> int:
    """Asks for ``count`` images the registry does not have, each a different name; returns
    the worker's resident bytes once it has answered all of them."""
    before = node.metric("puller_worker_answers_total")
    for _ in range(count):
        publisher.request(f"{cluster.registry.address}/missing/{uuid.uuid4().hex}:1")
    deadline = time.monotonic() + 120
    while node.metric("puller_worker_answers_total", status="failed") < before + count:
        assert node.alive, "the worker died"
        assert time.monotonic() < deadline, "the flood was not answered within 120 s"
        time.sleep(0.2)
    assert node.process is not None
    return resident_bytes(node.process.pid)[0]


def test_a_flood_of_distinct_missing_images_leaves_the_workers_memory_flat(
    limited_node: tuple[LocalCluster, WorkerProcess, MemoryGroup],
) -> None:
    cluster, node, group = limited_node
    with Publisher(cluster.amqp_url) as publisher:
        warm = flood(cluster, publisher, node, 200)  # every thread and pool made once
        after = flood(cluster, publisher, node, 600)
    assert node.metric("puller_worker_answers_total", error_kind="not_found") == 800
    grown = (after - warm) / MIB
    # About 26 KB an image stayed for good before (15 MiB for these 600).
    assert grown < 6, f"resident memory grew {grown:.1f} MiB over 600 missing images"
    assert group.oom_kills == 0
    assert node.process is not None
    peak = resident_bytes(node.process.pid)[1]
    assert peak < LIMIT // 2, f"peak {peak / MIB:.1f} MiB: over half the limit"
