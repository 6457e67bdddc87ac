"""The fleet page (``GET /`` on ``puller-http``) in a real browser: Debian's Chromium driven by
Playwright, against the local cluster's gateway, workers, engines and registry.

A screenshot of the page is kept in ``artefacts/`` (or ``$PULLER_TEST_ARTEFACTS``), which
.gitignore covers."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from testcontainers.community.rabbitmq import RabbitMqContainer

from contract import CONTENT_TYPE, NodePresence, NodeState
from contract import topology as topo
from localcluster.cluster import GatewayProcess, LocalCluster
from tests.integration.conftest import NODES, run_cli
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.test_broker_users import set_up_vhost
from tests.waiting import eventually

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ARTEFACTS = Path(os.environ.get("PULLER_TEST_ARTEFACTS", Path(__file__).parents[2] / "artefacts"))
WAIT_MS = 60_000
PULL_SIZE = 1_500_000
PULL_RATE = 100_000
"""Bytes a second per node while throttled: the pull takes 15 s at least until released."""
HOSTILE = '<img src=x onerror="window.pwned=1">"\'&amp;'

STATES_OF_COLUMN = """image => Object.fromEntries(
  [...document.querySelectorAll('#matrix tbody tr')].map(tr => {
    const td = [...tr.querySelectorAll('td')].find(t => t.dataset.image === image);
    return [tr.dataset.node, td ? td.firstChild.dataset.state : null];
  }))"""


@pytest.fixture(scope="module")
def gateways(cluster: LocalCluster) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """The default gateway (read-only page), and one whose page may act."""
    read_only = GatewayProcess(cluster.amqp_url, cluster.root / "fleet-read-only.log")
    acting = GatewayProcess(
        cluster.amqp_url,
        cluster.root / "fleet-actions.log",
        extra_env={"PULLER_HTTP_FLEET_ACTIONS": "true"},
    )
    read_only.start()
    try:
        acting.start()
        try:
            yield read_only, acting
        finally:
            acting.stop()
    finally:
        read_only.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # root may not use Chromium's sandbox; the page is the suite's own
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def console_errors() -> list[str]:
    """What the page's console said was an error (a test removes the ones it caused)."""
    return []


@pytest.fixture
def page(browser: Browser, console_errors: list[str]) -> Iterator[Page]:
    opened = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = console_errors
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" else None,
    )
    yield opened
    opened.close()
    assert errors == [], errors  # no script error, no refused inline script or style


CELLS_OF_COLUMN = """image => Object.fromEntries(
  [...document.querySelectorAll('#matrix tbody tr')].map(tr => {
    const td = [...tr.querySelectorAll('td')].find(t => t.dataset.image === image);
    const span = td ? td.firstChild : null;
    return [tr.dataset.node, span ? {state: span.dataset.state, title: span.title} : null];
  }))"""


def cells(page: Page, image: str) -> dict[str, dict[str, str | None]]:
    """Each node's cell for ``image``: its state code and hover text."""
    found: dict[str, dict[str, str | None]] = page.evaluate(CELLS_OF_COLUMN, image)
    return found


def column(page: Page, image: str) -> dict[str, str | None]:
    found: dict[str, str | None] = page.evaluate(STATES_OF_COLUMN, image)
    return found


def wait_for_column(page: Page, image: str, states: dict[str, str]) -> None:
    page.wait_for_function(
        f"want => JSON.stringify(({STATES_OF_COLUMN})(want.image)) === JSON.stringify(want.states)",
        arg={"image": image, "states": states},
        timeout=WAIT_MS,
    )


def node_names(cluster: LocalCluster) -> list[str]:
    return sorted(engine.name for engine in cluster.engines)


@pytest.fixture
def slow_link(cluster: LocalCluster) -> Iterator[TcpProxy]:
    """The cluster's registry behind a proxy that may throttle what the nodes download."""
    proxy = TcpProxy(("127.0.0.1", cluster.registry.port))
    yield proxy
    proxy.close()


