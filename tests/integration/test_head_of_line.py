"""A failing or slow registry must not hold up pulls from another (issue 10), on real
engines: a registry that accepts connections and never answers, and a flood of requests
for images that do not exist."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import ErrorKind, Status
from localcluster.cluster import LocalCluster
from localcluster.faults import BlackHole
from publisher import Publisher
from tests.integration.conftest import new_vhost, start_cluster

pytestmark = pytest.mark.integration

NODES = 2
STALL_TIMEOUT = 7.0


@pytest.fixture(scope="module")
def slow_cluster(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    cluster = start_cluster(
        new_vhost(rabbitmq),
        nodes=NODES,
        PULLER_STALL_TIMEOUT=str(STALL_TIMEOUT),
        PULLER_PULL_RETRIES="1",
        PULLER_RETRY_DELAY="1",
        PULLER_REGISTRY_COOLDOWN="60",
    )
    yield cluster
    cluster.remove()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def healthy_image(cluster: LocalCluster) -> str:
    return cluster.registry.push_files(
        f"hol/{uuid.uuid4().hex[:10]}", "1", {"payload.txt": uuid.uuid4().bytes}
    )


def test_a_black_hole_registry_neither_starves_others_nor_holds_slots_once_known_down(
    slow_cluster: LocalCluster, black_hole: BlackHole
) -> None:
    with Publisher(slow_cluster.amqp_url) as publisher:
        stuck = [publisher.request(f"{black_hole.address}/app/{n}:1") for n in range(2)]
        deadline = time.monotonic() + 10
        while black_hole.connections < NODES and time.monotonic() < deadline:
            time.sleep(0.05)
        assert black_hole.connections >= NODES, "the engines never reached the black hole"

        # Both slots of every node may be held by the black hole; a healthy pull still runs.
        started = time.monotonic()
        report = publisher.pull(healthy_image(slow_cluster), expect=NODES, timeout=60)
        took = time.monotonic() - started
        assert report.ok, report
        assert took < STALL_TIMEOUT - 2, f"the healthy pull waited {took:.1f}s"

        # The black-hole pulls give up (two attempts, each stalled) ...
        for request_id in stuck:
            results = publisher.results(request_id, expect=NODES, timeout=4 * STALL_TIMEOUT)
            assert {r.error.kind for r in results if r.error} == {ErrorKind.STALLED}
        # ... and from then on the registry is known down: its pulls fail at once.
        started = time.monotonic()
        again = publisher.pull(f"{black_hole.address}/app/other:1", expect=NODES, timeout=30)
        assert time.monotonic() - started < 5
        for result in again.nodes:
            assert result.error is not None
            assert result.error.kind is ErrorKind.REGISTRY_UNREACHABLE
            assert "known to be down" in result.error.message
    for worker in slow_cluster.workers:
        assert worker.metric("puller_worker_registries_down") == 1


def test_a_flood_of_requests_for_missing_images_does_not_queue_a_real_pull(
    slow_cluster: LocalCluster,
) -> None:
    registry = slow_cluster.registry.address
    missing = [f"{registry}/hol/missing-{uuid.uuid4().hex[:8]}:1" for _ in range(20)]
    before = [w.metric("puller_worker_answered_from_memory_total") for w in slow_cluster.workers]
    with Publisher(slow_cluster.amqp_url) as publisher:
        flood = [publisher.request(missing[n % len(missing)]) for n in range(2000)]
        report = publisher.pull(healthy_image(slow_cluster), expect=NODES, timeout=60)
        assert report.ok, report
        for result in report.nodes:
            assert result.status is Status.PULLED
            assert result.queued_seconds < 5, result
        last = publisher.results(flood[-1], expect=NODES, timeout=60)
        assert {r.error.kind for r in last if r.error} == {ErrorKind.NOT_FOUND}
    for worker, was in zip(slow_cluster.workers, before, strict=True):
        # Each of the 20 images asked the registry about once; the rest came from memory.
        assert worker.metric("puller_worker_answered_from_memory_total") - was >= 1900
