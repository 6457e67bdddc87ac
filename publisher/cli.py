"""``puller``: the ops command. ``puller pull IMAGE`` puts an image on every node;
``puller nodes`` lists the nodes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TextIO

from contract import BrokerUnavailable, InvalidReference, NoNodes, parse_reference
from publisher.client import DEFAULT_TIMEOUT, Publisher
from publisher.live_view import LiveView
from publisher.report import PullReport
from publisher.roster import NodeInfo

EXIT_OK = 0
EXIT_NOT_EVERYWHERE = 1
EXIT_USAGE = 2
EXIT_BROKER = 3


def main(argv: list[str] | None = None) -> int:
    # The library logs through the logging module; a person at the CLI wants only warnings.
    logging.basicConfig(level=logging.WARNING, format="puller: %(message)s", stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # its connection errors are ours too
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "pull":
            return _pull(args, sys.stdout, sys.stderr)
        if args.command == "nodes":
            return _nodes(args, sys.stdout)
    except BrokerUnavailable as error:
        print(f"puller: {error}", file=sys.stderr)
        return EXIT_BROKER
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puller",
        description="Put docker images on every node of the cluster.",
        epilog="exit status: 0 every expected node has the image; 1 some failed, did not "
        "answer, or no node was there; 2 bad usage or image reference; 3 RabbitMQ unreachable.",
    )
    parser.add_argument(
        "--amqp-url",
        help="RabbitMQ URL (default: $PULLER_AMQP_URL, else amqp://guest:guest@localhost:5672/%%2F)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    pull = commands.add_parser("pull", help="pull IMAGE onto every node and report per node")
    pull.add_argument("image", metavar="IMAGE", help="e.g. cyberdojofoundation/gcc_assert:93eefc6")
    which = pull.add_mutually_exclusive_group()
    which.add_argument(
        "--expect",
        type=_positive_int,
        metavar="N",
        help="wait until N nodes answered (default: every node in the roster)",
    )
    which.add_argument(
        "--nodes",
        type=_node_list,
        metavar="A,B",
        help="wait for these nodes (default: every node in the roster)",
    )
    pull.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"wait at most this long (default {DEFAULT_TIMEOUT:g})",
    )
    pull.add_argument("--json", action="store_true", help="print one JSON object at the end")
    nodes = commands.add_parser("nodes", help="list the live nodes")
    nodes.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _pull(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        image = parse_reference(args.image)
    except InvalidReference as error:
        print(f"puller: invalid image reference: {error}", file=err)
        return EXIT_USAGE
    try:
        with Publisher(args.amqp_url) as publisher:
            names = args.nodes
            if names is None and args.expect is None:
                names = [info.node for info in publisher.nodes()]
            if not args.json and out.isatty():
                print(f"{image}", file=out)
            view = None if args.json else LiveView(out, names or [], live=out.isatty())
            report = publisher.pull(
                image,
                expect=args.expect,
                nodes=names or None if args.expect is None else None,
                timeout=args.timeout,
                on_progress=view.progress if view else None,
                on_result=view.result if view else None,
            )
            if view is not None:
                view.close()
    except NoNodes as error:
        if args.json:
            json.dump({"image": str(image), "nodes": [], "ok": False, "error": str(error)}, out)
            out.write("\n")
        print(f"puller: {error}", file=err)
        return EXIT_NOT_EVERYWHERE
    if args.json:
        json.dump(report.to_json(), out)
        out.write("\n")
    elif not out.isatty():
        _print_table(report, out)
    else:  # the live table is on screen; add what it has no room for
        for result in report.failed:
            if result.error is not None:
                kind, message = result.error.kind.value, result.error.message
                print(f"  {result.node}: {kind}: {message}", file=out)
    _print_verdict(report, args.timeout, err)
    return EXIT_OK if report.ok else EXIT_NOT_EVERYWHERE


def _nodes(args: argparse.Namespace, out: TextIO) -> int:
    with Publisher(args.amqp_url) as publisher:
        roster = publisher.nodes()
    if args.json:
        json.dump({"nodes": [info.to_json() for info in roster]}, out)
        out.write("\n")
        return EXIT_OK
    if not roster:
        print("no nodes have announced themselves recently", file=out)
        return EXIT_OK
    width = max(len(info.node) for info in roster)
    now = time.time()
    for info in roster:
        print(
            f"{info.node:<{width}}  puller {info.version}  engine {info.engine or 'UNREACHABLE'}"
            f"  up {now - info.started_at:6.0f}s  seen {now - info.last_seen:4.1f}s ago"
            f"  {_catch_up_text(info)}",
            file=out,
        )
    return EXIT_OK


def _catch_up_text(info: NodeInfo) -> str:
    if info.caught_up is None:
        return "catch-up unknown"
    state = "caught up" if info.caught_up else f"catching up ({info.replay_pending} pending)"
    if info.replay_failed:
        state += f", {info.replay_failed} replayed pulls failed"
    return state


def _print_table(report: PullReport, out: TextIO) -> None:
    print(f"{report.image}  (request {report.request_id})", file=out)
    width = max([len(r.node) for r in report.nodes] + [4])
    for result in report.nodes:
        detail = (
            f"{result.error.kind.value}: {result.error.message}"
            if result.error
            else (result.image_id or "")
        )
        print(
            f"  {result.node:<{width}}  {result.status.value:<8} {result.seconds:8.3f}s  {detail}",
            file=out,
        )


def _print_verdict(report: PullReport, timeout: float, err: TextIO) -> None:
    for note in report.notes:
        print(f"puller: note: {note}", file=err)
    if report.failed:
        names = ", ".join(r.node for r in report.failed)
        print(f"puller: failed on {len(report.failed)} node(s): {names}", file=err)
    if report.missing:
        named = ", ".join(r.node for r in report.no_reply)
        print(
            f"puller: {report.missing} of {report.expected} expected node(s) did not answer "
            f"within {timeout:g}s" + (f": {named}" if named else ""),
            file=err,
        )
    if not report.answered:
        print(f"puller: no node answered within {timeout:g}s", file=err)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _node_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one node")
    return names


if __name__ == "__main__":
    sys.exit(main())
