"""Experiment 3: is the AMQP "fence" (exp1: basic.qos right after basic.consume at "last";
tail = highest offset delivered before qos-ok) exact, or does it win a race?

In 3.10.8's rabbit_stream_queue (read from the installed beams' debug info), basic.consume
replies consume-ok and only registers an offset listener with the stream's writer; the entries
are read when the writer's osiris_offset event comes back to the channel. pika waits for
consume-ok before it sends qos, so the event usually wins by a round trip. Here the qos is
written in the same TCP send as the consume: if the entries then come after qos-ok, the fence
is timing, not protocol.
"""

from __future__ import annotations

import time
from typing import Any

import pika
import pika.frame
import pika.spec

from common import connect, declare_stream, delete_vhost, fresh_vhost

STREAM = "exp.history"


def pipelined_fence(vhost: str) -> tuple[list[int], list[int]]:
    connection = connect(vhost)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1000)
    impl = channel._impl  # noqa: SLF001 - an experiment: frames written by hand
    seen: list[tuple[int, bool]] = []
    fenced = {"done": False}
    impl.callbacks.add(
        impl.channel_number, pika.spec.Basic.QosOk,
        lambda _f: fenced.__setitem__("done", True), one_shot=True,
    )
    impl.callbacks.add(impl.channel_number, pika.spec.Basic.ConsumeOk, lambda _f: None)
    impl._consumers["fence-test"] = lambda _c, _m, p, _b: seen.append(  # noqa: SLF001
        ((p.headers or {}).get("x-stream-offset"), fenced["done"])
    )
    consume = pika.spec.Basic.Consume(
        queue=STREAM, consumer_tag="fence-test", arguments={"x-stream-offset": "last"}
    )
    qos = pika.spec.Basic.Qos(prefetch_count=1000)
    frames = [pika.frame.Method(impl.channel_number, m).marshal() for m in (consume, qos)]
    connection._impl._output_marshaled_frames([b"".join(frames)])  # noqa: SLF001
    deadline = time.monotonic() + 5
    while not fenced["done"] and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.02)
    connection.process_data_events(time_limit=0.5)
    connection.close()
    return [o for o, late in seen if not late], [o for o, late in seen if late]


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        declare_stream(channel, STREAM)
        channel.confirm_delivery()
        for i in range(20):
            channel.basic_publish("", STREAM, b"x" * 100)
        late = 0
        for _ in range(30):
            before, after = pipelined_fence(vhost)
            if after:
                late += 1
        print(f"pipelined consume+qos: entries of the last chunk came AFTER qos-ok in {late} of 30")
        print("example:", "before", before, "after", after)
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
