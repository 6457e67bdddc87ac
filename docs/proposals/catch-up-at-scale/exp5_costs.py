"""Experiment 5: (a) bytes on disk per history entry (a marker, a request); (b) the broker's
CPU to deliver R requests to N consumers through N exclusive fanout queues (today's live
feed) versus N consumers of the history stream itself (the stream as the live feed).

    .venv/bin/python exp5_costs.py [--nodes 200] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from common import STATE, broker_cpu_seconds, connect, declare_stream, delete_vhost, fresh_vhost

sys.path.insert(0, "/work/main")
from contract import PullRequest, parse_reference  # noqa: E402

STREAM = "exp.history"


def stream_bytes() -> int:
    root = Path(STATE["directory"]) / "mnesia"
    return sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in (".segment", ".index")
    )


def bytes_per_entry(vhost: str) -> dict[str, float]:
    connection = connect(vhost)
    channel = connection.channel()
    declare_stream(channel, STREAM)
    channel.confirm_delivery()
    out = {}
    for kind in ("marker", "request"):
        before = stream_bytes()
        for i in range(1000):
            if kind == "marker":
                body = json.dumps(
                    {"v": 1, "type": "history_marker", "node": f"node-{i:05d}.example.internal",
                     "marker_id": uuid.uuid4().hex}
                ).encode()
            else:
                body = PullRequest.new(parse_reference(f"registry.example:5000/team/app:v{i}")).encode()
            channel.basic_publish("", STREAM, body)
        out[f"{kind}_bytes_on_disk"] = (stream_bytes() - before) / 1000
        out[f"{kind}_body_bytes"] = len(body)
    connection.close()
    return out


def feed_cost(vhost: str, nodes: int, requests: int, via: str) -> dict[str, float]:
    """Broker CPU seconds to get ``requests`` to ``nodes`` consumers (acked one by one)."""
    connection = connect(vhost)
    setup = connection.channel()
    setup.exchange_declare("exp.pulls", "fanout")
    declare_stream(setup, STREAM)
    channels = []
    got = {"n": 0}

    def on_message(ch, method, _p, _b) -> None:  # type: ignore[no-untyped-def]
        ch.basic_ack(method.delivery_tag)
        got["n"] += 1

    for i in range(nodes):
        channel = connection.channel()
        channel.basic_qos(prefetch_count=20)
        if via == "fanout":
            queue = channel.queue_declare(f"node-{i}", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, "exp.pulls")
            channel._impl.basic_consume(queue, on_message)  # noqa: SLF001
        else:
            channel._impl.basic_consume(  # noqa: SLF001
                STREAM, on_message, arguments={"x-stream-offset": "next"}
            )
        channels.append(channel)
    connection.process_data_events(time_limit=1.0)
    publisher = connect(vhost)
    pub = publisher.channel()
    pub.confirm_delivery()
    body = PullRequest.new(parse_reference("registry.example:5000/team/app:v1")).encode()
    cpu0, t0 = broker_cpu_seconds(), time.monotonic()
    for _ in range(requests):
        # Today every request goes both ways (live fanout and history stream); with the stream
        # as the live feed, only into the stream.
        pub.basic_publish("", STREAM, body)
        if via == "fanout":
            pub.basic_publish("exp.pulls", "", body)
        connection.process_data_events(time_limit=0)
    deadline = time.monotonic() + 120
    while got["n"] < nodes * requests and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.05)
    cpu, wall = broker_cpu_seconds() - cpu0, time.monotonic() - t0
    publisher.close()
    connection.close()
    return {
        f"{via}_broker_cpu_s": round(cpu, 2),
        f"{via}_broker_cpu_ms_per_1000_deliveries": round(1000 * cpu / (nodes * requests) * 1000, 3),
        f"{via}_wall_s": round(wall, 2),
        f"{via}_delivered": got["n"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, object] = {"nodes": args.nodes, "requests": args.requests}
    for step in ("bytes", "fanout", "stream"):
        vhost = fresh_vhost("cost")
        try:
            if step == "bytes":
                results.update(bytes_per_entry(vhost))
            else:
                results.update(feed_cost(vhost, args.nodes, args.requests, step))
        finally:
            delete_vhost(vhost)
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
