"""One publish reaches every node's worker, and each pulls through its own Docker Engine."""

from __future__ import annotations

import json
import time
import uuid

import pika
import pytest

from contract import (
    PULL_EXCHANGE,
    REPLY_EXCHANGE,
    ErrorKind,
    NodeResult,
    PullRequest,
    Status,
    parse_reference,
)
from localcluster.cluster import LocalCluster
from publisher import NoNodes, Publisher
from tests.integration.conftest import NODES, engine_has, new_vhost, run_cli

pytestmark = pytest.mark.integration


def test_one_publish_puts_the_image_on_every_engine(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    assert engine_has(cluster, fresh_image) == dict.fromkeys(cluster_nodes(cluster), False)

    report = publisher.pull(fresh_image, expect=NODES, timeout=60)

    assert report.ok, report
    assert [r.node for r in report.nodes] == cluster_nodes(cluster)
    assert {r.status for r in report.nodes} == {Status.PULLED}
    assert all(r.image_id and r.image_id.startswith("sha256:") for r in report.nodes)
    assert all(r.digest and r.digest.startswith("sha256:") for r in report.nodes)
    assert engine_has(cluster, fresh_image) == dict.fromkeys(cluster_nodes(cluster), True)


def test_a_second_publish_answers_present_from_every_node(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    first = publisher.pull(fresh_image, expect=NODES, timeout=60)
    second = publisher.pull(fresh_image, expect=NODES, timeout=60)
    assert first.ok
    assert second.ok
    assert {r.status for r in second.nodes} == {Status.PRESENT}
    assert {r.image_id for r in second.nodes} == {r.image_id for r in first.nodes}


def test_a_nonexistent_image_fails_on_every_node_with_a_reason(
    cluster: LocalCluster, publisher: Publisher
) -> None:
    image = f"{cluster.registry.address}/test/does-not-exist:{uuid.uuid4().hex[:8]}"
    report = publisher.pull(image, expect=NODES, timeout=60)
    assert not report.ok
    assert len(report.failed) == NODES
    for result in report.nodes:
        assert result.error is not None
        assert result.error.kind is ErrorKind.NOT_FOUND
        assert image in result.error.message
        assert "exist in the registry" in result.error.message


def test_an_unreachable_registry_fails_with_registry_unreachable(
    publisher: Publisher,
) -> None:
    report = publisher.pull("127.0.0.1:9/nothing/here:1", expect=NODES, timeout=60)
    assert {r.error.kind for r in report.nodes if r.error} == {ErrorKind.REGISTRY_UNREACHABLE}
    assert len(report.nodes) == NODES


def test_request_is_fire_and_forget_and_results_can_be_collected_later(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    request_id = publisher.request(fresh_image)
    results = publisher.results(request_id, expect=NODES, timeout=60)
    assert sorted(r.node for r in results) == cluster_nodes(cluster)
    assert {r.status for r in results} == {Status.PULLED}
    assert all(engine_has(cluster, fresh_image).values())


def test_a_publish_that_reaches_no_worker_is_reported_as_no_nodes(rabbitmq: object) -> None:
    empty_vhost_url = new_vhost(rabbitmq)  # type: ignore[arg-type]
    with Publisher(empty_vhost_url) as publisher, pytest.raises(NoNodes, match="no nodes"):
        publisher.request("busybox")


def test_malformed_messages_leave_every_worker_alive_and_serving(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    bodies = [
        b"",
        b"not json",
        b"\xff\xfe\xfd",
        b"[]",
        b"{}",
        json.dumps(
            {"version": 99, "type": "pull", "request_id": "x", "image": "a", "requested_at": 0}
        ).encode(),
        json.dumps(
            {
                "version": 1,
                "type": "pull",
                "request_id": "x",
                "image": "UPPER/Case",
                "requested_at": 0,
            }
        ).encode(),
        json.dumps(
            {"version": 1, "type": "pull", "request_id": 5, "image": "a", "requested_at": 0}
        ).encode(),
        b'{"version": 1, "type": "pull", "image": "' + b"a" * 20000 + b'"}',
        b"{" * 5000,
    ]
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(reply_queue, REPLY_EXCHANGE, routing_key=reply_queue)
        for index, body in enumerate(bodies):
            channel.basic_publish(
                PULL_EXCHANGE,
                "",
                body,
                pika.BasicProperties(reply_to=reply_queue, correlation_id=f"bad-{index}"),
            )
        channel.basic_publish(PULL_EXCHANGE, "", b"no reply_to here")
        replies = collect(channel, reply_queue, expected=len(bodies) * NODES, timeout=30)
    finally:
        connection.close()

    assert len(replies) == len(bodies) * NODES
    for result in replies:
        assert result.status is Status.FAILED
        assert result.error is not None
        assert result.error.kind is ErrorKind.INVALID_REQUEST
        assert result.request_id.startswith("bad-")
    by_message = {r.request_id for r in replies}
    assert by_message == {f"bad-{i}" for i in range(len(bodies))}
    assert all(worker.alive for worker in cluster.workers)
    report = publisher.pull(fresh_image, expect=NODES, timeout=60)
    assert report.ok, report


def test_a_correlation_id_that_is_not_utf8_gets_its_answers_back_and_stops_no_worker(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    """pika hands such an id over as bytes. Answered from memory (on the connection's
    thread) and from a pull (another thread), and refused as broken: each answer carries
    the id back as it came, and the workers go on serving."""
    assert publisher.pull(fresh_image, expect=NODES, timeout=60).ok  # now known: from memory
    missing = f"{cluster.registry.address}/test/does-not-exist:{uuid.uuid4().hex[:8]}"
    bodies = {
        b"\xff\xfe-known": PullRequest.new(parse_reference(fresh_image)).encode(),
        b"\xff\xfe-pulled": PullRequest.new(parse_reference(missing)).encode(),
        b"\xff\xfe-broken": b"not json",
    }
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(reply_queue, REPLY_EXCHANGE, routing_key=reply_queue)
        for correlation_id, body in bodies.items():
            channel.basic_publish(
                PULL_EXCHANGE,
                "",
                body,
                pika.BasicProperties(reply_to=reply_queue, correlation_id=correlation_id),
            )
        answers: dict[bytes, list[NodeResult]] = {key: [] for key in bodies}
        deadline = time.monotonic() + 60
        while sum(map(len, answers.values())) < len(bodies) * NODES:
            assert time.monotonic() < deadline, {k: len(v) for k, v in answers.items()}
            method, properties, body = channel.basic_get(reply_queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            answers[properties.correlation_id].append(NodeResult.decode(body))
    finally:
        connection.close()
    assert {r.status for r in answers[b"\xff\xfe-known"]} == {Status.PRESENT}
    assert {r.error.kind for r in answers[b"\xff\xfe-pulled"] if r.error} == {ErrorKind.NOT_FOUND}
    broken = answers[b"\xff\xfe-broken"]
    assert {(r.request_id, r.error.kind if r.error else None) for r in broken} == {
        ("unknown", ErrorKind.INVALID_REQUEST)
    }
    assert all(worker.alive for worker in cluster.workers)
    assert publisher.pull(fresh_image, expect=NODES, timeout=60).ok


def test_cli_pulls_onto_every_node_and_prints_json(cluster: LocalCluster, fresh_image: str) -> None:
    done = run_cli(
        "--amqp-url", cluster.amqp_url, "pull", fresh_image, "--expect", str(NODES), "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["image"] == fresh_image
    assert len(report["request_id"]) == 32
    assert [n["node"] for n in report["nodes"]] == cluster_nodes(cluster)
    for node in report["nodes"]:
        assert node["status"] == "pulled"
        assert isinstance(node["seconds"], float)
        assert node["error"] is None
    assert all(engine_has(cluster, fresh_image).values())


def test_cli_prints_a_line_per_node_and_fails_when_nodes_are_missing(
    cluster: LocalCluster, fresh_image: str
) -> None:
    started = time.monotonic()
    done = run_cli(
        "--amqp-url",
        cluster.amqp_url,
        "pull",
        fresh_image,
        "--expect",
        str(NODES + 1),
        "--timeout",
        "5",
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 60
    lines = [line for line in done.stdout.splitlines() if line.startswith("  node-")]
    assert len(lines) == NODES
    assert f"1 of {NODES + 1} expected node(s) did not answer" in done.stderr


def test_cli_reports_failures_and_exits_non_zero(cluster: LocalCluster) -> None:
    image = f"{cluster.registry.address}/test/missing:1"
    done = run_cli("--amqp-url", cluster.amqp_url, "pull", image, "--expect", str(NODES), "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert {n["error"]["kind"] for n in report["nodes"]} == {"not_found"}
    assert "failed on 3 node(s)" in done.stderr


def test_cli_refuses_an_invalid_reference_before_publishing(cluster: LocalCluster) -> None:
    done = run_cli("--amqp-url", cluster.amqp_url, "pull", "no spaces/Allowed")
    assert done.returncode == 2
    assert "invalid image reference" in done.stderr


def cluster_nodes(cluster: LocalCluster) -> list[str]:
    return sorted(engine.name for engine in cluster.engines)


def collect(channel: object, queue: str, expected: int, timeout: float) -> list[NodeResult]:
    results: list[NodeResult] = []
    deadline = time.monotonic() + timeout
    while len(results) < expected and time.monotonic() < deadline:
        method, _properties, body = channel.basic_get(queue, auto_ack=True)  # type: ignore[attr-defined]
        if method is None:
            time.sleep(0.05)
            continue
        results.append(NodeResult.decode(body))
    return results


def test_an_image_removed_behind_the_workers_back_is_pulled_again_not_present(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    assert publisher.pull(fresh_image, expect=NODES, timeout=60).ok
    second = publisher.pull(fresh_image, expect=NODES, timeout=60)
    assert {r.status for r in second.nodes} == {Status.PRESENT}  # answered from memory
    removed_from = cluster.engines[0]
    client = removed_from.client()
    try:
        client.images.remove(fresh_image, force=True)
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while True:  # the engine's "delete" event reaches the worker a moment later
        third = publisher.pull(fresh_image, expect=NODES, timeout=60)
        statuses = {r.node: r.status for r in third.nodes}
        if statuses[removed_from.name] is Status.PULLED or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert statuses.pop(removed_from.name) is Status.PULLED
    assert set(statuses.values()) == {Status.PRESENT}
    assert all(engine_has(cluster, fresh_image).values())
