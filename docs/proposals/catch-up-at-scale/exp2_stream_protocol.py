"""Experiment 2: the stream protocol on 3.10 as the way to learn where the history ends.

(a) tail(): subscribe at "last", fence with a query: is ChunkFirstOffset + NumEntries - 1
    the true tail, every time (singles, bursts, after retention dropped segments)?
(b) an empty stream: no chunk before the fence.
(c) cost: time per tail read, bytes received.
(d) store_offset / query_offset: does a stored offset take offsets (and bytes) in the stream
    itself (AMQP readers then see gaps), and what permission does it need?
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from common import (
    AMQP_PORT,
    STATE,
    STREAM_PORT,
    connect,
    ctl,
    declare_stream,
    delete_vhost,
    fresh_vhost,
)
from exp1_amqp_tail import fence_read
from stream_tail import StreamClient, StreamProtocolError

STREAM = "exp.history"


def stream_dir_bytes(vhost: str) -> int:
    """Bytes of the stream's segment and index files on our node's disk."""
    root = Path(STATE["directory"]) / "mnesia"
    total = 0
    for path in root.rglob("*"):
        if path.is_file() and (path.suffix in (".segment", ".index")) and STREAM.replace(".", "_") in str(path) or (
            path.is_file() and path.suffix in (".segment", ".index") and vhost in str(path)
        ):
            total += path.stat().st_size
    return total


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        declare_stream(channel, STREAM, segment_bytes=50_000, max_bytes=150_000)
        client = StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", vhost)
        print("(b) empty stream: tail =", client.tail(STREAM))
        channel.confirm_delivery()
        burst = connection.channel()
        true_tail = -1
        wrong, times, bytes_in = 0, [], []
        for step in range(60):
            if step % 3 == 0:  # a burst: several chunks, the last of several entries
                for i in range(40 + step):
                    burst.basic_publish("", STREAM, b"b" * 300)
                channel.basic_publish("", STREAM, b"s" * 300)  # confirmed: the burst is in
            else:
                channel.basic_publish("", STREAM, b"s" * 300)
            fenced = fence_read(vhost, "last")["before_fence"]
            true_tail = max(fenced)  # the AMQP reading (30/30 right in exp1) as the reference
            before = client.bytes_in
            began = time.perf_counter()
            chunk = client.tail(STREAM)
            times.append(time.perf_counter() - began)
            bytes_in.append(client.bytes_in - before)
            if chunk is None or chunk.last_offset != true_tail:
                wrong += 1
                print("MISMATCH", step, chunk, true_tail)
        first = fence_read(vhost, "first", prefetch=1)["before_fence"][0]
        print(
            f"(a) tail reads: {len(times)}, wrong: {wrong}; retention dropped up to offset "
            f"{first} meanwhile; last chunk {chunk}"
        )
        print(
            f"(c) per tail read: median {statistics.median(times) * 1000:.2f} ms, "
            f"max {max(times) * 1000:.2f} ms; bytes received median {statistics.median(bytes_in)}"
        )

        # (d) server-side offsets
        before_gap = fence_read(vhost, "last")["before_fence"]
        tail_before = max(before_gap)
        for node in range(50):
            client.store_offset(f"node-{node:03d}", STREAM, tail_before)
        time.sleep(0.5)
        print("(d) query_offset node-007 ->", client.query_offset("node-007", STREAM),
              "unknown ->", client.query_offset("nobody", STREAM))
        channel.basic_publish("", STREAM, b"after-stores")
        after = max(fence_read(vhost, "last")["before_fence"])
        print(
            f"(d) 50 store_offset calls, then one publish: its offset {after}, the tail before "
            f"{tail_before}: {after - tail_before - 1} offsets taken by stored offsets"
        )
        # Permission: a user with read but no write on the stream.
        ctl("add_user", "reader-" + vhost, "pw")
        ctl("set_permissions", "-p", vhost, "reader-" + vhost, "^$", "^$", ".*")
        reader = StreamClient("127.0.0.1", STREAM_PORT, "reader-" + vhost, "pw", vhost)
        print("(d) read-only user: tail works:", reader.tail(STREAM) is not None,
              "; query_offset:", reader.query_offset("node-007", STREAM))
        reader.store_offset("node-999", STREAM, 5)
        time.sleep(0.3)
        print("(d) read-only user store_offset stored?", client.query_offset("node-999", STREAM))
        reader.close()
        ctl("delete_user", "reader-" + vhost)
        client.close()
        connection.close()
    finally:
        delete_vhost(vhost)



if __name__ == "__main__":
    main()
