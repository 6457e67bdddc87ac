"""``puller-http`` on the local cluster, called by real HTTP clients: Python's http.client,
curl, and a Ruby client written the way cyber-dojo's services call each other."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testcontainers.community.rabbitmq import RabbitMqContainer

from localcluster.cluster import GatewayProcess, LocalCluster, WorkerProcess, metric_value
from tests.integration.conftest import NODES, engine_has, new_vhost
from tests.unit.test_http_server import MALFORMED, SMUGGLED, answers

pytestmark = pytest.mark.integration

SHA = "0123456789abcdef0123456789abcdef01234567"
RUBY_CLIENT = Path(__file__).parent / "clients" / "puller_client.rb"


@pytest.fixture(scope="module")
def gateway(cluster: LocalCluster) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        cluster.amqp_url,
        cluster.root / "gateway.log",
        extra_env={"SHA": SHA, "PULLER_HTTP_MAX_TIMEOUT": "60"},
    )
    process.start()
    yield process
    process.stop()


def call(
    gateway: GatewayProcess,
    path: str,
    body: bytes | None = None,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        assert response.getheader("Content-Type", "").startswith(
            "application/json" if path != "/metrics" else "text/plain"
        )
        return response.status, json.loads(data) if path != "/metrics" else data.decode()
    finally:
        connection.close()


def post(gateway: GatewayProcess, path: str, arguments: dict[str, Any]) -> tuple[int, Any]:
    return call(
        gateway, path, json.dumps(arguments).encode(), headers={"Content-Type": "application/json"}
    )


def test_the_originals_probes_answer_as_it_did_to_any_method_and_body(
    gateway: GatewayProcess,
) -> None:
    for method in ("GET", "POST"):
        for body in (None, b"", b"{}"):
            assert call(gateway, "/sha", body, method) == (200, {"sha": SHA})
            assert call(gateway, "/alive", body, method) == (200, {"alive?": True})
            assert call(gateway, "/ready", body, method) == (200, {"ready?": True})
    # the Kubernetes probes of the original asked /alive? and /ready?
    assert call(gateway, "/ready?", None, "GET") == (200, {"ready?": True})


def wait_for_answers(
    gateway: GatewayProcess, request_id: str, count: int = NODES
) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status, body = call(gateway, f"/pulls/{request_id}", method="GET")
        assert status == 200, body
        if body["answered"] >= count or time.monotonic() > deadline:
            return dict(body)
        time.sleep(0.2)


def test_pull_images_answers_at_once_and_the_image_reaches_every_engine(
    cluster: LocalCluster, gateway: GatewayProcess, fresh_image: str
) -> None:
    status, body = post(gateway, "/pull_images", {"id": "a1b2c3", "image_name": fresh_image})
    assert status == 200, body
    answer = body["pull_images"]
    assert set(answer) == {"id", "image", "request_id", "reached_nodes"}
    assert (answer["id"], answer["image"], answer["reached_nodes"]) == (
        "a1b2c3",
        fresh_image,
        True,
    )
    progress = wait_for_answers(gateway, answer["request_id"])
    assert progress["image"] == fresh_image
    assert {row["status"] for row in progress["nodes"]} == {"pulled"}
    assert all(engine_has(cluster, fresh_image).values())
    # the session id reached the workers' logs with the request
    logged = [
        json.loads(line)
        for worker in cluster.workers
        for line in worker.log_path.read_text().splitlines()
        if line.startswith("{") and answer["request_id"] in line
    ]
    assert {line.get("session_id") for line in logged} == {"a1b2c3"}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/nope", b"{}", "unknown path"),
        ("/nope", b"not json", "body is not JSON"),  # the body is read first, as the original
        ("/pull_images", b"{", "body is not JSON"),
        ("/pull_images", b"[1]", "body is not JSON Hash"),
        ("/pull_images", b"123", "body is not JSON Hash"),
        ("/pull_images", b'{"image_name": "busybox"}', "missing argument: :id"),
        ("/pull_images", b"{}", "missing arguments: :id, :image_name"),
        (
            "/pull_images",
            b'{"id": "s1", "image_name": "busybox", "whiskey": 1}',
            "unknown argument: :whiskey",
        ),
        ("/sha", b'{"x": 42, "y": 1}', "unknown arguments: :x, :y"),
        ("/pull_images", b'{"id": "s1", "image_name": "Not An Image"}', "invalid argument"),
        ("/pull_images", b'{"id": 7, "image_name": "busybox"}', "invalid argument: :id must"),
    ],
)
def test_every_error_is_the_originals_json_exception(
    gateway: GatewayProcess, path: str, body: bytes, message: str
) -> None:
    status, document = call(gateway, path, body)
    assert status == 400
    assert document == {
        "exception": {
            "path": path,
            "body": body.decode(),
            "class": "Puller",
            "message": document["exception"]["message"],
        }
    }
    assert document["exception"]["message"].startswith(message)


def test_post_pulls_waits_like_the_cli_and_nodes_lists_the_roster(
    cluster: LocalCluster, gateway: GatewayProcess, fresh_image: str
) -> None:
    status, report = post(gateway, "/pulls", {"image": fresh_image, "expect": NODES, "timeout": 60})
    assert status == 200, report
    assert report["ok"] is True
    assert report["expected"] == NODES
    assert [row["node"] for row in report["nodes"]] == [w.node for w in cluster.workers]
    assert {row["status"] for row in report["nodes"]} == {"pulled"}
    status, roster = call(gateway, "/nodes", method="GET")
    assert status == 200
    assert [n["node"] for n in roster["nodes"]] == [w.node for w in cluster.workers]
    status, missing = call(gateway, f"/pulls/{uuid.uuid4().hex}", method="GET")
    assert status == 404 and "no request" in missing["exception"]["message"]


def test_a_caller_waiting_in_post_pulls_never_delays_pull_images(
    gateway: GatewayProcess, fresh_image: str
) -> None:
    waiting = threading.Thread(
        target=post,
        args=(gateway, "/pulls", {"image": fresh_image, "nodes": ["ghost"], "timeout": 6}),
    )
    waiting.start()
    time.sleep(0.5)
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    took = []
    try:
        body = json.dumps({"id": "s", "image_name": fresh_image}).encode()
        for _ in range(100):
            started = time.monotonic()
            connection.request("POST", "/pull_images", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            took.append(time.monotonic() - started)
            assert response.status == 200
    finally:
        connection.close()
    assert waiting.is_alive(), "the waiting caller ended early: the test proved nothing"
    waiting.join()
    took.sort()
    assert took[-1] < 1.0, f"slowest /pull_images took {took[-1]:.3f}s"


def worker_metric(workers: list[WorkerProcess], name: str, **labels: str) -> float:
    return sum(w.metric(name, **labels) for w in workers)


def test_metrics_move_by_exactly_what_happened(
    cluster: LocalCluster, gateway: GatewayProcess, fresh_image: str
) -> None:
    _, before = call(gateway, "/metrics", method="GET")
    workers = cluster.workers
    pulled_before = worker_metric(workers, "puller_worker_answers_total", status="pulled")
    attempts_before = worker_metric(workers, "puller_worker_pulls_total", outcome="pulled")
    bytes_before = worker_metric(workers, "puller_worker_pulled_bytes_total")
    present_before = worker_metric(workers, "puller_worker_answers_total", status="present")

    for _ in range(3):
        status, body = post(gateway, "/pull_images", {"id": "m1", "image_name": fresh_image})
        assert status == 200
        wait_for_answers(gateway, body["pull_images"]["request_id"])
    post(gateway, "/pull_images", {"id": "m1"})  # a 400

    _, after = call(gateway, "/metrics", method="GET")
    count = "puller_http_requests_total"
    assert (
        metric_value(after, count, path="/pull_images", status="200")
        - metric_value(before, count, path="/pull_images", status="200")
        == 3
    )
    assert (
        metric_value(after, count, path="/pull_images", status="400")
        - metric_value(before, count, path="/pull_images", status="400")
        == 1
    )
    assert (
        metric_value(after, "puller_http_pull_images_seconds_count")
        - metric_value(before, "puller_http_pull_images_seconds_count")
        == 3
    )
    assert metric_value(after, "puller_http_live_nodes") == NODES
    # one pull per node, then two answers per node that it is there
    assert worker_metric(workers, "puller_worker_answers_total", status="pulled") == (
        pulled_before + NODES
    )
    assert worker_metric(workers, "puller_worker_pulls_total", outcome="pulled") == (
        attempts_before + NODES
    )
    assert worker_metric(workers, "puller_worker_answers_total", status="present") == (
        present_before + 2 * NODES
    )
    assert worker_metric(workers, "puller_worker_pulled_bytes_total") > bytes_before


def ruby(gateway: GatewayProcess, verb: str, name: str, arguments: dict[str, Any]) -> Any:
    done = subprocess.run(
        ["ruby", str(RUBY_CLIENT), gateway.url, verb, name, json.dumps(arguments)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout)


def test_a_ruby_caller_in_cyber_dojos_style_gets_what_it_expects(
    cluster: LocalCluster, gateway: GatewayProcess, fresh_image: str
) -> None:
    assert ruby(gateway, "GET", "ready?", {}) is True
    assert ruby(gateway, "GET", "alive?", {}) is True
    assert ruby(gateway, "GET", "sha", {}) == SHA
    answer = ruby(gateway, "POST", "pull_images", {"id": "r0b1e5", "image_name": fresh_image})
    assert answer["image"] == fresh_image
    wait_for_answers(gateway, answer["request_id"])
    assert all(engine_has(cluster, fresh_image).values())
    with pytest.raises(RuntimeError, match="missing argument: :image_name"):
        ruby(gateway, "POST", "pull_images", {"id": "r0b1e5"})


def test_curl_can_make_the_drop_in_call(gateway: GatewayProcess, fresh_image: str) -> None:
    done = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--header",
            "Content-Type: application/json",
            "--data",
            json.dumps({"id": "c1", "image_name": fresh_image}),
            f"{gateway.url}/pull_images",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout)["pull_images"]["image"] == fresh_image


@pytest.mark.parametrize("name", MALFORMED)
def test_a_request_framed_to_smuggle_another_gets_one_400_and_the_connection_closes(
    gateway: GatewayProcess, name: str
) -> None:
    """Whatever the framing hides, behind it on the same connection goes a second request;
    it must never be answered."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as client:
        client.sendall(MALFORMED[name] + SMUGGLED)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    [(status, headers, body)] = answers(received)
    assert (status, headers["connection"]) == (400, "close")
    assert json.loads(body)["error"]


