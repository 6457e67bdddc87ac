"""Who may ask for what, on real parts: the workers' allow-list and allowed publishers (with
the AMQP ``user_id`` RabbitMQ vouches for), the cap on requests a minute, and the same
policy in the publisher and the CLI, refusing before anything is published."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import (
    CONTENT_TYPE,
    ErrorKind,
    Forbidden,
    PruneResult,
    PullRequest,
    Status,
    parse_reference,
)
from contract import topology as topo
from contract.policy import ImagePolicy, allowed_prefixes
from localcluster.cluster import LocalCluster
from localcluster.processes import free_port
from publisher import Publisher
from tests.integration.conftest import (
    ROSTER_MAX_AGE,
    engine_has,
    new_vhost,
    run_cli,
    start_cluster,
)

NODES = 2
SESSIONS_USER = "sessions"
SESSIONS_PASSWORD = uuid.uuid4().hex


def as_user(amqp_url: str, user: str, password: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{quote(user)}:{quote(password)}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.fixture(scope="module")
def guarded(rabbitmq: RabbitMqContainer) -> Iterator[LocalCluster]:
    """Workers that take only ``REGISTRY/allowed/...`` images, and only from ``sessions``."""
    amqp_url = new_vhost(rabbitmq)
    vhost = urlsplit(amqp_url).path.lstrip("/")
    for command in (
        ["rabbitmqctl", "add_user", SESSIONS_USER, SESSIONS_PASSWORD],
        ["rabbitmqctl", "set_permissions", "-p", vhost, SESSIONS_USER, ".*", ".*", ".*"],
    ):
        code, output = rabbitmq.exec(command)
        assert code == 0 or b"already exists" in output, output
    port = free_port()
    cluster = start_cluster(
        amqp_url,
        nodes=NODES,
        registry_port=port,
        PULLER_ALLOWED_IMAGES=f"127.0.0.1:{port}/allowed/",
        PULLER_ALLOWED_PUBLISHERS=SESSIONS_USER,
    )
    yield cluster
    cluster.remove()


@pytest.fixture(scope="module")
def sessions(guarded: LocalCluster) -> Iterator[Publisher]:
    url = as_user(guarded.amqp_url, SESSIONS_USER, SESSIONS_PASSWORD)
    with Publisher(url, roster_max_age=ROSTER_MAX_AGE) as publisher:
        yield publisher


def push(cluster: LocalCluster, repository: str) -> str:
    return cluster.registry.push_files(
        f"{repository}/{uuid.uuid4().hex[:8]}", "1", {"f.txt": uuid.uuid4().bytes}
    )


def forbidden_answers(worker: object) -> float:
    return worker.metric(  # type: ignore[attr-defined, no-any-return]
        "puller_worker_answers_total", status="failed", error_kind="forbidden"
    )


def test_an_allowed_image_from_an_allowed_publisher_is_pulled(
    guarded: LocalCluster, sessions: Publisher
) -> None:
    image = push(guarded, "allowed")
    report = sessions.pull(image, expect=NODES, timeout=60)
    assert report.ok, report.to_json()
    assert all(engine_has(guarded, image).values())


def test_an_image_outside_the_allow_list_is_refused_by_every_node_and_never_pulled(
    guarded: LocalCluster, sessions: Publisher
) -> None:
    image = push(guarded, "elsewhere")  # in the registry: only the rule stops it
    report = sessions.pull(image, expect=NODES, timeout=30)
    assert len(report.failed) == NODES, report.to_json()
    for result in report.failed:
        assert result.error is not None
        assert result.error.kind is ErrorKind.FORBIDDEN
        assert "PULLER_ALLOWED_IMAGES" in result.error.message
        assert f"{guarded.registry.address}/allowed" in result.error.message
    assert not any(engine_has(guarded, image).values())


def test_a_publisher_not_allowed_is_refused_by_every_node(guarded: LocalCluster) -> None:
    image = push(guarded, "allowed")
    with Publisher(guarded.amqp_url, roster_max_age=ROSTER_MAX_AGE) as guest:
        report = guest.pull(image, expect=NODES, timeout=30)
    assert len(report.failed) == NODES, report.to_json()
    for result in report.failed:
        assert result.error is not None and result.error.kind is ErrorKind.FORBIDDEN
        assert "'guest'" in result.error.message
        assert "PULLER_ALLOWED_PUBLISHERS" in result.error.message
    assert not any(engine_has(guarded, image).values())


def test_only_an_allowed_publisher_may_prune(guarded: LocalCluster, sessions: Publisher) -> None:
    image = push(guarded, "allowed")
    assert sessions.pull(image, expect=NODES, timeout=60).ok
    with Publisher(guarded.amqp_url, roster_max_age=ROSTER_MAX_AGE) as guest:
        refused = guest.prune(0.0, expect=NODES)
    assert len(refused.answers) == NODES and not refused.ok
    for answer in refused.answers:
        assert isinstance(answer, PruneResult) and answer.error is not None
        assert answer.error.kind is ErrorKind.FORBIDDEN
        assert "nothing was pruned" in answer.error.message
    assert all(engine_has(guarded, image).values())
    allowed = sessions.prune(0.0, expect=NODES, dry_run=True)
    assert allowed.ok, allowed.to_json()


def test_rabbitmq_refuses_a_request_whose_user_id_is_not_its_publishers(
    guarded: LocalCluster,
) -> None:
    """What makes ``PULLER_ALLOWED_PUBLISHERS`` mean anything: guest cannot pass as sessions."""
    request = PullRequest.new(parse_reference(push(guarded, "allowed")))
    connection = pika.BlockingConnection(pika.URLParameters(guarded.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish(
                topo.PULLS.name,
                "",
                request.encode(),
                pika.BasicProperties(content_type=CONTENT_TYPE, user_id=SESSIONS_USER),
            )
        assert refused.value.reply_code == 406
        assert "user_id" in refused.value.reply_text
    finally:
        connection.close()


def test_a_replayed_request_is_held_to_the_same_rules(
    guarded: LocalCluster, sessions: Publisher
) -> None:
    """The history keeps who asked (the stream stores ``user_id``): a node catching up
    refuses what it would have refused live."""
    worker = guarded.workers[0]
    worker.stop()
    try:
        refused = push(guarded, "allowed")
        with Publisher(guarded.amqp_url, roster_max_age=ROSTER_MAX_AGE) as guest:
            guest.request(refused)  # answered forbidden by the other node
        wanted = push(guarded, "allowed")
        sessions.request(wanted)
    finally:
        worker.start()
    deadline = time.monotonic() + 60
    while worker.metric("puller_worker_caught_up") < 1:
        assert time.monotonic() < deadline, "the node did not catch up"
        time.sleep(0.2)
    assert worker.metric("puller_worker_replay_skipped_total", reason="forbidden") >= 1
    assert worker.metric("puller_worker_replay_failed_total") == 0
    assert engine_has(guarded, wanted)[guarded.engines[0].name]
    assert not any(engine_has(guarded, refused).values())


def test_a_publisher_with_the_policy_refuses_before_publishing(guarded: LocalCluster) -> None:
    policy = ImagePolicy(allowed_prefixes(f"{guarded.registry.address}/allowed"))
    before = [forbidden_answers(w) for w in guarded.workers]
    with Publisher(guarded.amqp_url, policy=policy) as publisher:
        with pytest.raises(Forbidden, match="PULLER_ALLOWED_IMAGES"):
            publisher.request(f"{guarded.registry.address}/elsewhere/x:1")
        with pytest.raises(Forbidden, match="PULLER_ALLOWED_IMAGES"):
            publisher.pull("busybox", expect=NODES, timeout=5)
    time.sleep(1)  # had anything been published, the nodes would have answered by now
    assert [forbidden_answers(w) for w in guarded.workers] == before


def test_the_cli_with_the_policy_refuses_before_publishing(guarded: LocalCluster) -> None:
    before = [forbidden_answers(w) for w in guarded.workers]
    result = run_cli(
        "--amqp-url",
        guarded.amqp_url,
        "pull",
        "busybox",
        env={"PULLER_ALLOWED_IMAGES": f"{guarded.registry.address}/allowed/"},
    )
    assert result.returncode == 2, result
    assert "forbidden" in result.stderr
    assert "PULLER_ALLOWED_IMAGES" in result.stderr
    time.sleep(1)  # had anything been published, the nodes would have answered by now
    assert [forbidden_answers(w) for w in guarded.workers] == before


def test_a_node_over_its_cap_answers_rate_limited(rabbitmq: RabbitMqContainer) -> None:
    cluster = start_cluster(new_vhost(rabbitmq), nodes=1, PULLER_MAX_REQUESTS_PER_MINUTE="2")
    try:
        images = [push(cluster, "capped") for _ in range(3)]
        with Publisher(cluster.amqp_url, roster_max_age=ROSTER_MAX_AGE) as publisher:
            reports = [publisher.pull(image, expect=1, timeout=60) for image in images]
            again = publisher.pull(images[0], expect=1, timeout=30)
    finally:
        cluster.remove()
    assert [r.ok for r in reports] == [True, True, False]
    [limited] = reports[2].failed
    assert limited.error is not None and limited.error.kind is ErrorKind.RATE_LIMITED
    assert "PULLER_MAX_REQUESTS_PER_MINUTE" in limited.error.message
    # An image the node has is answered from memory, whatever the cap.
    assert again.ok and again.nodes[0].status is Status.PRESENT
