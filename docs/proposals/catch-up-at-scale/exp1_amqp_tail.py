"""Experiment 1: what an AMQP 0.9.1 consumer of a stream (RabbitMQ 3.10) learns about the tail.

(a) the headers a stream delivery carries;
(b) consume at "last": which entries come (the last chunk: from its first entry);
(c) the "fence": right after basic.consume, a synchronous method on the same channel
    (basic.qos -> qos-ok). Are all of the last chunk's entries delivered before the qos-ok,
    so that "tail = highest offset delivered before the fence" is exact?
(d) consume at an offset beyond the end; at an offset inside a chunk; at an offset that
    retention has dropped.
"""

from __future__ import annotations

import time
from typing import Any

import pika

from common import connect, declare_stream, delete_vhost, fresh_vhost, stream_status

STREAM = "exp.history"


def publish(channel: Any, count: int, tag: str) -> None:
    """``count`` messages, confirmed one by one: each tends to be a chunk of its own."""
    for i in range(count):
        channel.basic_publish("", STREAM, f"{tag}-{i}".encode())


def publish_batch(channel: Any, count: int, tag: str) -> None:
    """``count`` messages without waiting between them, on a channel without confirms: osiris
    puts a burst into few chunks. Then a moment for them to land."""
    burst = channel.connection.channel()
    for i in range(count):
        burst.basic_publish("", STREAM, f"{tag}-{i}".encode())
    channel.connection.process_data_events(time_limit=1.0)
    burst.close()


def fence_read(vhost: str, start: object, prefetch: int = 5000) -> dict[str, Any]:
    """Consume from ``start``; fence with basic.qos; what came before the fence, and after."""
    connection = connect(vhost)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    seen: list[tuple[int, dict[str, Any], bool]] = []
    fenced = {"done": False}

    def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
        headers = props.headers or {}
        seen.append((headers.get("x-stream-offset"), headers, fenced["done"]))

    # The impl channel: deliveries handed to us in frame order, not buffered by BlockingChannel.
    impl = channel._impl  # noqa: SLF001
    impl.basic_consume(STREAM, on_message, arguments={"x-stream-offset": start})
    impl.basic_qos(
        callback=lambda _f: fenced.__setitem__("done", True), prefetch_count=prefetch
    )
    deadline = time.monotonic() + 5
    while not fenced["done"] and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)
    before = [o for o, _h, after in seen]
    connection.process_data_events(time_limit=1.0)
    after = [o for o, _h, late in seen if late]
    headers = seen[0][1] if seen else {}
    connection.close()
    return {
        "start": start,
        "before_fence": before,
        "after_fence_within_1s": after,
        "header_keys": sorted(headers),
    }


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        declare_stream(channel, STREAM)
        channel.confirm_delivery()
        publish(channel, 10, "single")  # offsets 0..9, one chunk each (confirmed singly)
        publish_batch(channel, 500, "burst")  # offsets 10..509 in a few chunks
        print(stream_status(vhost, STREAM))
        tail = 509
        print("true tail", tail)
        r = fence_read(vhost, "last")
        print("(b,c) last:", "first", r["before_fence"][:1], "n", len(r["before_fence"]),
              "max", max(r["before_fence"]) if r["before_fence"] else None,
              "after fence", r["after_fence_within_1s"][:5], "headers", r["header_keys"])
        # A small last chunk, as after an idle spell: one more single publish.
        publish(channel, 1, "tailer")
        r = fence_read(vhost, "last")
        print("last after a single publish:", r["before_fence"], r["after_fence_within_1s"])
        # A last chunk bigger than the prefetch.
        publish_batch(channel, 300, "burst2")
        r = fence_read(vhost, "last", prefetch=50)
        print("last, prefetch 50 < chunk:", "n", len(r["before_fence"]),
              "max", max(r["before_fence"]) if r["before_fence"] else None,
              "after", len(r["after_fence_within_1s"]))
        # (d) beyond the end; inside a chunk
        r = fence_read(vhost, 5000)
        print("offset beyond the end:", r["before_fence"], r["after_fence_within_1s"])
        r = fence_read(vhost, 15)
        print("offset 15 (inside a burst chunk): first delivered", r["before_fence"][:3])
        r = fence_read(vhost, "first", prefetch=2)
        print("first (prefetch 2):", r["before_fence"], r["after_fence_within_1s"][:3])
        # Fence exactness under many repetitions with publishes between.
        misses = 0
        for i in range(30):
            publish(channel, 1 + i % 3, f"rep{i}")
            expected = channel.queue_declare(STREAM, passive=True)  # message_count is 0 on 3.10
            r = fence_read(vhost, "last")
            # the true tail: ask by reading everything fenced from "first" is costly; instead
            # compare with what a 1 s wait adds (anything after the fence = the fence lied)
            if r["after_fence_within_1s"]:
                misses += 1
        print("fence: readings where entries came after the fence:", misses, "of 30",
              "(passive message_count:", expected.method.message_count, ")")
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