def test_curl_expecting_100_continue_gets_it_and_does_not_wait(
    gateway: GatewayProcess, fresh_image: str
) -> None:
    """curl waits for ``100 Continue`` before it sends a body (``--expect100-timeout``, 1 s by
    default, 30 s here: a server that never sends it would make this call take 30 s)."""
    started = time.monotonic()
    done = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--verbose",
            "--expect100-timeout",
            "30",
            "--header",
            "Expect: 100-continue",
            "--header",
            "Content-Type: application/json",
            "--data",
            json.dumps({"id": "c100", "image_name": fresh_image}),
            f"{gateway.url}/pull_images",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    took = time.monotonic() - started
    assert "< HTTP/1.1 100 Continue" in done.stderr
    assert json.loads(done.stdout)["pull_images"]["image"] == fresh_image
    assert took < 15, f"curl took {took:.1f} s: it waited for a 100 Continue that never came"


@pytest.fixture(scope="module")
def lonely_gateway(rabbitmq: RabbitMqContainer, cluster: LocalCluster) -> Iterator[GatewayProcess]:
    """A gateway on a vhost where no worker runs."""
    process = GatewayProcess(
        new_vhost(rabbitmq), cluster.root / "lonely.log", extra_env={"PULLER_HTTP_MAX_TIMEOUT": "2"}
    )
    process.start()
    yield process
    process.stop()


