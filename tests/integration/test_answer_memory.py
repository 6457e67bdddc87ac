"""The memory of answers a publisher (and the gateway) keeps stays within its byte budget,
with many nodes answering on the real reply path, and a caller always gets a clear answer."""

from __future__ import annotations

import http.client
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from localcluster.cluster import GatewayProcess, metric_value
from localcluster.fake_nodes import FakeNodes
from publisher import AnswersForgotten, Publisher, PullReport
from publisher.replies import STATUS_ONLY_MESSAGE
from tests.integration.conftest import new_vhost

pytestmark = pytest.mark.integration

BUDGET = 2**20
"""The smallest the setting allows (PULLER_ANSWER_MEMORY_MB=1): about 1,350 whole answers."""
FEW, MANY = 500, 1500
"""Nodes answering each request nobody waits on (three overflow the budget), and the pull a
caller waits on (more than the budget holds whole)."""
FAIL_EVERY = 7


@pytest.fixture
def vhost(rabbitmq: RabbitMqContainer) -> str:
    return new_vhost(rabbitmq)


def image() -> str:
    return f"127.0.0.1:5000/memory/{uuid.uuid4().hex[:8]}:1"


def check_complete_summary(rows: list[dict[str, Any]] | list[Any]) -> None:
    """Every node is there with its status; a failure keeps its kind even when kept short."""
    statuses = Counter(row["status"] for row in rows)
    assert statuses == {"present": MANY - MANY // FAIL_EVERY, "failed": MANY // FAIL_EVERY}
    for row in rows:
        if row["status"] == "failed":
            assert row["error"]["kind"] == "not_found"
            message = row["error"]["message"]
            assert message == STATUS_ONLY_MESSAGE or message.startswith("manifest for ")


def test_a_publishers_answers_stay_within_the_budget_and_a_forgotten_request_is_said(
    vhost: str,
) -> None:
    with Publisher(vhost, answer_memory=BUDGET) as publisher, FakeNodes(vhost, MANY) as nodes:
        requests = []
        for _ in range(3):
            requests.append(publisher.request(image()))
            nodes.answer_next(nodes=FEW)
        assert len(publisher.results(requests[-1], expect=FEW, timeout=30)) == FEW
        memory = publisher.answer_memory()
        assert memory.kept_bytes <= BUDGET and memory.forgotten_requests >= 1
        with pytest.raises(AnswersForgotten, match="PULLER_ANSWER_MEMORY_MB"):
            publisher.known_request(requests[0])
        with pytest.raises(AnswersForgotten):
            publisher.results(requests[0])
        kept = publisher.known_request(requests[-1])
        assert kept is not None and len(kept.results) == FEW

        reports: list[PullReport] = []
        caller = threading.Thread(
            target=lambda: reports.append(publisher.pull(image(), expect=MANY, timeout=60))
        )
        caller.start()
        nodes.answer_next(fail_every=FAIL_EVERY)
        caller.join(timeout=90)
        [report] = reports
        assert len(report.answered) == MANY and report.missing == 0 and not report.ok
        check_complete_summary([r.to_json() for r in report.nodes])
        assert any("kept as node and status only" in note for note in report.notes)
        memory = publisher.answer_memory()
        assert memory.status_only_answers > 0
        assert memory.kept_bytes <= BUDGET  # once nobody waits, the overflow goes


def call(gateway: GatewayProcess, method: str, path: str, body: object = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=90)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        return response.status, text if path == "/metrics" else json.loads(text)
    finally:
        connection.close()


@pytest.fixture
def gateway(vhost: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        vhost, tmp_path / "gateway.log", extra_env={"PULLER_ANSWER_MEMORY_MB": "1"}
    )
    process.start()
    yield process
    process.stop()


def pulled_in_background(gateway: GatewayProcess, arguments: dict[str, Any]) -> Any:
    """``POST /pulls`` on a thread of its own; ``.join()`` then ``.answer``."""

    class Caller(threading.Thread):
        answer: tuple[int, Any] | None = None

        def run(self) -> None:
            self.answer = call(gateway, "POST", "/pulls", arguments)

    caller = Caller()
    caller.start()
    return caller


def test_the_gateways_answers_stay_within_the_budget_and_a_forgotten_request_gets_410(
    vhost: str, gateway: GatewayProcess
) -> None:
    with FakeNodes(vhost, MANY) as nodes:
        requests = []
        for n in range(3):
            arguments = {"id": f"s{n}", "image_name": image()}
            status, body = call(gateway, "POST", "/pull_images", arguments)
            assert status == 200, body
            requests.append(body["pull_images"]["request_id"])
            nodes.answer_next(nodes=FEW)
        caller = pulled_in_background(gateway, {"image": image(), "expect": MANY, "timeout": 60})
        nodes.answer_next(fail_every=FAIL_EVERY)  # after the others: they are all in by then
        caller.join(timeout=90)
        status, report = caller.answer
        assert status == 200, report
        assert report["missing"] == 0 and len(report["nodes"]) == MANY
        check_complete_summary(report["nodes"])
        assert any("kept as node and status only" in note for note in report["notes"])

        status, forgotten = call(gateway, "GET", f"/pulls/{requests[0]}")
        assert status == 410, forgotten
        message = forgotten["exception"]["message"]
        assert "were forgotten" in message and "PULLER_ANSWER_MEMORY_MB" in message
        status, unknown = call(gateway, "GET", f"/pulls/{uuid.uuid4()}")
        assert status == 404 and "no request" in unknown["exception"]["message"]

        _, page = call(gateway, "GET", "/metrics")
        memory, evicted = (
            "puller_http_answer_memory_bytes",
            "puller_http_answer_memory_evictions_total",
        )
        assert metric_value(page, memory, kind="kept") <= BUDGET  # the pull alone overflowed it
        assert metric_value(page, memory, kind="budget") == BUDGET
        assert metric_value(page, evicted, what="requests") >= 1
        assert metric_value(page, evicted, what="status_only") > 0
