"""Experiment 6: telling that a node's missed range fell off the history, exactly.

Offsets of user entries are not contiguous on 3.10: every segment starts with a non-user
(tracking snapshot) chunk that takes one offset (exp1c), and stored consumer offsets take more
(exp2). So "first offset delivered > saved + 1" alone raises false alarms. The rule tried here,
for a node whose history carries no stored offsets:

    read from the saved offset S itself;
    first delivered F == S (and the entry's identity matches): nothing lost;
    F > S: S's segment is gone; lost user entries = F - S - 2 (one offset is the next
           segment's tracking chunk); > 0 means requests were lost.

Checked against the truth (which published bodies are no longer in the stream), over many
saved places in a stream whose retention drops segments. Also: the size of a desired-state
record (every image asked for, its newest request) against the requests behind it.
"""

from __future__ import annotations

import json
import random
import sys

from common import connect, declare_stream, delete_vhost, fresh_vhost
from exp1_amqp_tail import fence_read

sys.path.insert(0, "/work/main")
from contract import PullRequest, parse_reference  # noqa: E402

STREAM = "exp.history"


def read_all(vhost: str, start: object) -> list[tuple[int, bytes]]:
    from exp1_amqp_tail import connect as _c  # noqa: F401

    connection = connect(vhost)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=5000)
    got: list[tuple[int, bytes]] = []
    impl = channel._impl  # noqa: SLF001
    fenced = {"done": False}
    impl.basic_consume(
        STREAM,
        lambda _c, _m, p, b: got.append(((p.headers or {})["x-stream-offset"], b)),
        arguments={"x-stream-offset": start},
    )
    impl.basic_qos(callback=lambda _f: fenced.__setitem__("done", True), prefetch_count=5000)
    while not fenced["done"]:
        connection.process_data_events(time_limit=0.05)
    connection.process_data_events(time_limit=0.3)
    connection.close()
    return got


def main() -> None:
    vhost = fresh_vhost()
    try:
        connection = connect(vhost)
        channel = connection.channel()
        # ~60 entries a segment, at most ~4 segments kept
        declare_stream(channel, STREAM, segment_bytes=20_000, max_bytes=80_000)
        channel.confirm_delivery()
        published: dict[int, bytes] = {}  # what each user offset held (from an early full read)
        bodies = []
        for i in range(600):
            body = PullRequest.new(parse_reference(f"reg.example/app-{i % 40}:v{i % 3}")).encode()
            bodies.append(body)
            channel.basic_publish("", STREAM, body)
            if i % 50 == 49:  # note offsets before retention drops them
                for offset, b in read_all(vhost, "first"):
                    published[offset] = b
        remaining = dict(read_all(vhost, "first"))
        first = min(remaining)
        user_offsets = sorted(published)
        trials, verdict_right, count_exact, false_alarm, missed_loss = 0, 0, 0, 0, 0
        edge = [o for o in user_offsets if o < first and o + 2 in remaining][:10]
        candidates = [o for o in user_offsets if o < first + 150]
        for saved in random.sample(candidates, min(80, len(candidates))) + edge:
            trials += 1
            got = read_all(vhost, saved)
            f = got[0][0]
            truly_lost = sum(1 for o in user_offsets if o > saved and o not in remaining)
            says_lost = 0 if f == saved else max(0, f - saved - 2)
            count_exact += says_lost == truly_lost
            if (says_lost > 0) == (truly_lost > 0):
                verdict_right += 1
            elif truly_lost == 0:
                false_alarm += 1
            else:
                missed_loss += 1
        print(
            f"saved places tried: {trials} (of them {len(edge)} the last entry of a dropped "
            f"segment, nothing after it lost); verdict (lost or not) right: {verdict_right}; "
            f"count of lost entries exact: {count_exact} (over when several segments went: "
            f"their tracking chunks count); false alarms: {false_alarm}; losses missed: "
            f"{missed_loss} (stream's first offset now {first})"
        )
        # A desired-state record: the newest request per image, for every image in the window.
        newest: dict[str, bytes] = {}
        for body in bodies:
            newest[json.loads(body)["image"]] = body
        record = b"[" + b",".join(newest.values()) + b"]"
        print(
            f"desired state for {len(bodies)} requests over {len(newest)} images: "
            f"{len(record)} bytes ({len(record) // len(newest)} per image); the requests: "
            f"{sum(map(len, bodies))} bytes"
        )
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