def test_a_request_that_reaches_no_node_is_still_accepted_and_says_so(
    lonely_gateway: GatewayProcess,
) -> None:
    status, body = post(lonely_gateway, "/pull_images", {"id": "s9", "image_name": "busybox"})
    assert status == 200
    answer = body["pull_images"]
    assert answer["reached_nodes"] is False
    assert "no nodes" in answer["note"]
    status, report = post(lonely_gateway, "/pulls", {"image": "busybox", "expect": 1})
    assert (status, report["ok"], report["nodes"]) == (200, False, [])


def test_without_rabbitmq_the_gateway_answers_503_and_is_not_ready(
    cluster: LocalCluster,
) -> None:
    process = GatewayProcess(
        "amqp://guest:guest@127.0.0.1:9/%2F",
        cluster.root / "unreachable.log",
        extra_env={"PULLER_CONNECT_TIMEOUT": "1"},
    )
    process.start(wait_ready=False)
    try:
        status, body = call(process, "/ready", method="GET")
        assert status == 503
        assert body["ready?"] is False
        assert "not connected to RabbitMQ" in body["reason"]
        started = time.monotonic()
        status, body = post(process, "/pull_images", {"id": "s", "image_name": "busybox"})
        assert time.monotonic() - started < 5
        assert status == 503
        assert "cannot connect to RabbitMQ at 127.0.0.1:9" in body["exception"]["message"]
        assert call(process, "/alive", method="GET") == (200, {"alive?": True})
    finally:
        process.stop()


