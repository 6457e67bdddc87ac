"""Thousands of random and near-valid messages, straight to the exchange, at live workers."""

from __future__ import annotations

import json
import time
from typing import Any

import pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import PULL_EXCHANGE, REPLY_EXCHANGE, ErrorKind, NodeResult, Status
from localcluster.cluster import LocalCluster, WorkerProcess
from publisher import Publisher
from tests.integration.conftest import NODES

pytestmark = pytest.mark.integration

EXAMPLES = 800  # the unit tests fuzz the decoder far harder; this is the wire, end to end

VALID: dict[str, Any] = {
    "version": 1,
    "type": "pull",
    "request_id": "hostile",
    "image": "127.0.0.1:9/never/pulled:1",
    "requested_at": 1.0,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
bad_values: dict[str, st.SearchStrategy[Any]] = {
    "version": st.sampled_from([0, 2, "1", None, True, 1.5, []]),
    "type": st.sampled_from(["", "PULL", "result", None, 1]),
    "request_id": st.sampled_from(["", None, 7, "x" * 300, "tab\there", "é"]),
    "image": st.one_of(
        st.sampled_from(["", "upper/Case", "a//b", "x:", "@sha256:00", " a", None, 3]),
        # white space is never valid: no broken-but-valid name can send a node to the network
        st.text(max_size=40).map(lambda t: f"{t} x"),
    ),
    "requested_at": st.sampled_from([None, "now", -1, True, []]),
}


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> bytes:
    """A valid request with one field broken, removed, or the whole made not JSON."""
    fields = dict(VALID)
    field = draw(st.sampled_from(sorted(bad_values)))
    if draw(st.booleans()):
        del fields[field]
    else:
        fields[field] = draw(bad_values[field])
    fields.update(
        draw(
            st.dictionaries(
                st.text(max_size=8).filter(lambda k: k not in VALID), json_values, max_size=3
            )
        )
    )
    body = json.dumps(fields).encode()
    if draw(st.booleans()):
        return body
    cut = draw(st.integers(0, len(body) - 1))
    return body[:cut]


def _with_number(text: str) -> bytes:
    fields = dict(VALID)
    return json.dumps(fields).replace('"requested_at": 1.0', f'"requested_at": {text}').encode()


hostile_numbers = st.one_of(
    st.integers(min_value=10**309, max_value=10**450).map(str),  # too large for a float
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e-9", "9" * 5000]),
).map(_with_number)
deep_nesting = st.integers(33, 5000).map(lambda depth: b"[" * depth + b"]" * depth)

bodies = st.one_of(
    st.binary(max_size=300),
    near_valid_bodies(),
    hostile_numbers,
    deep_nesting,
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.binary(min_size=17_000, max_size=20_000),  # over the size limit
)
short_text = st.text(max_size=40).filter(lambda t: len(t.encode()) <= 200)
header_values = st.one_of(st.text(max_size=20), st.integers(-(2**31), 2**31 - 1), st.booleans())


def pulls_started(worker: WorkerProcess) -> float:
    return worker.metric("puller_worker_pulls_total") + worker.metric(
        "puller_worker_pulls_in_flight"
    )


def test_random_and_near_valid_messages_never_stop_a_worker(
    cluster: LocalCluster, publisher: Publisher, fresh_image: str
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    channel = connection.channel()
    reply_queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(reply_queue, REPLY_EXCHANGE, routing_key=reply_queue)
    pulls_before = [pulls_started(w) for w in cluster.workers]
    answered_here = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        body=bodies,
        reply_here=st.booleans(),
        other_reply_to=st.one_of(st.none(), short_text),
        correlation_id=st.one_of(st.none(), short_text),
        content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"])),
        headers=st.one_of(
            st.none(), st.dictionaries(st.text(max_size=10), header_values, max_size=4)
        ),
    )
    def publish(
        body: bytes,
        reply_here: bool,
        other_reply_to: str | None,
        correlation_id: str | None,
        content_type: str | None,
        headers: dict[str, Any] | None,
    ) -> None:
        nonlocal answered_here
        answered_here += reply_here
        channel.basic_publish(
            PULL_EXCHANGE,
            "",
            body,
            pika.BasicProperties(
                reply_to=reply_queue if reply_here else other_reply_to,
                correlation_id=correlation_id,
                content_type=content_type,
                headers=headers,
            ),
        )

    try:
        publish()
        expected = answered_here * NODES
        replies: list[NodeResult] = []
        deadline = time.monotonic() + 120
        while len(replies) < expected and time.monotonic() < deadline:
            method, _properties, body = channel.basic_get(reply_queue, auto_ack=True)
            if method is None:
                connection.sleep(0.05)
                continue
            replies.append(NodeResult.decode(body))
    finally:
        connection.close()

    assert answered_here > EXAMPLES // 4
    assert len(replies) == expected
    assert {r.status for r in replies} == {Status.FAILED}
    unexpected = [
        r for r in replies if r.error is None or r.error.kind != ErrorKind.INVALID_REQUEST
    ]
    assert not unexpected, unexpected[:3]
    # hostile input gets a one-line reason, never a traceback or an "unexpected" failure
    assert all("\n" not in str(r.error) for r in replies)
    assert not [r for r in replies if "could not decode" in str(r.error)]
    assert all(worker.alive for worker in cluster.workers)
    assert [pulls_started(w) for w in cluster.workers] == pulls_before, "an invalid request pulled"
    report = publisher.pull(fresh_image, timeout=60)
    assert report.ok, report
