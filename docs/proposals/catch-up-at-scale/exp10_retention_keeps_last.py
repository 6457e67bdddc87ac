"""Experiment 10: does age retention ever remove a stream's newest entry (the desired-state
stream must keep its newest snapshot however old)? A stream with x-max-age 3s and tiny
segments: entries written, then nothing for 8 s, then (a) read from "first"; (b) one more
entry written (retention runs when a segment rolls over), read again; (c) enough entries to
roll a segment, read again.
"""

from __future__ import annotations

import time

from common import connect, declare_stream, delete_vhost, fresh_vhost
from exp1_amqp_tail import fence_read

STREAM = "exp.history"


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        declare_stream(channel, STREAM, segment_bytes=3000, max_age="3s")
        channel.confirm_delivery()
        for i in range(40):
            channel.basic_publish("", STREAM, f"old-{i}".encode() + b"x" * 200)
        print("written 0..39 (several segments); first/last now:",
              fence_read(vhost, "first")["before_fence"][:1], max(fence_read(vhost, "last")["before_fence"]))
        time.sleep(8)
        got = fence_read(vhost, "first", prefetch=100)["before_fence"]
        print("(a) 8 s later, nothing written: offsets readable", got[:1], "...", got[-1:], len(got))
        channel.basic_publish("", STREAM, b"one more")
        got = fence_read(vhost, "first", prefetch=100)["before_fence"]
        print("(b) one more entry: readable", got[:1], "...", got[-1:], len(got))
        for i in range(30):
            channel.basic_publish("", STREAM, f"new-{i}".encode() + b"x" * 200)
        got = fence_read(vhost, "first", prefetch=100)["before_fence"]
        print("(c) after a roll-over: readable", got[:1], "...", got[-1:], len(got))
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