def test_the_page_shows_every_node_a_cli_pull_turning_present_and_a_drifted_node(
    cluster: LocalCluster,
    gateways: tuple[GatewayProcess, GatewayProcess],
    page: Page,
    slow_link: TcpProxy,
) -> None:
    # at most PULL_RATE bytes a second per node until the page has seen each one pulling
    pushed = cluster.registry.push_sized(f"test/{uuid.uuid4().hex[:10]}", "1", [PULL_SIZE])
    fresh_image = f"{slow_link.address}/{pushed.split('/', 1)[1]}"
    slow_link.throttle(PULL_RATE)
    read_only, _ = gateways
    nodes = node_names(cluster)
    response = page.goto(read_only.url)
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    page.wait_for_selector("body[data-ready]", timeout=WAIT_MS)
    roster = page.locator("#roster tbody tr").evaluate_all("rows => rows.map(r => r.dataset.node)")
    assert roster == nodes
    assert page.locator("#actions").is_hidden()  # read-only by default

    # asked by another publisher, named nowhere: the page learns it from the history, and
    # each node's answer to the page's check says how far its pull for the CLI is
    answers: dict[str, subprocess.CompletedProcess[str]] = {}
    cli = threading.Thread(
        target=lambda: answers.update(
            pulled=run_cli("pull", fresh_image, "--timeout", "90", env=puller_env(cluster))
        )
    )
    cli.start()
    try:
        page.wait_for_function(
            f"want => {{ const found = Object.values(({CELLS_OF_COLUMN})(want.image));"
            " return found.length === want.nodes && found.every("
            "c => c && c.state === 'u' && /\\d+%/.test(c.title)); }",
            arg={"image": fresh_image, "nodes": len(nodes)},
            timeout=WAIT_MS,
        )
        pulling = cells(page, fresh_image)
    finally:
        slow_link.throttle(None)
        cli.join(timeout=120)
    assert sorted(pulling) == nodes
    assert all(re.search(r"\d+%", cell["title"] or "") for cell in pulling.values()), pulling
    pulled = answers["pulled"]
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    wait_for_column(page, fresh_image, dict.fromkeys(nodes, "p"))

    # one node's tag moved by hand, through its own engine, to another image
    other = cluster.registry.push_files("test/drift", "1", {"other.txt": os.urandom(16)})
    client = cluster.engines[0].client()
    try:
        client.images.pull(other)
        repository, _, tag = fresh_image.rpartition(":")
        client.images.get(other).tag(repository, tag)
    finally:
        client.close()
    wait_for_column(page, fresh_image, {**dict.fromkeys(nodes, "p"), nodes[0]: "d"})
    hover = page.locator(f'#matrix tr[data-node="{nodes[0]}"] td .cell.d').get_attribute("title")
    assert hover is not None and "drift" in hover
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTEFACTS / "fleet-page.png", full_page=True)


def test_an_action_works_where_enabled_and_is_refused_where_not(
    cluster: LocalCluster,
    gateways: tuple[GatewayProcess, GatewayProcess],
    page: Page,
    fresh_image: str,
) -> None:
    read_only, acting = gateways
    nodes = node_names(cluster)
    status, body = post_action(read_only, {"action": "warm", "images": [fresh_image]})
    assert status == 403, body
    assert "PULLER_HTTP_FLEET_ACTIONS" in body["exception"]["message"]
    status, body = post_action(acting, {"action": "warm", "images": ["not an image!"]})
    assert status == 400, body

    page.goto(f"{acting.url}/?image={quote(fresh_image)}")  # a page may name an image
    wait_for_column(page, fresh_image, dict.fromkeys(nodes, "a"))
    page.fill("#action-images", fresh_image)
    page.click("button[data-action=warm]")
    page.wait_for_function(
        "() => document.getElementById('action-result').textContent.startsWith('warm started')",
        timeout=WAIT_MS,
    )
    wait_for_column(page, fresh_image, dict.fromkeys(nodes, "p"))
    page.click("button[data-action=check]")
    page.wait_for_function(
        f"() => document.getElementById('action-result').textContent.includes("
        f"'present on {NODES} of {NODES}')",
        timeout=WAIT_MS,
    )


