"""Progress fan-in: what a requester's reply queue receives for one pull onto N nodes, by what
the request says about progress, from the baseline's workers and from this tree's.

    .venv/bin/python -m bench.progress_fanin [--nodes 6] [--engines 2] [--layer-mb 10]
                                             [--uplink-mbps 20] [--baseline 03d5020]

For each worker build, N workers on shared Docker Engines pull from a registry behind one
shared, throttled uplink (:class:`~localcluster.uplink.Uplink`), so that each pull lasts a
few seconds, as a real image over a real link does. For each kind of request (no
``progress`` field, as a publisher older than the field sends it; ``progress: false``, as
``Publisher.request()``, the HTTP gateway and ``puller pull --json`` send it; ``progress:
true``, as ``puller pull`` on a terminal does), a fresh one-layer image is published on a
reply queue of our own, and the replies that reach the queue (on the real broker) are
counted until every node has answered: progress reports, results, and their bytes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pika

from bench.common import BenchEnvironment, bench_environment, print_table, save
from bench.prune_race import worker_from
from contract import CONTENT_TYPE, PullRequest, parse_reference
from contract import topology as topo
from localcluster.uplink import Uplink

BASELINE = "03d5020"
"""The last commit before requests said whether they want progress (issue 25)."""
KINDS = {"no field (older publisher)": None, "progress: false": False, "progress: true": True}


@dataclass
class Replies:
    progress: int = 0
    progress_bytes: int = 0
    results: int = 0
    result_bytes: int = 0
    seconds: float = 0.0


def count_replies(amqp_url: str, request_id: str, body: bytes, nodes: int) -> Replies:
    """Publishes ``body`` to every node with a reply queue of our own and counts what comes
    back until ``nodes`` results are in."""
    counted = Replies()
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        reply_to = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(reply_to, topo.REPLIES.name, routing_key=reply_to)
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, reply_to=reply_to, correlation_id=request_id
        )
        started = time.monotonic()
        channel.basic_publish(topo.PULLS.name, "", body, properties)
        for _method, _properties, reply in channel.consume(reply_to, inactivity_timeout=120):
            if reply is None:
                raise RuntimeError(f"only {counted.results} of {nodes} answers in 120 s")
            if json.loads(reply)["type"] == "progress":
                counted.progress += 1
                counted.progress_bytes += len(reply)
            else:
                counted.results += 1
                counted.result_bytes += len(reply)
            if counted.results == nodes:
                break
        counted.seconds = round(time.monotonic() - started, 2)
        channel.cancel()
    return counted


def request_body(image: str, progress: bool | None) -> tuple[str, bytes]:
    request = PullRequest.new(parse_reference(image), progress=progress is not False)
    fields = json.loads(request.encode())
    if progress is None:
        del fields["progress"]
    return request.request_id, json.dumps(fields).encode()


def measure(
    environment: BenchEnvironment,
    uplink: Uplink,
    label: str,
    command: list[str] | None,
    args: argparse.Namespace,
) -> list[list[object]]:
    """Each kind of request once, against ``args.nodes`` workers run by ``command`` (this
    tree's when ``None``). Requests go to the live queues only: the history stays empty,
    so the next build's workers have nothing to catch up on."""
    rows: list[list[object]] = []
    prefix = "tree" if command is None else "base"
    workers = environment.start_workers(args.nodes, prefix=prefix, command=command)
    try:
        for kind, progress in KINDS.items():
            repository = f"fanin/{uuid.uuid4().hex[:8]}"
            environment.registry.push_sized(repository, "1", [args.layer_mb * 1_000_000])
            request_id, body = request_body(f"{uplink.address}/{repository}:1", progress)
            replies = count_replies(environment.amqp_url, request_id, body, args.nodes)
            rows.append([label, kind, *asdict(replies).values()])
    finally:
        for worker in workers:
            worker.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--layer-mb", type=int, default=10)
    parser.add_argument("--uplink-mbps", type=float, default=20.0)
    parser.add_argument("--baseline", default=BASELINE, help="a revision; empty: none")
    args = parser.parse_args(argv)
    rows: list[list[object]] = []
    with (
        bench_environment() as environment,
        tempfile.TemporaryDirectory(prefix="fanin-baseline-") as source,
    ):
        environment.add_engines(args.engines)
        target = ("127.0.0.1", environment.registry.port)
        with Uplink(target, rate=args.uplink_mbps * 1_000_000) as uplink:
            if args.baseline:
                baseline = worker_from(args.baseline, Path(source))
                rows += measure(environment, uplink, f"baseline {args.baseline}", baseline, args)
            rows += measure(environment, uplink, "this tree", None, args)
    header = ["workers", "request", *Replies.__dataclass_fields__]
    print_table(
        f"replies to one pull onto {args.nodes} nodes ({args.layer_mb} MB layer, "
        f"{args.uplink_mbps:g} MB/s shared uplink)",
        header,
        rows,
    )
    path = save(
        "progress_fanin",
        {
            "nodes": args.nodes,
            "layer_mb": args.layer_mb,
            "uplink_mbps": args.uplink_mbps,
            "rows": [dict(zip(header, row, strict=True)) for row in rows],
        },
    )
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
