"""Pulls through a pull-through cache, on real parts: a registry (the upstream), a cache in
front of it (puller's blob cache, or Debian's ``docker-registry`` in proxy mode), real node
engines and workers with ``PULLER_PULL_THROUGH_CACHES`` naming the cache, real RabbitMQ.

The cache always listens on the same port; each test starts the kind it needs there (or
none: the cache is down) and stops it after.
"""

from __future__ import annotations

import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import Status, parse_reference
from localcluster.cluster import LocalCluster
from localcluster.processes import free_port
from localcluster.uplink import BlobCacheProcess, ProxyRegistry
from publisher import Publisher
from tests.integration.conftest import ROSTER_MAX_AGE, new_vhost, start_cluster

pytestmark = pytest.mark.integration

NODES = 2


@pytest.fixture(scope="module")
def cache_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cache_cluster(rabbitmq: RabbitMqContainer, cache_port: int) -> Iterator[LocalCluster]:
    registry_port = free_port()
    cluster = start_cluster(
        new_vhost(rabbitmq),
        nodes=NODES,
        registry_port=registry_port,
        PULLER_PULL_THROUGH_CACHES=f"127.0.0.1:{registry_port}=127.0.0.1:{cache_port}",
    )
    yield cluster
    cluster.remove()


@pytest.fixture
def cache_publisher(cache_cluster: LocalCluster) -> Iterator[Publisher]:
    with Publisher(cache_cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


def _push(cluster: LocalCluster) -> tuple[str, str]:
    """A new two-layer image in the upstream; its name and manifest digest."""
    repository = f"cached/{uuid.uuid4().hex[:10]}"
    image = cluster.registry.push_sized(repository, "1", [200_000, 300_000])
    return image, cluster.registry.manifest_digest(repository, "1")


def _check_every_engine(cluster: LocalCluster, image: str, digest: str, cache: str) -> None:
    """Each engine holds ``image`` under the asked name, with the upstream's repo digest,
    and no name of the cache's."""
    asked = parse_reference(image)
    for engine in cluster.engines:
        client = engine.client()
        try:
            attrs = client.api.inspect_image(image)
            names = [*attrs["RepoTags"], *attrs["RepoDigests"]]
            assert f"{asked.repository}:1" in attrs["RepoTags"], (engine.name, names)
            assert f"{asked.repository}@{digest}" in attrs["RepoDigests"], (engine.name, names)
            assert not [n for n in names if n.startswith(cache)], (engine.name, names)
        finally:
            client.close()


def _via(cluster: LocalCluster, how: str) -> float:
    return sum(w.metric("puller_worker_pull_through_total", via=how) for w in cluster.workers)


@pytest.mark.parametrize("kind", ["blob-cache", "registry-proxy"])
def test_every_node_gets_the_image_under_its_name_with_the_upstream_digest(
    cache_cluster: LocalCluster,
    cache_publisher: Publisher,
    cache_port: int,
    tmp_path: Path,
    kind: str,
) -> None:
    upstream = cache_cluster.registry.url
    cache = (
        BlobCacheProcess(tmp_path / kind, upstream, port=cache_port)
        if kind == "blob-cache"
        else ProxyRegistry(tmp_path / kind, upstream, port=cache_port)
    )
    cache.start()
    try:
        image, digest = _push(cache_cluster)
        through_before = _via(cache_cluster, "cache")
        report = cache_publisher.pull(image, expect=NODES, timeout=60)
        assert report.ok, report
        assert {r.status for r in report.nodes} == {Status.PULLED}
        assert {r.digest for r in report.nodes} == {digest}
        _check_every_engine(cache_cluster, image, digest, cache.address)
        assert _via(cache_cluster, "cache") == through_before + NODES
        # The layers are in the cache's storage: they came through it.
        stored = " ".join(str(path) for path in (tmp_path / kind).rglob("*"))
        for layer in json.loads(_manifest(cache_cluster, image))["layers"]:
            assert layer["digest"].split(":", 1)[1] in stored, layer["digest"]
        # Asked again: present, answered as before, the digest still the upstream's.
        again = cache_publisher.pull(image, expect=NODES, timeout=60)
        assert {r.status for r in again.nodes} == {Status.PRESENT}
        assert {r.digest for r in again.nodes} == {digest}
    finally:
        cache.remove()


def test_a_digest_pinned_reference_goes_through_the_cache_too(
    cache_cluster: LocalCluster, cache_publisher: Publisher, cache_port: int, tmp_path: Path
) -> None:
    cache = BlobCacheProcess(tmp_path / "cache", cache_cluster.registry.url, port=cache_port)
    cache.start()
    try:
        image, digest = _push(cache_cluster)
        pinned = f"{parse_reference(image).repository}@{digest}"
        through_before = _via(cache_cluster, "cache")
        report = cache_publisher.pull(pinned, expect=NODES, timeout=60)
        assert report.ok, report
        assert {r.digest for r in report.nodes} == {digest}
        assert _via(cache_cluster, "cache") == through_before + NODES
        for engine in cache_cluster.engines:
            client = engine.client()
            try:
                names = client.api.inspect_image(pinned)["RepoDigests"]
                assert not [n for n in names if n.startswith(cache.address)], names
            finally:
                client.close()
    finally:
        cache.remove()


class _FailingCache(http.server.ThreadingHTTPServer):
    """A cache that answers its ``/v2/`` and 500 to everything else, counting the requests."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int) -> None:
        self.hits = 0
        super().__init__(("127.0.0.1", port), _FailingHandler)


class _FailingHandler(http.server.BaseHTTPRequestHandler):
    server: _FailingCache

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits += 1
        self.send_response(200 if self.path == "/v2/" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.do_GET()


def test_a_cache_that_fails_a_pull_is_skipped_for_a_while_not_tried_on_every_pull(
    cache_cluster: LocalCluster, cache_publisher: Publisher, cache_port: int
) -> None:
    # Runs before the test below, which leaves the cache marked down on every worker.
    failing = _FailingCache(cache_port)
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    try:
        hits = []
        for _ in range(2):
            image, digest = _push(cache_cluster)
            report = cache_publisher.pull(image, expect=NODES, timeout=60)
            assert report.ok, report
            assert {r.digest for r in report.nodes} == {digest}
            hits.append(failing.hits)
        # Each node tried the cache for the first pull; the second went direct at once.
        assert hits[0] > 0
        assert hits[1] == hits[0]
    finally:
        failing.shutdown()
        failing.server_close()


def test_a_cache_that_is_down_means_a_direct_pull_and_a_warning(
    cache_cluster: LocalCluster, cache_publisher: Publisher, cache_port: int
) -> None:
    # Nothing listens on the cache's port.
    image, digest = _push(cache_cluster)
    fallback_before = _via(cache_cluster, "fallback")
    report = cache_publisher.pull(image, expect=NODES, timeout=60)
    assert report.ok, report
    assert {r.status for r in report.nodes} == {Status.PULLED}
    assert {r.digest for r in report.nodes} == {digest}
    _check_every_engine(cache_cluster, image, digest, f"127.0.0.1:{cache_port}")
    assert _via(cache_cluster, "fallback") == fallback_before + NODES
    for worker in cache_cluster.workers:
        warnings = [
            line
            for line in map(json.loads, worker.log_path.read_text().splitlines())
            if line.get("event") == "pull-through cache not used; pulling directly"
            and line.get("image") == image
        ]
        assert warnings, worker.node
        assert warnings[0]["level"] == "warning"
        assert warnings[0]["node"] == worker.node


def _manifest(cluster: LocalCluster, image: str) -> str:
    reference = parse_reference(image)
    response = requests.get(
        f"{cluster.registry.url}/v2/{reference.path}/manifests/{reference.tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        timeout=30,
    )
    response.raise_for_status()
    return response.text
