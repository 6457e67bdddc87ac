"""The fleet's additions to the contract and the worker: lanes, checks, prunes, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract import (
    CheckRequest,
    ErrorKind,
    InvalidMessage,
    Lane,
    NodeResult,
    PruneRequest,
    PruneResult,
    PullRequest,
    Removed,
    Status,
    decode_reply,
    decode_request,
    parse_reference,
)
from contract.image_list import parse_image_list, read_image_list
from contract.messages import MAX_KEEP_IMAGES
from publisher.fleet_commands import duration
from publisher.report import StatusReport, WarmReport, older_worker
from worker.pruning.pruner import read_keep_file
from worker.pulls.slots import PullSlots

IMAGE = parse_reference("registry.local/lang/python:3")


def test_a_pull_from_an_older_publisher_is_a_session_pull_without_refresh() -> None:
    body = json.loads(PullRequest.new(IMAGE).encode())
    del body["lane"], body["refresh"]
    request = decode_request(json.dumps(body).encode())
    assert isinstance(request, PullRequest)
    assert request.lane is Lane.SESSION and request.refresh is False


def test_a_pull_from_an_older_publisher_asks_for_progress_as_before() -> None:
    body = json.loads(PullRequest.new(IMAGE, progress=False).encode())
    del body["progress"]
    request = decode_request(json.dumps(body).encode())
    assert isinstance(request, PullRequest) and request.progress is True


def test_a_pull_that_asks_for_no_progress_round_trips_and_a_bad_flag_is_refused() -> None:
    quiet = PullRequest.new(IMAGE, progress=False)
    assert decode_request(quiet.encode()) == quiet
    body = json.loads(quiet.encode())
    body["progress"] = "no"
    with pytest.raises(InvalidMessage, match="'progress' must be true or false"):
        decode_request(json.dumps(body).encode())


def test_a_lane_this_side_does_not_know_is_read_as_session() -> None:
    body = json.loads(PullRequest.new(IMAGE, lane=Lane.WARM).encode())
    assert body["lane"] == "warm"
    body["lane"] = "overnight"
    request = decode_request(json.dumps(body).encode())
    assert isinstance(request, PullRequest) and request.lane is Lane.SESSION


def test_requests_of_each_type_round_trip() -> None:
    check = CheckRequest.new(IMAGE)
    prune = PruneRequest.new(86400.0, (IMAGE,), dry_run=True)
    assert decode_request(check.encode()) == check
    assert decode_request(prune.encode()) == prune


def test_an_unknown_request_type_is_refused_naming_it() -> None:
    body = json.loads(CheckRequest.new(IMAGE).encode())
    body["type"] = "defragment"
    with pytest.raises(InvalidMessage, match="got 'defragment'"):
        decode_request(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"keep": "redis"}, "'keep' must be an array"),
        ({"keep": ["Not Valid"]}, "invalid image reference"),
        ({"keep": ["redis"] * (MAX_KEEP_IMAGES + 1)}, "at most"),
        ({"unused_for": -1}, "non-negative"),
        ({"dry_run": "yes"}, "true or false"),
    ],
)
def test_broken_prune_requests_are_refused(change: dict[str, object], reason: str) -> None:
    body = json.loads(PruneRequest.new(60.0).encode())
    body.update(change)
    with pytest.raises(InvalidMessage, match=reason):
        decode_request(json.dumps(body).encode())


def test_a_prune_result_round_trips_and_broken_removals_are_refused() -> None:
    result = PruneResult(
        "r", "node-1", 0.5, False, (Removed("sha256:ab", ("a/b:1",), 10, 12.0),), 1, 10, 2, 1
    )
    assert decode_reply(result.encode()) == result
    body = json.loads(result.encode())
    body["removed"][0]["size"] = -3
    with pytest.raises(InvalidMessage, match="'size'"):
        decode_reply(json.dumps(body).encode())


def test_how_an_older_worker_answers_a_check_is_recognised() -> None:
    old = NodeResult.failure(
        "r", "n", "", ErrorKind.INVALID_REQUEST, "expected a message of type 'pull', got 'check'", 0
    )
    new = NodeResult.failure(
        "r",
        "n",
        "",
        ErrorKind.INVALID_REQUEST,
        "expected a message of type 'pull' or 'check' or 'prune', got 'x'",
        0,
    )
    assert older_worker(old) and not older_worker(new)


def result(node: str, status: Status, digest: str | None = None) -> NodeResult:
    return NodeResult("r", node, str(IMAGE), status, 0.1, "sha256:id-" + (digest or ""), digest)


def test_drift_is_two_digests_for_one_name() -> None:
    same = StatusReport("r", str(IMAGE), (result("a", Status.PRESENT, "d1"),) * 1)
    assert same.ok and not same.drift
    drift = StatusReport(
        "r",
        str(IMAGE),
        (result("a", Status.PRESENT, "d1"), result("b", Status.PRESENT, "d2")),
    )
    assert drift.drift and not drift.ok
    assert drift.versions == {"d1": ("a",), "d2": ("b",)}
    absent = StatusReport(
        "r", str(IMAGE), (result("a", Status.PRESENT, "d1"), result("b", Status.ABSENT))
    )
    assert not absent.drift and not absent.ok


def test_a_warm_report_counts_answers_once_bytes_and_failures_by_kind() -> None:
    report = WarmReport.start(("x", "y"), None, {"a", "b"})
    pulled = NodeResult("r1", "a", "x", Status.PULLED, 1.0)
    report.take(pulled)
    report.take(pulled)  # asked again after a reconnect: counted once
    report.take(NodeResult.failure("r2", "a", "y", ErrorKind.NOT_FOUND, "no", 0.1))
    report.take(NodeResult("r1", "b", "x", Status.PRESENT, 0.1))
    assert report.by_node["a"].answered == 2 and report.by_node["a"].failed == 1
    assert report.finished("r1") and not report.finished("r2")
    assert report.failures_by_kind == {"not_found": 1}
    assert not report.ok


def test_durations() -> None:
    assert duration("30d") == 30 * 86400
    assert duration("90m") == 5400
    assert duration("45") == 45
    with pytest.raises(Exception, match="not a duration"):
        duration("soon")


def test_an_image_list_skips_comments_and_names_a_bad_line() -> None:
    images = parse_image_list("# set\nredis\n\nalpine:3 # small\nredis\n", "f")
    assert [str(i) for i in images] == [
        "docker.io/library/redis:latest",
        "docker.io/library/alpine:3",
    ]
    with pytest.raises(ValueError, match="f, line 2"):
        parse_image_list("redis\nNOPE!\n", "f")


def test_an_image_list_with_a_byte_order_mark_reads_its_first_line(tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_bytes(b"\xef\xbb\xbfredis\r\n# a comment\r\nalpine:3\r\n")
    assert [str(i) for i in read_image_list(listing)] == [
        "docker.io/library/redis:latest",
        "docker.io/library/alpine:3",
    ]
    assert [str(i) for i in parse_image_list("\ufeffredis\n", "f")] == [
        "docker.io/library/redis:latest"
    ]
    assert read_keep_file(listing) == ("redis", "alpine:3")
    with pytest.raises(ValueError, match="f, line 1"):
        parse_image_list("\ufeff\ufeffredis\n", "f")  # only one mark, at the very start


class Recorder:
    def __init__(self) -> None:
        self.started: list[str] = []

    def __call__(self, job: str) -> None:
        self.started.append(job)


def test_no_warm_pull_starts_while_a_session_pull_waits_or_runs() -> None:
    started = Recorder()
    slots: PullSlots[str] = PullSlots(1, started)
    slots.add("r", "w1", warm=True)
    slots.add("r", "w2", warm=True)
    assert started.started == ["w1"]
    slots.add("r", "s1")  # does not wait for w1 to finish
    assert started.started == ["w1", "s1"]
    slots.release("r", "w1")
    assert started.started == ["w1", "s1"]  # w2 waits: a session pull is running
    slots.release("r", "s1")
    assert started.started == ["w1", "s1", "w2"]


def test_a_waiting_warm_pull_a_session_wants_moves_to_the_session_lane() -> None:
    started = Recorder()
    slots: PullSlots[str] = PullSlots(1, started)
    slots.add("r", "w1", warm=True)
    slots.add("r", "w2", warm=True)
    slots.add("r", "w3", warm=True)
    slots.hurry("r", "w3")
    assert started.started == ["w1", "w3"]
    slots.release("r", "w3")
    slots.release("r", "w1")
    assert started.started == ["w1", "w3", "w2"]
    assert slots.running == 1 and slots.waiting == 0
