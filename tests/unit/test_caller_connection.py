"""The frames a request is written as, decoded back with pika's own decoder."""

from __future__ import annotations

import pika.frame
import pika.spec
import pytest

from contract import CONTENT_TYPE
from contract import topology as topo
from publisher.caller_connection import request_frames


def decode_all(data: bytes) -> list[pika.frame.Frame]:
    frames = []
    while data:
        used, frame = pika.frame.decode_frame(data)
        assert frame is not None, "a frame was cut short"
        frames.append(frame)
        data = data[used:]
    return frames


def publishes(
    frames: list[pika.frame.Frame],
) -> list[tuple[pika.spec.Basic.Publish, object, bytes]]:
    """(method, properties, body) of each publish, its body put together again."""
    found: list[tuple[pika.spec.Basic.Publish, object, bytes]] = []
    for frame in frames:
        if isinstance(frame, pika.frame.Method):
            found.append((frame.method, None, b""))
        elif isinstance(frame, pika.frame.Header):
            method, _, body = found[-1]
            found[-1] = (method, frame.properties, body)
            assert frame.body_size > 0
        else:
            method, properties, body = found[-1]
            found[-1] = (method, properties, body + frame.fragment)
    return found


@pytest.mark.parametrize("limit", [7, 100, 131064])
def test_both_copies_decode_as_the_live_request_then_the_kept_one(limit: int) -> None:
    body = b'{"type":"pull","image":"gcc_assert:93eefc6"}' * 3
    data, count = request_frames(5, limit, body, "id-1", "puller.replies.x", "sessions", True)
    frames = decode_all(data)
    assert count == 2
    assert {frame.channel_number for frame in frames} == {5}
    [(live, live_props, live_body), (kept, kept_props, kept_body)] = publishes(frames)
    assert (live.exchange, live.routing_key, live.mandatory) == (topo.PULLS.name, "", True)
    assert (kept.exchange, kept.mandatory) == (topo.HISTORY.name, False)
    assert live_body == kept_body == body
    assert isinstance(live_props, pika.spec.BasicProperties)
    assert isinstance(kept_props, pika.spec.BasicProperties)
    assert live_props.correlation_id == "id-1"
    assert live_props.reply_to == "puller.replies.x"
    assert (live_props.user_id, kept_props.user_id) == ("sessions", "sessions")
    assert (live_props.delivery_mode, kept_props.delivery_mode) == (1, 2)
    assert live_props.content_type == kept_props.content_type == CONTENT_TYPE
    body_frames = [f for f in frames if isinstance(f, pika.frame.Body)]
    assert max(len(f.fragment) for f in body_frames) <= limit


def test_a_check_or_prune_is_one_live_copy() -> None:
    data, count = request_frames(1, 1000, b"{}", "id-2", "q", "ops", False)
    [(method, _properties, body)] = publishes(decode_all(data))
    assert count == 1
    assert (method.exchange, method.mandatory, body) == (topo.PULLS.name, True, b"{}")
