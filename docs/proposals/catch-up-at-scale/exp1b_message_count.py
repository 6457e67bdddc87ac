"""Experiment 1b: what a passive queue.declare's message_count says about a stream on 3.10.

Publishes singles and bursts, reads message_count at once and after a pause, and compares it
with the true tail (highest offset) and the stream's first offset, also after retention
dropped segments (small segments, x-max-length-bytes) and after a broker-side delete/redeclare.
"""

from __future__ import annotations

import time

from common import connect, declare_stream, delete_vhost, fresh_vhost
from exp1_amqp_tail import fence_read

STREAM = "exp.history"


def count(channel: object) -> int:
    return channel.queue_declare(STREAM, passive=True).method.message_count  # type: ignore[attr-defined]


def first_offset(vhost: str) -> int:
    return fence_read(vhost, "first", prefetch=1)["before_fence"][0]


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        declare_stream(channel, STREAM, segment_bytes=20_000, max_bytes=60_000)
        print("empty stream: message_count", count(channel))
        channel.confirm_delivery()
        tail = -1
        for step in range(8):
            for _ in range(50):
                channel.basic_publish("", STREAM, b"x" * 300)
                tail += 1
            at_once = count(channel)
            connection.process_data_events(time_limit=1.5)
            later = count(channel)
            fence_tail = max(fence_read(vhost, "last")["before_fence"])
            print(
                f"tail {tail} fence-tail {fence_tail} first {first_offset(vhost)} "
                f"message_count at once {at_once}, after 1.5 s {later}"
            )
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
