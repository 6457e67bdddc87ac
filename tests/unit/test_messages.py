"""The wire contract: messages round-trip, and every broken body gets one clear error."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract import (
    MAX_MESSAGE_BYTES,
    ErrorKind,
    InvalidMessage,
    NodeError,
    NodeResult,
    Pulling,
    PullRequest,
    Status,
    parse_reference,
)


def request_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "version": 1,
        "type": "pull",
        "request_id": "abc123",
        "image": "busybox:1.36",
        "requested_at": 1700000000.5,
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not ...}


def test_a_request_round_trips() -> None:
    request = PullRequest.new(parse_reference("gcc_assert:93eefc6"))
    decoded = PullRequest.decode(request.encode())
    assert decoded == request
    assert str(decoded.image) == "docker.io/library/gcc_assert:93eefc6"


def test_a_request_is_sent_normalised() -> None:
    body = json.loads(PullRequest.new(parse_reference("busybox")).encode())
    assert body["image"] == "docker.io/library/busybox:latest"
    assert body["version"] == 1
    assert body["type"] == "pull"


def test_unknown_extra_fields_are_accepted_for_forward_compatibility() -> None:
    body = json.dumps(request_fields(priority="high")).encode()
    assert PullRequest.decode(body).request_id == "abc123"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"not json", "not JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"pull"', "not a string"),
        (b"null", "not null"),
        (b"1e400", "not a number"),
        (json.dumps(request_fields(version=2)).encode(), "unsupported contract version 2"),
        (json.dumps(request_fields(version=True)).encode(), "unsupported contract version"),
        (json.dumps(request_fields(version=...)).encode(), "unsupported contract version None"),
        (json.dumps(request_fields(type="result")).encode(), "expected a message of type 'pull'"),
        (json.dumps(request_fields(request_id=...)).encode(), "no 'request_id'"),
        (json.dumps(request_fields(request_id=7)).encode(), "'request_id' must be a string"),
        (json.dumps(request_fields(request_id="")).encode(), "'request_id' is empty"),
        (json.dumps(request_fields(request_id="a\nb")).encode(), "printable ASCII"),
        (json.dumps(request_fields(request_id="x" * 200)).encode(), "longer than 128"),
        (json.dumps(request_fields(image=...)).encode(), "no 'image'"),
        (json.dumps(request_fields(image=None)).encode(), "must be a string"),
        (json.dumps(request_fields(image="Bad Image")).encode(), "invalid image reference"),
        (json.dumps(request_fields(requested_at="now")).encode(), "must be a number"),
        (json.dumps(request_fields(requested_at=-1)).encode(), "non-negative"),
        (json.dumps(request_fields(requested_at=False)).encode(), "must be a number"),
        (b"{" * 100_000, "at most"),
        (b'{"a":' * 2400 + b"1" + b"}" * 2400, "nests deeper than 32"),
        (b"[" * 33 + b"]" * 33, "nests deeper than 32"),
        (json.dumps(request_fields(requested_at=10**400)).encode(), "too large a number"),
        (json.dumps(request_fields(requested_at=float("nan"))).encode(), "NaN is not a JSON"),
        (json.dumps(request_fields(requested_at=float("-inf"))).encode(), "-Infinity is not"),
        (b'{"version": 1, "n": ' + b"9" * 5000 + b"}", "too many digits"),
    ],
)
def test_broken_requests_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        PullRequest.decode(body)


def test_a_message_over_the_size_limit_is_refused_before_parsing() -> None:
    body = json.dumps(request_fields(padding="x" * MAX_MESSAGE_BYTES)).encode()
    with pytest.raises(InvalidMessage, match=f"at most {MAX_MESSAGE_BYTES}"):
        PullRequest.decode(body)


@given(st.binary(max_size=2000))
def test_random_bytes_never_escape_as_anything_but_invalid_message(body: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        PullRequest.decode(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(list(request_fields())), json_values))
def test_near_valid_requests_decode_or_fail_cleanly(overrides: dict[str, Any]) -> None:
    body = json.dumps(request_fields(**overrides)).encode()
    try:
        request = PullRequest.decode(body)
    except InvalidMessage:
        return
    assert PullRequest.decode(request.encode()) == request


def test_results_round_trip() -> None:
    pulled = NodeResult(
        "r1",
        "node-1",
        "docker.io/library/x:1",
        Status.PULLED,
        1.5,
        image_id="sha256:" + "c" * 64,
        digest="sha256:" + "d" * 64,
    )
    failed = NodeResult(
        "r1",
        "node-2",
        "docker.io/library/x:1",
        Status.FAILED,
        0.2,
        error=NodeError(ErrorKind.NOT_FOUND, "no such image"),
    )
    assert NodeResult.decode(pulled.encode()) == pulled
    assert NodeResult.decode(failed.encode()) == failed
    assert pulled.has_image
    assert not failed.has_image


def test_an_error_kind_from_a_newer_worker_is_read_as_unknown_and_keeps_its_name() -> None:
    body = json.loads(NodeResult("r", "n", "i", Status.PRESENT, 0.0).encode())
    body.update(status="failed", error={"kind": "quarantined", "message": "held for a scan"})
    result = NodeResult.decode(json.dumps(body).encode())
    assert result.error is not None
    assert result.error.kind is ErrorKind.UNKNOWN
    assert result.error.message == "(quarantined) held for a scan"


def test_a_result_from_an_older_worker_has_no_queued_time() -> None:
    body = json.loads(NodeResult("r", "n", "i", Status.PRESENT, 2.0).encode())
    del body["queued_seconds"]
    assert NodeResult.decode(json.dumps(body).encode()).queued_seconds == 0.0


def test_an_absent_answer_may_say_how_far_the_nodes_own_pull_is() -> None:
    pulling = NodeResult("r", "n", "i", Status.ABSENT, 0.1, pulling=Pulling(300, 1000))
    body = json.loads(pulling.encode())
    assert body["pulling"] == {"done": 300, "total": 1000}
    assert NodeResult.decode(pulling.encode()) == pulling
    del body["pulling"]  # an older worker
    assert NodeResult.decode(json.dumps(body).encode()).pulling is None
    for bad in ("half", {"done": -1, "total": 2}, {"done": 1}):
        body["pulling"] = bad
        with pytest.raises(InvalidMessage, match=r"done|total|pulling"):
            NodeResult.decode(json.dumps(body).encode())


def test_a_result_carries_an_error_exactly_when_it_failed() -> None:
    with pytest.raises(ValueError, match="exactly when"):
        NodeResult("r", "n", "i", Status.FAILED, 0.0)
    with pytest.raises(ValueError, match="exactly when"):
        NodeResult("r", "n", "i", Status.PULLED, 0.0, error=NodeError(ErrorKind.INTERNAL, "x"))
    body = json.loads(NodeResult("r", "n", "i", Status.PRESENT, 0.0).encode())
    body["status"] = "failed"
    with pytest.raises(InvalidMessage, match="exactly when"):
        NodeResult.decode(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": "done"}, "expected one of: pulled, present, absent, failed"),
        ({"status": "failed", "error": "x"}, "'error' must be an object"),
        ({"seconds": "1"}, "'seconds' must be a number"),
        ({"seconds": -0.5}, "'seconds' must be a finite, non-negative number"),
        ({"seconds": True}, "'seconds' must be a number"),
        ({"node": ""}, "'node' is empty"),
        ({"node": "n" * 254}, "'node' is longer than 253"),
        ({"node": 7}, "'node' must be a string, not a number"),
        ({"image_id": ""}, "'image_id' is empty"),
        ({"image_id": "i" * 1025}, "'image_id' is longer than 1024"),
        ({"request_id": "r\u00e9"}, "'request_id' must be printable ASCII"),
        ({"request_id": "r\n"}, "'request_id' must be printable ASCII"),
    ],
)
def test_broken_results_are_refused_with_a_reason(change: dict[str, Any], reason: str) -> None:
    body = json.loads(NodeResult("r", "n", "i", Status.PRESENT, 0.0).encode())
    body.update(change)
    with pytest.raises(InvalidMessage, match=reason):
        NodeResult.decode(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("change", "attribute", "value"),
    [
        ({"seconds": 0}, "seconds", 0.0),
        ({"seconds": -0.0}, "seconds", 0.0),
        ({"seconds": 1e308}, "seconds", 1e308),
        ({"image": ""}, "image", ""),
        ({"node": "n" * 253}, "node", "n" * 253),
        ({"image_id": None}, "image_id", None),
        ({"request_id": "r" * 128}, "request_id", "r" * 128),
    ],
)
def test_results_at_the_edges_of_the_contract_are_taken(
    change: dict[str, Any], attribute: str, value: object
) -> None:
    body = json.loads(NodeResult("r", "n", "i", Status.PRESENT, 0.5, image_id="x").encode())
    body.update(change)
    assert getattr(NodeResult.decode(json.dumps(body).encode()), attribute) == value