def test_100_nodes_by_100_images_draw_whole_and_readable(
    gateways: tuple[GatewayProcess, GatewayProcess], page: Page
) -> None:
    read_only, _ = gateways
    nodes = [f"node-{i:03}.eu-west-1.compute.internal" for i in range(100)]
    images = [f"docker.io/cyberdojofoundation/language_{i:03}:93eefc6" for i in range(100)]
    states: list[object] = ["p"] * 6 + ["a", ["u", 40], ["w", 12], ["f", "stalled", "no byte"]]
    document = {
        "nodes": [{"name": n, "state": "up", "last_seen": 1e9, "version": "0.1.0"} for n in nodes],
        "images": images,
        "cells": [[states[(i + j) % len(states)] for j in range(100)] for i in range(100)],
        "hidden_nodes": 0,
        "notes": [],
        "actions": False,
        "generated_at": 1e9 + 2,
    }
    body = json.dumps(document, separators=(",", ":"))
    page.route(
        "**/fleet.json*",
        lambda route: route.fulfill(status=200, content_type="application/json", body=body),
    )
    page.goto(read_only.url)
    page.wait_for_selector("body[data-ready]", timeout=WAIT_MS)
    assert page.locator("#matrix tbody .cell").count() == 100 * 100
    box = page.locator("#matrix tbody .cell").first.bounding_box()
    assert box is not None and box["width"] >= 10  # a cell stays big enough to see and point at
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTEFACTS / "fleet-page-100x100.png")


def test_hostile_names_are_shown_as_text_never_run(
    cluster: LocalCluster,
    gateways: tuple[GatewayProcess, GatewayProcess],
    page: Page,
    console_errors: list[str],
) -> None:
    read_only, _ = gateways
    page.goto(f"{read_only.url}/?image={quote('<script>window.pwned=1</script>')}")
    page.wait_for_function(
        "() => document.getElementById('error').textContent.includes('<script>')",
        timeout=WAIT_MS,
    )
    assert console_errors == [
        "Failed to load resource: the server responded with a status of 400 (Bad Request)"
    ]  # /fleet.json refused the name
    console_errors.clear()
    announce(cluster, NodeState.UP)
    try:
        page.goto(read_only.url)
        page.wait_for_function(
            "name => [...document.querySelectorAll('#roster tbody tr')]"
            ".some(r => r.firstChild.textContent === name)",
            arg=HOSTILE,
            timeout=WAIT_MS,
        )
        assert page.evaluate("() => window.pwned") is None
        assert page.locator("#roster img, #matrix img").count() == 0
    finally:
        announce(cluster, NodeState.LEAVING)  # out of the roster for the tests after this one


def test_a_gateway_whose_user_may_not_read_the_history_says_so_and_shows_its_own(
    rabbitmq: RabbitMqContainer, management: str, tmp_path: Path
) -> None:
    broker = set_up_vhost(rabbitmq, management, "fleet")  # broker-setup's users
    gateway = GatewayProcess(broker.url("sessions"), tmp_path / "gateway.log")
    gateway.start()
    try:
        image = "127.0.0.1:5000/demo/asked-here:1"
        status, _ = call(gateway, "POST", "/pull_images", {"id": "s1", "image_name": image})
        assert status == 200
        found: dict[str, Any] = {}

        def said() -> bool:
            found.update(call(gateway, "GET", "/fleet.json")[1])
            return any("puller.history.stream" in note for note in found.get("notes", []))

        eventually(said, "the page never said the history cannot be read", timeout=30)
        assert "ACCESS_REFUSED" in found["notes"][0]
        assert found["images"] == [image]  # asked through this gateway: still shown
    finally:
        gateway.stop()


def call(
    gateway: GatewayProcess, method: str, path: str, arguments: dict[str, Any] | None = None
) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        body = json.dumps(arguments).encode() if arguments is not None else None
        connection.request(method, path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def announce(cluster: LocalCluster, state: NodeState) -> None:
    """A presence announcement of a node named :data:`HOSTILE`, as any worker user may send."""
    now = time.time()
    message = NodePresence(HOSTILE, "1.0", None, now, now, state=state, caught_up=True)
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        channel = connection.channel()
        channel.basic_publish(
            topo.PRESENCE.name,
            "",
            message.encode(),
            pika.BasicProperties(content_type=CONTENT_TYPE),
        )
    finally:
        connection.close()


def post_action(gateway: GatewayProcess, arguments: dict[str, Any]) -> tuple[int, Any]:
    return call(gateway, "POST", "/fleet/actions", arguments)


def puller_env(cluster: LocalCluster) -> dict[str, str]:
    return {"PULLER_AMQP_URL": cluster.amqp_url}
