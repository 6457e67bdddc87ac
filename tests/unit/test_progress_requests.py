"""Who asks the nodes for progress reports: the library, the CLI and the gateway ask exactly
when they show them. Through a stand-in for the publisher's connection that records what is
published and answers each pull as node ``n1`` (with a progress report when asked)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from contract import NodeProgress, NodeResult, PullRequest, Status, decode_request
from gateway.api import Gateway
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from publisher import Publisher, cli, client
from publisher.roster import RosterBook
from serving.http import Request

URL = "amqp://guest:guest@127.0.0.1:9/%2F"


class RecordingBroker:
    """Stands in for :class:`publisher.broker.PublisherBroker`."""

    published: ClassVar[list[PullRequest]] = []

    def __init__(
        self, _url: str, _timeout: float, receive: Callable[[str | None, bytes], None], **_: object
    ) -> None:
        self._receive = receive
        self.connected = True
        self.epoch = 1

    def publish_request(self, body: bytes, request_id: str, history: bool = True) -> int:
        request = decode_request(body)
        assert isinstance(request, PullRequest)
        RecordingBroker.published.append(request)
        image = str(request.image)
        if request.progress:  # as a worker does
            self._receive(request_id, NodeProgress(request_id, "n1", image, 5, 10).encode())
        self._receive(request_id, NodeResult(request_id, "n1", image, Status.PULLED, 0.1).encode())
        return self.epoch

    def sync_presence(self, book: RosterBook, since: float, timeout: float) -> object:
        raise AssertionError("no roster is read when a count of nodes is expected")

    def wait_connected(self, _timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[PullRequest]]:
    monkeypatch.setattr(client, "PublisherBroker", RecordingBroker)
    RecordingBroker.published = []
    yield RecordingBroker.published


def asked(published: list[PullRequest]) -> list[bool]:
    return [request.progress for request in published]


def test_the_library_asks_for_progress_only_for_a_caller_that_takes_it(
    published: list[PullRequest],
) -> None:
    shown: list[NodeProgress] = []
    with Publisher(URL) as publisher:
        publisher.request("busybox")
        assert publisher.pull("busybox", expect=1, timeout=5).ok
        assert publisher.pull("busybox", expect=1, timeout=5, on_result=lambda _r: None).ok
        assert publisher.pull("busybox", expect=1, timeout=5, on_progress=shown.append).ok
        warm = publisher.warm(["busybox"], expect=1, timeout=5)
        quiet = publisher.warm(["busybox"], expect=1, timeout=5, progress=False)
    assert asked(published) == [False, False, False, True, True, False]
    assert [m.done for m in shown] == [5]
    assert warm.by_node["n1"].bytes == 5  # a warm-up's report shows bytes: it asks
    assert quiet.ok and quiet.by_node["n1"].bytes == 0


@pytest.mark.parametrize(
    ("flags", "wants"),
    [([], True), (["--json"], False)],
)
def test_puller_pull_asks_for_progress_exactly_when_it_prints_it(
    published: list[PullRequest],
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    wants: bool,
) -> None:
    code = cli.main(["--amqp-url", URL, "pull", "busybox", "--expect", "1", *flags])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    assert asked(published) == [wants]
    assert ("progress n1" in out) is wants  # not a terminal: plain progress lines


def test_puller_warm_asks_for_progress_it_prints_as_bytes(
    published: list[PullRequest], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    images = tmp_path / "images.txt"
    images.write_text("busybox\n")
    code = cli.main(["--amqp-url", URL, "warm", str(images), "--expect", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    assert json.loads(out)["nodes"][0]["bytes"] == 5
    assert asked(published) == [True]


def test_the_gateway_streams_no_progress_so_it_asks_for_none(
    published: list[PullRequest],
) -> None:
    with Publisher(URL) as publisher:
        gateway = Gateway(publisher, GatewaySettings(), GatewayMetrics())
        for path, body in (
            ("/pull_images", {"id": "s1", "image_name": "busybox"}),
            ("/pulls", {"image": "busybox", "expect": 1, "timeout": 5}),
        ):
            response = gateway.handle(Request("POST", path, "", {}, json.dumps(body).encode()))
            assert response.status == 200, response.body
    assert asked(published) == [False, False]
