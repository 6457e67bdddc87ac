"""Experiment 8: what an idle hour writes into the history, today versus tail reads.

Today's checkpoint: a caught-up node that served live requests writes a marker at most every
30 s (120 an hour); the simulation writes ``nodes x checkpoints`` markers as the worker does
(through the puller.history exchange) and measures the stream's growth on disk. The new
checkpoint: a tail read over the stream protocol (connect once per node, one read per
checkpoint); measures the same growth. Compressed in time: the counts are what an hour holds.

    .venv/bin/python exp8_idle_writes.py [--nodes 200] [--checkpoints 120]
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import time

from common import STREAM_PORT, broker_cpu_seconds, connect, delete_vhost, fresh_vhost
from exp5_costs import stream_bytes
from stream_tail import StreamClient

sys.path.insert(0, "/work/main")
from contract import topology as topo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=20)
    args = parser.parse_args()
    vhost = fresh_vhost("idle")
    try:
        connection = connect(vhost)
        channel = connection.channel()
        for item in topo.history(topo.history_stream()):
            if isinstance(item, topo.Exchange):
                channel.exchange_declare(item.name, item.kind, durable=True)
            elif isinstance(item, topo.Queue):
                channel.queue_declare(item.name, durable=True, arguments=dict(item.arguments))
            else:
                channel.queue_bind(item.queue, item.exchange)
        channel.basic_publish(topo.HISTORY.name, "", b'{"v":1,"type":"pull"}')
        connection.close()
        stream = topo.HISTORY_STREAM_NAME
        def tail_once() -> object:
            # A connection per read: on 3.10.8 an unsubscribe keeps the reader's segment file
            # open until the connection closes (exp9 notes; rabbit_stream_reader), so a
            # long-lived connection leaks a file descriptor per tail read.
            client = StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", vhost)
            try:
                return client.tail(stream)
            finally:
                client.close()

        before_bytes, before_tail = stream_bytes(), tail_once()
        cpu0, t0 = broker_cpu_seconds(), time.monotonic()
        for _ in range(args.checkpoints):
            for _node in range(args.nodes):
                tail_once()
        cpu, wall = broker_cpu_seconds() - cpu0, time.monotonic() - t0
        reads = args.nodes * args.checkpoints
        tail_reads = {
            "tail_reads": reads,
            "entries_written": tail_once().last_offset - before_tail.last_offset,
            "bytes_written": stream_bytes() - before_bytes,
            "broker_cpu_ms_per_read_with_its_connection": round(1000 * cpu / reads, 2),
            "client_wall_ms_per_read_with_its_connection": round(1000 * wall / reads, 2),
        }
        print(json.dumps({"tail_reads": tail_reads}), flush=True)
        connection = connect(vhost)  # the first one missed its heartbeats meanwhile
        channel = connection.channel()
        before_bytes = stream_bytes()
        markers = args.nodes * 120  # today: a marker per node per 30 s while traffic flows
        for i in range(markers):
            body = json.dumps(
                {"v": 1, "type": "history_marker", "node": f"node-{i % args.nodes:05d}",
                 "marker_id": uuid.uuid4().hex}
            ).encode()
            channel.basic_publish(topo.HISTORY.name, "", body)
        connection.process_data_events(time_limit=1)
        today = {"markers_written": markers, "bytes_written": stream_bytes() - before_bytes}
        print(json.dumps({"nodes": args.nodes, "tail_reads_per_node": args.checkpoints, "today_markers_per_node_per_hour": 120,
                          "tail_reads": tail_reads, "today_markers": today}))
        connection.close()
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
