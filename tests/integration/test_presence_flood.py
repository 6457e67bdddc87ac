"""A flood of the presence stream does not blind the roster: real RabbitMQ set up by
``broker-setup`` (users and bounds), real workers and a real ``puller-http`` as the publisher
user, and pika as the any-node worker user publishing junk to ``puller.presence`` as fast as
one connection can (every worker user may publish there: it announces its node).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from localcluster.cluster import GatewayProcess, LocalCluster
from localcluster.faults import flood_presence
from publisher.broker_setup import Bounds
from tests.integration.conftest import run_cli, start_cluster
from tests.integration.test_broker_users import Broker, set_up_vhost

NODES = 2
FLOODED = 40_000
"""Messages in the stream behind which the roster is asked: seconds of reading for pika,
more than the gateway's ``PULLER_CONNECT_TIMEOUT`` here."""


@pytest.fixture(scope="module")
def setup_vhost(rabbitmq: RabbitMqContainer, management: str) -> Broker:
    return set_up_vhost(rabbitmq, management, "flood", Bounds())


@pytest.fixture(scope="module")
def flooded(setup_vhost: Broker) -> Iterator[tuple[LocalCluster, GatewayProcess]]:
    """Two nodes and a gateway whose roster was read once; then a flood, running."""
    cluster = start_cluster(setup_vhost.url("workers"), nodes=NODES)
    flood: subprocess.Popen[str] | None = None
    try:
        gateway = GatewayProcess(
            setup_vhost.url("sessions"),
            Path(tempfile.mkdtemp(prefix="pt-gw-", dir="/tmp")) / "gateway.log",
            extra_env={"PULLER_CONNECT_TIMEOUT": "2"},
        )
        cluster.gateway = gateway
        gateway.start()
        status, roster = get(gateway, "/nodes")
        assert status == 200 and "notes" not in roster, roster
        assert nodes_of(roster) == ["node-1", "node-2"]
        flood = flood_presence(setup_vhost.url("workers"), 60)
        assert flood.stdout is not None
        began = time.monotonic()
        for line in flood.stdout:  # until the stream holds seconds' worth of junk
            if int(line) >= FLOODED:
                print(f"flooding at {FLOODED / (time.monotonic() - began):.0f} messages/s")
                break
        yield cluster, gateway
    finally:
        if flood is not None:
            flood.kill()
            flood.wait()
            if flood.stdout is not None:
                flood.stdout.close()
        cluster.remove()


def get(gateway: GatewayProcess, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{gateway.url}{path}", timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(gateway: GatewayProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - the gateway's http URL
        f"{gateway.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def nodes_of(roster: dict[str, Any]) -> list[str]:
    return [node["node"] for node in roster["nodes"]]


def test_the_gateway_lists_the_nodes_while_the_presence_stream_is_flooded(
    flooded: tuple[LocalCluster, GatewayProcess],
) -> None:
    _, gateway = flooded
    for _ in range(3):
        started = time.monotonic()
        status, roster = get(gateway, "/nodes")
        print(f"GET /nodes under the flood: {status} in {time.monotonic() - started:.2f}s")
        assert status == 200, roster
        assert nodes_of(roster) == ["node-1", "node-2"]


def test_a_pull_without_expect_waits_for_every_node_while_the_stream_is_flooded(
    flooded: tuple[LocalCluster, GatewayProcess],
) -> None:
    cluster, gateway = flooded
    image = cluster.registry.push_files(f"flood/{uuid.uuid4().hex[:8]}", "1", {"f": b"x"})
    started = time.monotonic()
    status, report = post(gateway, "/pulls", {"image": image, "timeout": 30})
    print(f"POST /pulls under the flood: {status} in {time.monotonic() - started:.2f}s")
    assert status == 200, report
    assert report["ok"] is True, report
    assert report["expected"] == NODES
    assert [row["node"] for row in report["nodes"]] == ["node-1", "node-2"]


def test_the_cli_answers_while_the_stream_is_flooded_complete_or_saying_it_is_not(
    setup_vhost: Broker, flooded: tuple[LocalCluster, GatewayProcess]
) -> None:
    """A fresh reader has the window to read, flood and all: it answers in time, instead of
    failing, with every node, or with what it read and a warning that the stream is
    flooded. (Which of the two depends on how fast this machine reads the window.)"""
    started = time.monotonic()
    result = run_cli("--amqp-url", setup_vhost.url("sessions"), "nodes", "--json", timeout=60)
    took = time.monotonic() - started
    print(f"puller nodes under the flood: exit {result.returncode} in {took:.2f}s")
    assert result.returncode == 0, result
    answer = json.loads(result.stdout)
    if any("flooded" in note for note in answer.get("notes", [])):
        assert "flooded" in result.stderr
    else:
        assert "flooded" not in result.stderr
        assert nodes_of(answer) == ["node-1", "node-2"], answer
