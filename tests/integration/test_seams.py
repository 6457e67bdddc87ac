"""Regressions found by using puller as a newcomer would (issue 9), on real parts: a session
path that waited behind a pull, log lines without their node, a library that printed, and
a digest that belonged to another repository."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from contract import PullRequest, Status, parse_reference
from localcluster.cluster import LocalCluster
from publisher import Publisher
from publisher.broker import PublisherBroker
from tests.integration.conftest import NODES

pytestmark = pytest.mark.integration


def test_request_returns_in_milliseconds_while_another_thread_waits_in_pull(
    cluster: LocalCluster, fresh_image: str
) -> None:
    with Publisher(cluster.amqp_url) as shared:
        shared.request(fresh_image)  # connected, and the image is on its way
        waiting = threading.Thread(
            target=lambda: shared.pull(fresh_image, nodes=["a-node-that-never-answers"], timeout=8)
        )
        waiting.start()
        time.sleep(0.5)  # the other thread is inside pull()'s wait now
        assert waiting.is_alive()
        took = []
        for _ in range(100):
            started = time.monotonic()
            shared.request(fresh_image)
            took.append(time.monotonic() - started)
        assert waiting.is_alive(), "the waiting pull ended early: the test proved nothing"
        waiting.join()
    took.sort()
    # Before: every request() waited for the lock pull() held (7 s). A loaded machine may
    # make one slow; none may wait for the other thread.
    assert took[-1] < 1.0, f"slowest request() took {took[-1]:.3f}s"
    assert sum(took) < 10.0


def worker_lines(cluster: LocalCluster) -> list[dict[str, object]]:
    lines = []
    for worker in cluster.workers:
        for line in worker.log_path.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines


def test_every_worker_line_names_its_node_and_request_lines_their_image(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    report = publisher.pull(fresh_image, expect=NODES, timeout=60)
    assert report.ok, report
    lines = worker_lines(cluster)
    assert lines
    nodes = {w.node for w in cluster.workers}
    assert [line for line in lines if line.get("node") not in nodes] == []
    about_requests = [line for line in lines if "request_id" in line]
    assert about_requests, "no line named a request"
    assert [line for line in about_requests if not line.get("image")] == []
    mine = [line for line in about_requests if line["request_id"] == report.request_id]
    assert {str(line["node"]) for line in mine} == nodes, "a node wrote no line about it"


def test_an_unconfigured_publisher_prints_nothing(
    cluster: LocalCluster, fresh_image: str, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import pika
        from publisher import Publisher
        with Publisher({cluster.amqp_url!r}) as p:
            p.request({fresh_image!r})
            # a reply that breaks the contract: the library warns, through logging only
            hostile = pika.BlockingConnection(pika.URLParameters({cluster.amqp_url!r}))
            hostile.channel().basic_publish("puller.replies", p._broker.reply_queue, b"junk")
            hostile.close()
            request_id = p.request({fresh_image!r})  # its answers come after the junk
            p.results(request_id, expect={NODES}, timeout=30)
            p.nodes()
            try:
                p.pull("127.0.0.1:9/never/there:1", expect={NODES}, timeout=10)
            except Exception as error:
                raise SystemExit(f"pull raised {{error!r}}")
        """
    )
    finished = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == ""
    assert finished.stderr == ""


def test_the_digest_reported_is_the_asked_repositorys_own(
    cluster: LocalCluster, publisher: Publisher
) -> None:
    registry = cluster.registry
    files = {"payload.txt": uuid.uuid4().bytes}
    first_name, second_name = f"seams/{uuid.uuid4().hex[:8]}", f"seams/{uuid.uuid4().hex[:8]}"
    first = registry.push_files(first_name, "1", files)
    second = registry.push_files(second_name, "1", files, manifest_indent=1)
    first_digest = registry.manifest_digest(first_name, "1")
    second_digest = registry.manifest_digest(second_name, "1")
    assert first_digest != second_digest

    report = publisher.pull(first, expect=NODES, timeout=60)
    assert {r.digest for r in report.nodes} == {first_digest}

    # The same image under a name the engines gave it themselves: no repo digest of its own.
    local_name = f"{registry.address}/seams/local-{uuid.uuid4().hex[:8]}:1"
    for engine in cluster.engines:
        client = engine.client()
        try:
            client.images.get(first).tag(local_name)
        finally:
            client.close()
    report = publisher.pull(local_name, expect=NODES, timeout=60)
    assert {r.status for r in report.nodes} == {Status.PRESENT}
    assert {r.digest for r in report.nodes} == {None}, "another repository's digest was given"

    # The same image pulled under a second repository: one image, two repo digests.
    report = publisher.pull(second, expect=NODES, timeout=60)
    assert {r.status for r in report.nodes} == {Status.PULLED}
    assert {r.digest for r in report.nodes} == {second_digest}
    assert len({r.image_id for r in report.nodes}) == 1


def test_a_reply_handler_that_fails_does_not_stop_the_publishers_connection(
    cluster: LocalCluster, fresh_image: str
) -> None:
    failures = []

    def broken(_correlation_id: str | None, _body: bytes) -> None:
        failures.append(1)
        raise RuntimeError("a bug in whatever handles replies")

    broker = PublisherBroker(cluster.amqp_url, connect_timeout=5, on_reply=broken)
    try:
        body = PullRequest.new(parse_reference(fresh_image)).encode()
        broker.publish_request(body, "first")
        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert failures, "no reply reached the handler"
        started = time.monotonic()
        broker.publish_request(body, "second")  # the connection's thread is still there
        assert time.monotonic() - started < 5
        assert broker.epoch == 1, "the connection was dropped and opened again"
    finally:
        broker.close()