def test_the_gateway_matches_its_openapi_document_under_fuzzing(
    lonely_gateway: GatewayProcess,
) -> None:
    # Not checked, and why: positive_data_acceptance (a string the document allows may be
    # an invalid image reference: 400, documented); unsupported_method (the original's
    # paths take any method, as the original did); the stateful and auth checks (no
    # resources to create, no auth).
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{lonely_gateway.url}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_headers_conformance,response_schema_conformance,"
            "negative_data_rejection",
            "--max-examples",
            "40",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_a_burst_of_callers_connecting_at_once_is_served_not_reset(
    gateway: GatewayProcess, fresh_image: str
) -> None:
    # 32 callers connect at once while the gateway is busy: a short listen backlog resets some.
    callers, calls = 32, 30
    start = threading.Barrier(callers)
    failures: list[BaseException] = []
    body = json.dumps({"id": "burst", "image_name": fresh_image}).encode()

    def caller() -> None:
        start.wait()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
            try:
                for _ in range(calls):
                    connection.request("POST", "/pull_images", body)
                    response = connection.getresponse()
                    response.read()
                    assert response.status == 200
            finally:
                connection.close()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_gateway_with_the_policy_refuses_with_403_before_publishing(
    cluster: LocalCluster, fresh_image: str
) -> None:
    """The Ruby caller sees the refusal as the original's exception; nothing is published."""
    allowed = fresh_image.rsplit("/", 1)[0] + "/"
    process = GatewayProcess(
        cluster.amqp_url,
        cluster.root / "guarded-gateway.log",
        extra_env={"PULLER_ALLOWED_IMAGES": allowed, "PULLER_REQUIRE_DIGEST": "false"},
    )
    process.start()
    try:
        with pytest.raises(RuntimeError, match=r"forbidden.*PULLER_ALLOWED_IMAGES"):
            ruby(process, "POST", "pull_images", {"id": "s1", "image_name": "busybox"})
        status, body = post(process, "/pull_images", {"id": "s1", "image_name": "busybox"})
        assert status == 403
        assert body["exception"]["class"] == "Puller"
        assert "PULLER_ALLOWED_IMAGES" in body["exception"]["message"]
        status, body = post(process, "/pulls", {"image": "busybox", "expect": 1})
        assert status == 403
        status, body = post(process, "/pull_images", {"id": "s2", "image_name": fresh_image})
        assert status == 200 and body["pull_images"]["reached_nodes"] is True
        _, metrics = call(process, "/metrics", method="GET")
        refused = metric_value(metrics, "puller_http_publish_failures_total", reason="forbidden")
        assert refused == 3  # the Ruby call, /pull_images and /pulls
    finally:
        process.stop()
