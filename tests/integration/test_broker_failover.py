"""Several brokers in PULLER_AMQP_URL: worker, publisher and CLI use the first that answers,
and say which; when none does, the error names each one and why."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import BrokerUnavailable
from localcluster.faults import BlackHole
from localcluster.processes import free_port
from publisher import Publisher
from tests.integration.conftest import ROSTER_MAX_AGE, new_vhost, run_cli, start_cluster


def dead_twin(url: str) -> str:
    """The same URL on a port where nothing listens: a broker node that is down."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{free_port()}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def test_a_worker_and_a_publisher_use_the_broker_that_answers(
    rabbitmq: RabbitMqContainer,
) -> None:
    url = new_vhost(rabbitmq)
    brokers = f"{dead_twin(url)},{url}"
    cluster = start_cluster(brokers, nodes=1)
    try:
        image = cluster.registry.push_files(
            f"failover/{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
        )
        with Publisher(brokers, roster_max_age=ROSTER_MAX_AGE) as publisher:
            report = publisher.pull(image, expect=1, timeout=60)
        assert report.ok, report.to_json()
        nodes = run_cli("--amqp-url", brokers, "nodes", "--json")
        assert nodes.returncode == 0, nodes.stderr
        assert [n["node"] for n in json.loads(nodes.stdout)["nodes"]] == ["node-1"]
        log = cluster.workers[0].log_path.read_text()
        assert "connected to another broker" in log
    finally:
        cluster.remove()


def test_when_no_broker_answers_the_error_names_each(rabbitmq: RabbitMqContainer) -> None:
    url = new_vhost(rabbitmq)
    first, second = dead_twin(url), dead_twin(url)
    with (
        Publisher(f"{first},{second}", connect_timeout=5) as publisher,
        pytest.raises(BrokerUnavailable, match="none of the 2 brokers answered") as raised,
    ):
        publisher.request("busybox")
    for dead in (first, second):
        assert str(urlsplit(dead).port) in str(raised.value)
    assert "guest:guest" not in str(raised.value)


def black_hole_twin(url: str, hole: BlackHole) -> str:
    """The same URL at a broker node that accepts connections and never says a word (a
    node frozen, or a network that drops every packet after the handshake)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[0] + f"@{hole.address}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@pytest.mark.long  # 16 s, a worker's 10 s connect timeout; a refusing node stays in CI (above)
def test_a_silent_broker_node_first_costs_one_connect_timeout(
    rabbitmq: RabbitMqContainer,
) -> None:
    url = new_vhost(rabbitmq)
    hole = BlackHole()
    brokers = f"{black_hole_twin(url, hole)},{url}"
    cluster = start_cluster(brokers, nodes=1)  # the worker gives a node 10 s
    try:
        image = cluster.registry.push_files(
            f"failover/{uuid.uuid4().hex[:8]}", "1", {"f": uuid.uuid4().bytes}
        )
        started = time.monotonic()
        with Publisher(brokers, connect_timeout=3, roster_max_age=ROSTER_MAX_AGE) as publisher:
            report = publisher.pull(image, expect=1, timeout=60)
        assert report.ok, report.to_json()
        # The silent node is given up after the connect timeout, not TCP's minutes.
        assert time.monotonic() - started < 3 + 30
        assert hole.connections >= 2  # both the worker and the publisher tried it
        assert "connected to another broker" in cluster.workers[0].log_path.read_text()
    finally:
        cluster.remove()
        hole.close()
