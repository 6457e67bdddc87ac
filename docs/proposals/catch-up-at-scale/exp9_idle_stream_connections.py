"""Experiment 9: what keeping one stream-protocol connection open per node costs the broker,
and whether a connection tuned to heartbeat 0 outlives the server's heartbeat (60 s) idle.

    .venv/bin/python exp9_idle_stream_connections.py [--connections 200] [--idle 130]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import STREAM_PORT, beam_pid, broker_cpu_seconds, connect, declare_stream, delete_vhost, fresh_vhost
from stream_tail import StreamClient


def rss_mb() -> float:
    for line in Path(f"/proc/{beam_pid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--idle", type=float, default=130)
    args = parser.parse_args()
    vhost = fresh_vhost("idle-conns")
    try:
        amqp = connect(vhost)
        declare_stream(amqp.channel(), "exp.history")
        amqp.channel().basic_publish("", "exp.history", b"x")
        amqp.close()
        rss0 = rss_mb()
        clients = [
            StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", vhost, heartbeat=0)
            for _ in range(args.connections)
        ]
        time.sleep(2)
        rss1 = rss_mb()
        cpu0 = broker_cpu_seconds()
        time.sleep(args.idle)
        cpu1 = broker_cpu_seconds()
        alive = 0
        for client in clients:
            try:
                alive += client.tail("exp.history") is not None
                client.close()
            except Exception:
                pass
        print(json.dumps({
            "connections": args.connections,
            "broker_rss_mb_per_100_connections": round((rss1 - rss0) / args.connections * 100, 2),
            "broker_cpu_s_idle": round(cpu1 - cpu0, 2),
            "idle_s": args.idle,
            "tail_read_works_after_idle": alive,
        }))
    finally:
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
