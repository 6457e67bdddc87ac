"""Experiment 4: a reconnect storm of N simulated nodes (one process, one pika IOLoop), three
ways of finding where the history ends. Counts, not timings, are the result.

Every node was caught up (its saved place = the tail); then ``--missed`` requests go into the
history (the broker was "down" for the nodes); then all N nodes reconnect within
``--spread`` seconds and catch up:

- ``markers`` (today): each node puts its own marker into the history (through the
  puller.history exchange), reads the last chunk up to it (FINDING_END), then reads from its
  saved place up to that marker (REPLAYING).
- ``clock``: each node asks one clock (a queue with single-active-consumer; here one clock
  consumer) over AMQP with direct reply-to; the clock writes at most one marker per
  ``--clock-interval`` covering every ask received before it, and answers each asker with
  the marker's sequence number once RabbitMQ confirmed it; the node reads from its saved
  place up to a clock marker with that number or higher.
- ``tail``: each node reads the tail over the stream protocol (subscribe at "last", one
  chunk, fenced), then reads from its saved place up to that offset.

Per design and N: history deliveries per node (mean, max: AMQP deliveries plus the entries
of the tail chunk for ``tail``), entries written into the history during the storm, the
broker's CPU seconds from the first reconnect until the last node caught up, and a check
that every node saw every missed request.

    .venv/bin/python exp4_storm.py --nodes 50,100,200 --designs markers,clock,tail
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.adapters.select_connection
import pika.spec

from common import (
    AMQP_PORT,
    STREAM_PORT,
    broker_cpu_seconds,
    connect,
    delete_vhost,
    fresh_vhost,
)
from stream_tail import StreamClient

sys.path.insert(0, "/work/main")
from contract import PullRequest, parse_reference  # noqa: E402
from contract import topology as topo  # noqa: E402

HISTORY = topo.HISTORY.name
STREAM = topo.HISTORY_STREAM_NAME
CLOCK_QUEUE = "puller.clock"
NODES_PER_CONNECTION = 25
PREFETCH = 50


def request_body(i: int) -> bytes:
    image = parse_reference(f"registry.example:5000/team/app-{i % 7}:v{i}")
    return PullRequest.new(image).encode()


def marker_body(kind: str, ident: str) -> bytes:
    return json.dumps({"v": 1, "type": "history_marker", "node": kind, "marker_id": ident}).encode()


@dataclass
class Node:
    name: str
    saved: int
    deliveries: int = 0
    requests_seen: set[bytes] = field(default_factory=set)
    done_at: float | None = None
    end: int | None = None


class Storm:
    def __init__(self, vhost: str, design: str, nodes: int, spread: float, clock_interval: float):
        self.vhost = vhost
        self.design = design
        self.spread = spread
        self.clock_interval = clock_interval
        self.loop = pika.adapters.select_connection.IOLoop()
        self.connections: list[pika.SelectConnection] = []
        self.nodes: list[Node] = []
        self.count = nodes
        self.pending_opens = 0
        self.finished = 0
        self.tail_client: StreamClient | None = None
        # the clock
        self.clock_seq = 0
        self.clock_pending: list[tuple[str, str]] = []
        self.clock_in_flight: list[tuple[str, str]] | None = None
        self.clock_last = 0.0
        self.clock_channel: Any = None
        self.clock_markers = 0

    # -- plumbing ------------------------------------------------------------------------------

    def params(self) -> pika.ConnectionParameters:
        return pika.ConnectionParameters(
            "127.0.0.1", AMQP_PORT, self.vhost, pika.PlainCredentials("guest", "guest"),
            heartbeat=120,
        )

    def open_connections(self, count: int, then: Callable[[], None]) -> None:
        remaining = {"n": count}

        def opened(_c: Any) -> None:
            remaining["n"] -= 1
            if remaining["n"] == 0:
                then()

        for _ in range(count):
            self.connections.append(
                pika.SelectConnection(self.params(), on_open_callback=opened, custom_ioloop=self.loop)
            )

    def channel(self, node_index: int, then: Callable[[Any], None]) -> None:
        connection = self.connections[node_index // NODES_PER_CONNECTION]
        connection.channel(on_open_callback=then)

    def consume(
        self,
        channel: Any,
        start: object,
        on_entry: Callable[[int, bytes], None],
        consuming: Callable[[], None] = lambda: None,
    ) -> None:
        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            ch.basic_ack(method.delivery_tag)
            on_entry((props.headers or {}).get("x-stream-offset", -1), body)

        channel.basic_qos(
            prefetch_count=PREFETCH,
            callback=lambda _f: channel.basic_consume(
                STREAM,
                on_message,
                arguments={"x-stream-offset": start},
                callback=lambda _ok: consuming(),
            ),
        )

    def done(self, node: Node, channel: Any) -> None:
        if node.done_at is not None:
            return
        node.done_at = time.monotonic()
        if channel.is_open:
            channel.close()
        self.finished += 1
        if self.finished == self.count:
            self.loop.stop()

    # -- the storm -----------------------------------------------------------------------------

    def run(self, saved: int) -> dict[str, Any]:
        self.nodes = [Node(f"node-{i:04d}", saved) for i in range(self.count)]
        connections = (self.count + NODES_PER_CONNECTION - 1) // NODES_PER_CONNECTION + 1
        self.open_connections(connections, self.start)
        self.loop.start()
        for connection in self.connections:
            if connection.is_open:
                connection.close()
        self.loop.start_poller() if False else None
        # let the closes go out
        deadline = time.monotonic() + 2
        while any(not c.is_closed for c in self.connections) and time.monotonic() < deadline:
            self.loop.call_later(0.05, self.loop.stop)
            self.loop.start()
        return {}

    def start(self) -> None:
        self.began = time.monotonic()
        self.cpu_before = broker_cpu_seconds()
        if self.design == "clock":
            clock_connection = self.connections[-1]
            clock_connection.channel(on_open_callback=self.clock_open)
        else:
            self.launch_nodes()

    def launch_nodes(self) -> None:
        if self.design == "tail":
            self.tail_client = StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", self.vhost)
        for index, node in enumerate(self.nodes):
            delay = random.uniform(0, self.spread)
            self.loop.call_later(delay, lambda i=index, n=node: self.node_start(i, n))

    def node_start(self, index: int, node: Node) -> None:
        if self.design == "markers":
            self.channel(index, lambda ch: self.markers_find_end(index, node, ch))
        elif self.design == "clock":
            self.channel(index, lambda ch: self.clock_ask(index, node, ch))
        else:
            self.tail_read(index, node)

    # -- design: markers (today) ---------------------------------------------------------------

    def markers_find_end(self, index: int, node: Node, channel: Any) -> None:
        marker_id = uuid.uuid4().hex
        marker = marker_body(node.name, marker_id)

        def on_entry(offset: int, body: bytes) -> None:
            node.deliveries += 1
            if body == marker and node.end is None:
                node.end = offset
                channel.close()
                self.channel(index, lambda ch: self.replay(node, ch, lambda o, b: o >= (node.end or 0)))

        # As the worker does: the marker goes in once the consumer is attached (consume-ok).
        self.consume(
            channel, "last", on_entry, lambda: channel.basic_publish(HISTORY, "", marker)
        )

    def replay(self, node: Node, channel: Any, reached: Callable[[int, bytes], bool]) -> None:
        """Today starts at the saved offset itself (to verify it); the others at saved + 1."""
        start = node.saved if self.design == "markers" else node.saved + 1

        def on_entry(offset: int, body: bytes) -> None:
            node.deliveries += 1
            if b'"type": "pull"' in body or b'"type":"pull"' in body:
                node.requests_seen.add(body)
            if reached(offset, body):
                self.done(node, channel)

        self.consume(channel, start, on_entry)

    # -- design: clock -------------------------------------------------------------------------

    def clock_open(self, channel: Any) -> None:
        self.clock_channel = channel

        def declared(_f: Any) -> None:
            channel.confirm_delivery(self.clock_confirmed)
            channel.basic_consume(CLOCK_QUEUE, self.clock_ask_received, auto_ack=True)
            self.launch_nodes()

        channel.queue_declare(
            CLOCK_QUEUE, durable=True, arguments={"x-single-active-consumer": True},
            callback=declared,
        )

    def clock_ask_received(self, _ch: Any, _m: Any, props: Any, _body: bytes) -> None:
        self.clock_pending.append((props.reply_to, props.correlation_id))
        self.clock_maybe_write()

    def clock_maybe_write(self) -> None:
        if self.clock_in_flight is not None or not self.clock_pending:
            return
        wait = self.clock_last + self.clock_interval - time.monotonic()
        if wait > 0:
            self.loop.call_later(wait, self.clock_maybe_write)
            return
        self.clock_seq += 1
        self.clock_in_flight, self.clock_pending = self.clock_pending, []
        self.clock_last = time.monotonic()
        self.clock_markers += 1
        self.clock_channel.basic_publish(HISTORY, "", marker_body("clock", f"{self.clock_seq:032x}"))

    def clock_confirmed(self, _frame: Any) -> None:
        asks, self.clock_in_flight = self.clock_in_flight or [], None
        for reply_to, correlation in asks:
            self.clock_channel.basic_publish(
                "", reply_to, str(self.clock_seq).encode(),
                pika.BasicProperties(correlation_id=correlation),
            )
        self.clock_maybe_write()

    def clock_ask(self, index: int, node: Node, channel: Any) -> None:
        def answered(_ch: Any, _m: Any, _p: Any, body: bytes) -> None:
            seq = int(body)
            channel.close()
            self.channel(index, lambda ch: self.replay(node, ch, reached_clock(seq)))

        def reached_clock(seq: int) -> Callable[[int, bytes], bool]:
            def reached(_offset: int, body: bytes) -> bool:
                if b'"node": "clock"' not in body:
                    return False
                return int(json.loads(body)["marker_id"], 16) >= seq

            return reached

        channel.basic_consume("amq.rabbitmq.reply-to", answered, auto_ack=True)
        channel.basic_publish(
            "", CLOCK_QUEUE, b"ask",
            pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=node.name),
        )

    # -- design: tail over the stream protocol ------------------------------------------------

    def tail_read(self, index: int, node: Node) -> None:
        # One stream-protocol connection per node, as a worker would open: connect, tail, close.
        client = StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", self.vhost)
        chunk = client.tail(STREAM)
        client.close()
        node.deliveries += chunk.num_entries if chunk else 0
        if chunk is None or chunk.last_offset <= node.saved:
            node.done_at = time.monotonic()
            self.finished += 1
            if self.finished == self.count:
                self.loop.stop()
            return
        end = chunk.last_offset
        self.channel(index, lambda ch: self.replay(node, ch, lambda o, b: o >= end))


def history_tail(vhost: str) -> int:
    client = StreamClient("127.0.0.1", STREAM_PORT, "guest", "guest", vhost)
    chunk = client.tail(STREAM)
    client.close()
    return -1 if chunk is None else chunk.last_offset


def one_run(design: str, nodes: int, missed: int, history: int, spread: float, interval: float) -> dict[str, Any]:
    vhost = fresh_vhost("storm")
    try:
        connection = connect(vhost)
        channel = connection.channel()
        for item in topo.history(topo.history_stream()):
            if isinstance(item, topo.Exchange):
                channel.exchange_declare(item.name, item.kind, durable=item.durable)
            elif isinstance(item, topo.Queue):
                channel.queue_declare(item.name, durable=item.durable, arguments=dict(item.arguments))
            else:
                channel.queue_bind(item.queue, item.exchange, item.routing_key)
        channel.confirm_delivery()
        for i in range(history):
            channel.basic_publish(HISTORY, "", request_body(i))
        saved = history_tail(vhost)
        missed_bodies = set()
        for i in range(missed):
            body = request_body(10_000 + i)
            missed_bodies.add(body)
            channel.basic_publish(HISTORY, "", body)
        before = history_tail(vhost)
        storm = Storm(vhost, design, nodes, spread, interval)
        storm.run(saved)
        cpu = broker_cpu_seconds() - storm.cpu_before
        wall = max(n.done_at or 0 for n in storm.nodes) - storm.began
        after = history_tail(vhost)
        per_node = [n.deliveries for n in storm.nodes]
        complete = sum(1 for n in storm.nodes if missed_bodies <= n.requests_seen)
        connection.close()
        return {
            "design": design,
            "nodes": nodes,
            "missed": missed,
            "deliveries_per_node_mean": round(statistics.mean(per_node), 1),
            "deliveries_per_node_max": max(per_node),
            "deliveries_total": sum(per_node),
            "history_entries_written_in_storm": after - before,
            "nodes_that_saw_every_missed_request": complete,
            "broker_cpu_s": round(cpu, 2),
            "wall_s": round(wall, 2),
        }
    finally:
        delete_vhost(vhost)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="50,100,200")
    parser.add_argument("--designs", default="markers,clock,tail")
    parser.add_argument("--missed", type=int, default=50)
    parser.add_argument("--history", type=int, default=200)
    parser.add_argument("--spread", type=float, default=2.0)
    parser.add_argument("--clock-interval", type=float, default=0.5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results = []
    for n in [int(x) for x in args.nodes.split(",")]:
        for design in args.designs.split(","):
            result = one_run(design, n, args.missed, args.history, args.spread, args.clock_interval)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"settings": vars(args), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
