"""Shared bits of the experiments: the broker of broker.py, a fresh vhost, a stream."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pika

sys.path.insert(0, "/work/main")

from localcluster.broker_cluster import rabbitmqctl  # noqa: E402

HERE = Path(__file__).resolve().parent
STATE = json.loads((HERE / "run" / "broker.json").read_text())
NODE = STATE["name"]
AMQP_PORT = STATE["amqp_port"]
STREAM_PORT = STATE["stream_port"]


def ctl(*args: str, tool: str = "rabbitmqctl") -> str:
    return rabbitmqctl(NODE, *args, tool=tool)


def fresh_vhost(prefix: str = "exp") -> str:
    vhost = f"{prefix}-{secrets.token_hex(3)}"
    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost


def delete_vhost(vhost: str) -> None:
    ctl("delete_vhost", vhost)


def connect(vhost: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1",
            AMQP_PORT,
            vhost,
            pika.PlainCredentials("guest", "guest"),
            heartbeat=60,
        )
    )


def declare_stream(
    channel: pika.adapters.blocking_connection.BlockingChannel,
    name: str,
    segment_bytes: int = 4_000_000,
    max_bytes: int | None = None,
    max_age: str | None = None,
) -> None:
    arguments: dict[str, object] = {
        "x-queue-type": "stream",
        "x-stream-max-segment-size-bytes": segment_bytes,
    }
    if max_bytes is not None:
        arguments["x-max-length-bytes"] = max_bytes
    if max_age is not None:
        arguments["x-max-age"] = max_age
    channel.queue_declare(name, durable=True, arguments=arguments)


def stream_status(vhost: str, name: str) -> str:
    return ctl("stream_status", "-p", vhost, name, tool="rabbitmq-streams")


def broker_cpu_seconds() -> float:
    """utime+stime of the broker's beam.smp (all threads), from /proc."""
    return proc_cpu(beam_pid())


def beam_pid() -> int:
    """The beam.smp whose environment names our node."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if "beam.smp" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            if f"RABBITMQ_NODENAME={NODE}".encode() in (proc / "environ").read_bytes():
                return int(proc.name)
        except OSError:
            continue
    raise RuntimeError("no beam.smp for our node")


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / 100.0
