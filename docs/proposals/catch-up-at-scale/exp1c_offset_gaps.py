"""Experiment 1c: are a stream's user-entry offsets contiguous on 3.10? (Non-user chunks, e.g. the
tracking snapshot osiris writes at the start of every segment, take offsets too.)"""

from __future__ import annotations

from common import connect, declare_stream, delete_vhost, fresh_vhost
from exp1_amqp_tail import fence_read

STREAM = "exp.history"


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        declare_stream(channel, STREAM, segment_bytes=20_000)
        channel.confirm_delivery()
        for i in range(200):
            channel.basic_publish("", STREAM, f"{i:04d}".encode() + b"x" * 296)
        offsets = fence_read(vhost, "first", prefetch=5000)["before_fence"]
        gaps = [(a, b) for a, b in zip(offsets, offsets[1:]) if b != a + 1]
        print("user entries", len(offsets), "first", offsets[0], "last", offsets[-1])
        print("gaps (offset before, offset after):", gaps)
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
