"""Experiment 7: on a 3-node RabbitMQ 3.10 cluster (our own nodes, stream plugin on each),
is the tail read over the stream protocol at least the offset of every entry a publisher
has had confirmed, when read (a) through a replica's node, (b) through the leader's node?

A publisher sends confirmed entries to the leader's node in a tight loop (another thread);
right after each confirm, the main thread reads the tail through a node and compares it
with the confirmed entry's offset (learnt afterwards by an AMQP reading). Counts how often
the tail is behind what was already confirmed.

Also: metadata gives the leader's advertised host and port (the client connects there).
"""

from __future__ import annotations

import os
import pwd
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika

sys.path.insert(0, "/work/main")
from localcluster import broker_cluster  # noqa: E402
from localcluster.broker_cluster import BrokerCluster, BrokerNode  # noqa: E402
from localcluster.processes import free_port  # noqa: E402

from stream_tail import StreamClient  # noqa: E402

STREAM_PORTS: dict[str, int] = {}
_original_prepare = BrokerNode.prepare


def prepare_with_stream_plugin(self: BrokerNode) -> None:
    _original_prepare(self)
    port = STREAM_PORTS.setdefault(self.name, free_port())
    user = pwd.getpwnam("rabbitmq")
    conf = broker_cluster.CONFIG + (
        f"stream.listeners.tcp.1 = 127.0.0.1:{port}\n"
        "stream.advertised_host = 127.0.0.1\n"
        f"stream.advertised_port = {port}\n"
    )
    for name, text in (("rabbitmq.conf", conf), ("enabled_plugins", "[rabbitmq_stream].\n")):
        path = self.directory / name
        path.write_text(text)
        os.chown(path, user.pw_uid, user.pw_gid)


BrokerNode.prepare = prepare_with_stream_plugin  # type: ignore[method-assign]

STREAM = "exp.history"


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="catchup-cluster-", dir="/tmp"))
    with BrokerCluster(root, size=3) as cluster:
        leader_conn = pika.BlockingConnection(pika.URLParameters(cluster.node_url(1)))
        channel = leader_conn.channel()
        channel.queue_declare(
            STREAM, durable=True,
            arguments={"x-queue-type": "stream", "x-initial-cluster-size": 3},
        )
        time.sleep(2)
        leader = cluster.stream_leader(STREAM)
        others = [n.index for n in cluster.nodes if n.index != leader]
        print("leader is node", leader, "; replicas", others)
        node_port = {n.index: STREAM_PORTS[n.name] for n in cluster.nodes}
        probe = StreamClient("127.0.0.1", node_port[others[0]], "guest", "guest", "/")
        brokers, lead_ref, replica_refs = probe.metadata(STREAM)
        print("metadata: brokers", brokers, "leader", brokers.get(lead_ref), "replicas",
              [brokers[r] for r in replica_refs])
        probe.close()
        publish_conn = pika.BlockingConnection(pika.URLParameters(cluster.node_url(leader)))
        pub = publish_conn.channel()
        pub.confirm_delivery()
        results = {}
        for label, index in (("replica", others[0]), ("leader", leader)):
            client = StreamClient("127.0.0.1", node_port[index], "guest", "guest", "/")
            behind, reads = 0, 0
            published = 0
            # keep the stream busy from another connection, so replication has work in flight
            stop = threading.Event()

            def flood() -> None:
                conn = pika.BlockingConnection(pika.URLParameters(cluster.node_url(leader)))
                ch = conn.channel()
                while not stop.is_set():
                    for _ in range(50):
                        ch.basic_publish("", STREAM, b"f" * 200)
                    conn.process_data_events(time_limit=0.01)
                conn.close()

            flooder = threading.Thread(target=flood)
            flooder.start()
            confirmed_marks = []
            for i in range(300):
                body = f"{label}-{i}".encode()
                pub.basic_publish("", STREAM, body)  # returns once confirmed
                published += 1
                chunk = client.tail(STREAM)
                reads += 1
                confirmed_marks.append((body, chunk.last_offset if chunk else -1))
            stop.set()
            flooder.join()
            # find each confirmed entry's offset with one AMQP reading of the whole stream
            offsets = {}
            reader = pika.BlockingConnection(pika.URLParameters(cluster.node_url(leader)))
            rch = reader.channel()
            rch.basic_qos(prefetch_count=2000)
            wanted = {b for b, _ in confirmed_marks}
            for method, props, body in rch.consume(
                STREAM, arguments={"x-stream-offset": "first"}, inactivity_timeout=3
            ):
                if method is None:
                    break
                rch.basic_ack(method.delivery_tag)
                if body in wanted:
                    offsets[body] = props.headers["x-stream-offset"]
                    if len(offsets) == len(wanted):
                        break
            try:
                reader.close()
            except Exception:  # pika cancel rejects pending deliveries; a stream closes on it
                pass
            for body, tail in confirmed_marks:
                if tail < offsets[body]:
                    behind += 1
            results[label] = (behind, reads)
            print(f"tail read through the {label}'s node: behind a confirmed entry in "
                  f"{behind} of {reads} reads")
            client.close()
        publish_conn.close()
        leader_conn.close()
    print(results)


if __name__ == "__main__":
    main()
