"""The CLI's fleet commands: ``puller warm FILE``, ``puller status IMAGE`` and
``puller prune``. Exit status as ``puller pull``: 0 done everywhere, 1 not everywhere (a
node failed, drifted or did not answer), 2 bad usage, 3 RabbitMQ unreachable."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, TextIO

from contract import InvalidReference, NoNodes, PruneResult, parse_reference
from contract.image_list import read_image_list
from publisher.client import Publisher
from publisher.report import PruneReport, StatusReport, WarmReport, older_worker

EXIT_OK = 0
EXIT_NOT_EVERYWHERE = 1
EXIT_USAGE = 2

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    which_nodes: Any,
    positive_float: Any,
) -> None:
    warm = commands.add_parser(
        "warm",
        help="put every image listed in FILE on every node, behind any session's pull",
        description="Bulk warm-up at low priority: each node pulls the images at its "
        "PULLER_MAX_CONCURRENT_PULLS and starts a session's pull before any warm-up still "
        "queued. FILE: one image a line, '#' comments.",
    )
    warm.add_argument("file", metavar="FILE", type=Path)
    which_nodes(warm)
    _wait_options(warm, positive_float, 3600.0, "for every node to answer for every image")

    status = commands.add_parser(
        "status",
        help="where IMAGE is: per node present/absent, image id and digest; flags drift",
        description="Asks every node, pulling nothing. Nodes with different digests for "
        "the same name are flagged as drift (a tag such as :latest moved between their "
        "pulls): `puller pull --refresh IMAGE` brings them together.",
    )
    status.add_argument("image", metavar="IMAGE")
    which_nodes(status)
    _wait_options(status, positive_float, 10.0)

    prune = commands.add_parser(
        "prune",
        help="remove images unused for a while from every node",
        description="Each node removes the images it has not used for the given time, "
        "oldest-unused first; never an image a container (running or stopped) uses, never "
        "one on the keep list; it answers what it removed and the bytes freed.",
    )
    prune.add_argument(
        "--unused-for",
        type=duration,
        required=True,
        metavar="AGE",
        help="e.g. 30d, 12h, 90m (units s, m, h, d, w)",
    )
    prune.add_argument(
        "--keep", type=Path, metavar="FILE", help="images never to remove, one a line"
    )
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    which_nodes(prune)
    _wait_options(prune, positive_float, 120.0)


def _wait_options(
    command: argparse.ArgumentParser, positive_float: Any, default: float, what: str = ""
) -> None:
    command.add_argument(
        "--timeout",
        type=positive_float,
        default=default,
        metavar="SECONDS",
        help=f"wait at most this long{' ' + what if what else ''} (default {default:g})",
    )
    command.add_argument("--json", action="store_true", help="print one JSON object at the end")


def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (or plain seconds) in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: write a number and a unit, e.g. 30d, 12h, 90m"
        )
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def run_warm(args: argparse.Namespace, publisher: Publisher, out: TextIO, err: TextIO) -> int:
    try:
        images = read_image_list(args.file)
    except InvalidReference as error:
        print(f"puller: {error}", file=err)
        return EXIT_USAGE
    if not images:
        print(f"puller: {args.file} lists no image", file=err)
        return EXIT_USAGE
    live = not args.json and out.isatty()
    shown = {"lines": 0}

    def update(report: WarmReport) -> None:
        if not live:
            return
        if shown["lines"]:
            out.write(f"\x1b[{shown['lines']}F")
        lines = _warm_lines(report)
        for line in lines:
            out.write(f"\x1b[2K{line}\n")
        out.flush()
        shown["lines"] = len(lines)

    try:
        report = publisher.warm(
            images,
            expect=args.expect,
            nodes=args.nodes,
            timeout=args.timeout,
            on_update=update,
        )
    except NoNodes as error:
        print(f"puller: {error}", file=err)
        return EXIT_NOT_EVERYWHERE
    if args.json:
        _dump(report.to_json(), out)
    else:
        _print_warm(report, live, out, err)
    return EXIT_OK if report.ok else EXIT_NOT_EVERYWHERE


def _print_warm(report: WarmReport, live: bool, out: TextIO, err: TextIO) -> None:
    if not live:
        for line in _warm_lines(report):
            print(line, file=out)
    for kind, count in report.failures_by_kind.items():
        print(f"failed: {count} x {kind}", file=out)
    for result in report.failures[:20]:
        if result.error is not None:
            print(f"  {result.node}  {result.image}: {result.error.message}", file=out)
    if len(report.failures) > 20:
        print(f"  ... and {len(report.failures) - 20} more (--json lists all)", file=out)
    for node in sorted(report.silent):
        print(f"no reply: {node}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=err)


def _warm_lines(report: WarmReport) -> list[str]:
    total = len(report.images)
    nodes = sorted(report.by_node.values(), key=lambda n: n.node)
    width = max([len(n.node) for n in nodes] + [4])
    lines = [f"warm-up of {total} image(s)"]
    for node in nodes:
        failed = f"  {node.failed} failed" if node.failed else ""
        lines.append(
            f"  {node.node:<{width}}  {node.answered:>5}/{total}  {_size(node.bytes):>9}{failed}"
        )
    return lines


def run_status(args: argparse.Namespace, publisher: Publisher, out: TextIO, err: TextIO) -> int:
    try:
        image = parse_reference(args.image)
    except InvalidReference as error:
        print(f"puller: invalid image reference: {error}", file=err)
        return EXIT_USAGE
    try:
        report = publisher.status(image, expect=args.expect, nodes=args.nodes, timeout=args.timeout)
    except NoNodes as error:
        print(f"puller: {error}", file=err)
        return EXIT_NOT_EVERYWHERE
    if args.json:
        _dump(report.to_json(), out)
    else:
        _print_status(report, out)
    return EXIT_OK if report.ok else EXIT_NOT_EVERYWHERE


def _print_status(report: StatusReport, out: TextIO) -> None:
    print(report.image, file=out)
    width = max([len(r.node) for r in report.nodes] + [4])
    for result in report.nodes:
        if older_worker(result):
            detail = "unknown: this node's worker predates `puller status` (upgrade it)"
        elif result.error is not None:
            detail = f"{result.error.kind.value}: {result.error.message}"
        else:
            detail = " ".join(x for x in (result.image_id, result.digest) if x)
        print(f"  {result.node:<{width}}  {result.status.value:<8}  {detail}", file=out)
    if report.drift:
        print("DRIFT: the nodes have different images under this name:", file=out)
        for version, nodes in report.versions.items():
            print(f"  {version}: {', '.join(nodes)}", file=out)
        print(f"  `puller pull --refresh {report.image}` brings them together", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)


def run_prune(args: argparse.Namespace, publisher: Publisher, out: TextIO, err: TextIO) -> int:
    try:
        keep = read_image_list(args.keep) if args.keep is not None else ()
    except InvalidReference as error:
        print(f"puller: {error}", file=err)
        return EXIT_USAGE
    try:
        report = publisher.prune(
            args.unused_for,
            keep=keep,
            dry_run=args.dry_run,
            expect=args.expect,
            nodes=args.nodes,
            timeout=args.timeout,
        )
    except NoNodes as error:
        print(f"puller: {error}", file=err)
        return EXIT_NOT_EVERYWHERE
    if args.json:
        _dump(report.to_json(), out)
    else:
        _print_prune(report, out)
    return EXIT_OK if report.ok else EXIT_NOT_EVERYWHERE


def _print_prune(report: PruneReport, out: TextIO) -> None:
    verb = "would remove" if report.dry_run else "removed"
    for answer in report.answers:
        if not isinstance(answer, PruneResult):
            if older_worker(answer):
                why = "this node's worker predates `puller prune` (upgrade it)"
            else:
                why = f"{answer.error.kind.value}: {answer.error.message}" if answer.error else "?"
            print(f"{answer.node}: not pruned: {why}", file=out)
            continue
        if answer.error is not None:
            print(f"{answer.node}: not pruned: {answer.error.message}", file=out)
            continue
        print(
            f"{answer.node}: {verb} {answer.removed_count} image(s), "
            f"{_size(answer.bytes_freed)}; kept {answer.kept_in_use} in use by a container, "
            f"{answer.kept_listed} on the keep list",
            file=out,
        )
        for removed in answer.removed:
            name = removed.names[0] if removed.names else removed.image_id
            print(f"  {name}  {_size(removed.size)}", file=out)
        if answer.removed_count > len(answer.removed):
            print(f"  ... and {answer.removed_count - len(answer.removed)} more", file=out)
    for node in report.no_reply:
        print(f"{node}: no reply", file=out)
    print(f"total {verb}: {_size(report.bytes_freed)}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)


def _size(count: int) -> str:
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f} GB"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e3:.0f} kB"


def _dump(document: dict[str, Any], out: TextIO) -> None:
    json.dump(document, out)
    out.write("\n")
