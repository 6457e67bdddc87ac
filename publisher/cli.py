"""``puller``: the ops command. ``puller pull IMAGE`` puts an image on every node;
``puller nodes`` lists the nodes; ``puller broker-setup`` makes RabbitMQ users with exactly
the permissions of their role."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO
from urllib.parse import quote, urlsplit, urlunsplit

from contract import (
    BrokerUnavailable,
    Forbidden,
    HistoryGap,
    InvalidReference,
    Misconfigured,
    NoNodes,
    parse_reference,
    puller_version,
)
from contract import topology as topo
from contract.connection import BrokerTls
from publisher import broker_setup, fleet_commands
from publisher.client import DEFAULT_TIMEOUT, Publisher
from publisher.live_view import LiveView
from publisher.report import PullReport
from publisher.roster import NodeInfo
from publisher.settings import PublisherSettings

EXIT_OK = 0
EXIT_NOT_EVERYWHERE = 1
EXIT_USAGE = 2
EXIT_BROKER = 3

_UrlMaker = Callable[[str, str], str]


def main(argv: list[str] | None = None) -> int:
    # The library logs through the logging module; a person at the CLI wants only warnings.
    logging.basicConfig(level=logging.WARNING, format="puller: %(message)s", stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # its connection errors are ours too
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {
        "pull": lambda: _pull(args, sys.stdout, sys.stderr),
        "nodes": lambda: _nodes(args, sys.stdout, sys.stderr),
        "broker-setup": lambda: _broker_setup(args, sys.stdout, sys.stderr),
        "warm": lambda: _with_publisher(args, fleet_commands.run_warm),
        "status": lambda: _with_publisher(args, fleet_commands.run_status),
        "prune": lambda: _with_publisher(args, fleet_commands.run_prune),
    }
    command = commands.get(args.command)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return command()
    except BrokerUnavailable as error:
        print(f"puller: {error}", file=sys.stderr)
        return EXIT_BROKER
    except (Forbidden, Misconfigured) as error:
        forbidden = "forbidden: " if isinstance(error, Forbidden) else ""
        print(f"puller: {forbidden}{error}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puller",
        description="Put docker images on every node of the cluster.",
        epilog="exit status: 0 every expected node has the image; 1 some failed, did not "
        "answer, or no node was there; 2 bad usage, settings or image reference, or an image "
        "the policy forbids (PULLER_ALLOWED_IMAGES); 3 RabbitMQ unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"puller {puller_version()}")
    parser.add_argument(
        "--amqp-url",
        help="RabbitMQ URL (default: $PULLER_AMQP_URL, else amqp://guest:guest@localhost:5672/%%2F)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    pull = commands.add_parser("pull", help="pull IMAGE onto every node and report per node")
    pull.add_argument("image", metavar="IMAGE", help="e.g. cyberdojofoundation/gcc_assert:93eefc6")
    _which_nodes(pull)
    pull.add_argument(
        "--refresh",
        action="store_true",
        help="pull again where the node has the image, to follow a tag that moved in the "
        "registry (nodes whose image did not change answer 'present')",
    )
    pull.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"wait at most this long (default {DEFAULT_TIMEOUT:g})",
    )
    pull.add_argument("--json", action="store_true", help="print one JSON object at the end")
    fleet_commands.add_parsers(commands, _which_nodes, _positive_float)
    nodes = commands.add_parser("nodes", help="list the live nodes")
    nodes.add_argument("--json", action="store_true", help="print one JSON object")
    _add_broker_setup(commands)
    return parser


def _which_nodes(command: argparse.ArgumentParser) -> None:
    which = command.add_mutually_exclusive_group()
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


def _with_publisher(
    args: argparse.Namespace,
    command: Callable[[argparse.Namespace, Publisher, TextIO, TextIO], int],
) -> int:
    with Publisher(args.amqp_url) as publisher:
        return command(args, publisher, sys.stdout, sys.stderr)


def _add_broker_setup(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    setup = commands.add_parser(
        "broker-setup",
        help="create RabbitMQ users with exactly the permissions of their role",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Creates the vhost and the users (admin, publisher, worker) with exactly their
role's permissions, through RabbitMQ's management API; then, with
--declare-topology, declares the shared topology as the admin user.

Each user's password is the file PASSWORDS_DIR/NAME: read if it is there, else
generated and written there (mode 0600). Passwords are never printed. Running
it again changes nothing. RabbitMQ's users are the whole broker's, not a
vhost's: a name set up on two vhosts has one password.""",
        epilog="""\
example:
  puller broker-setup --management-url http://rabbitmq:15672 \\
      --management-user ops --management-password-file /run/secrets/ops \\
      --vhost puller --passwords-dir /run/secrets/puller \\
      --admin puller-admin --publisher sessions --worker workers \\
      --declare-topology amqps://rabbitmq:5671

exit status: 0 done; 2 bad usage or unreadable file; 3 RabbitMQ refused or
unreachable.""",
    )
    setup.add_argument("--vhost", required=True, help="the vhost (created if missing)")
    setup.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="NAME",
        help="a user that declares the shared topology (all of puller.*)",
    )
    setup.add_argument(
        "--publisher",
        action="append",
        default=[],
        metavar="NAME",
        help="a user that requests pulls (the session service, puller-http, this CLI)",
    )
    setup.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME[:NODE]",
        type=_worker_spec,
        help="a worker's user; with :NODE it may use that node's queue only, else any node's",
    )
    setup.add_argument(
        "--print-definitions",
        action="store_true",
        help="print the vhost and permissions as RabbitMQ definitions JSON and stop (no users, "
        "no passwords; nothing is changed)",
    )
    setup.add_argument(
        "--management-url",
        metavar="URL",
        help="RabbitMQ's management API, e.g. http://rabbitmq:15672 (no credentials in it)",
    )
    setup.add_argument(
        "--management-user", metavar="NAME", help="a user with the administrator tag"
    )
    setup.add_argument(
        "--management-password-file", type=Path, metavar="FILE", help="that user's password"
    )
    setup.add_argument(
        "--passwords-dir",
        type=Path,
        metavar="DIR",
        help="where each user's password file NAME is read from or written to (mode 0600)",
    )
    setup.add_argument(
        "--declare-topology",
        metavar="AMQP_URL",
        help="then declare the shared topology as the admin user at this broker, e.g. "
        "amqp://rabbitmq:5672 (no credentials or vhost in it: they are the admin's and --vhost)",
    )
    setup.add_argument(
        "--history-max-age",
        type=_positive_float,
        default=topo.DEFAULT_HISTORY_MAX_AGE,
        metavar="SECONDS",
        help="the history stream's retention, for --declare-topology "
        f"(default {topo.DEFAULT_HISTORY_MAX_AGE:g})",
    )
    setup.add_argument(
        "--history-max-bytes",
        type=_positive_int,
        default=topo.DEFAULT_HISTORY_MAX_BYTES,
        metavar="BYTES",
        help="the history stream's size bound, for --declare-topology "
        f"(default {topo.DEFAULT_HISTORY_MAX_BYTES})",
    )
    bounds = broker_setup.Bounds()
    setup.add_argument(
        "--queue-expires",
        type=_positive_float,
        default=bounds.queue_expires,
        metavar="SECONDS",
        help="a node or reply queue with no consumer for this long is deleted (an operator "
        f"policy; puller's own queues always have one) (default {bounds.queue_expires:g})",
    )
    setup.add_argument(
        "--queue-max-length",
        type=_positive_int,
        default=bounds.queue_max_length,
        metavar="COUNT",
        help="a node or reply queue holds at most this many messages, dropping the oldest "
        f"(default {bounds.queue_max_length})",
    )
    setup.add_argument(
        "--presence-max-bytes",
        type=_positive_int,
        default=bounds.presence_max_bytes,
        metavar="BYTES",
        help=f"the presence stream's size bound (default {bounds.presence_max_bytes})",
    )
    setup.add_argument(
        "--max-queues",
        type=_limit,
        default=bounds.max_queues,
        metavar="COUNT",
        help="the vhost's queue limit, -1 for none: one queue per node and per publisher, "
        f"and two streams (default {bounds.max_queues})",
    )
    setup.add_argument(
        "--max-connections",
        type=_limit,
        default=bounds.max_connections,
        metavar="COUNT",
        help="the vhost's connection limit, -1 for none: one per worker, two per publisher "
        f"(default {bounds.max_connections})",
    )


def _pull(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        image = parse_reference(args.image)
    except InvalidReference as error:
        print(f"puller: invalid image reference: {error}", file=err)
        return EXIT_USAGE
    try:
        with Publisher(args.amqp_url) as publisher:
            image = publisher.check(image)  # the policy, before anything touches RabbitMQ
            names = args.nodes
            if names is None and args.expect is None:
                roster = publisher.roster()
                names = [info.node for info in roster.nodes]
                if roster.note is not None:
                    print(f"puller: warning: {roster.note}", file=err)
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
                refresh=args.refresh,
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


def _nodes(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with Publisher(args.amqp_url) as publisher:
        found = publisher.roster()
    roster = found.nodes
    if found.note is not None:
        print(f"puller: warning: {found.note}", file=err)
    if args.json:
        answer: dict[str, object] = {"nodes": [info.to_json() for info in roster]}
        if found.note is not None:
            answer["notes"] = [found.note]
        json.dump(answer, out)
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


def _broker_setup(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    roles = [
        *((broker_setup.Role.ADMIN, name, None) for name in args.admin),
        *((broker_setup.Role.PUBLISHER, name, None) for name in args.publisher),
        *((broker_setup.Role.WORKER, name, node) for name, node in args.worker),
    ]
    try:
        if not roles:
            raise ValueError("name at least one user: --admin, --publisher or --worker")
        bounds = broker_setup.Bounds(
            queue_expires=args.queue_expires,
            queue_max_length=args.queue_max_length,
            presence_max_bytes=args.presence_max_bytes,
            max_queues=args.max_queues,
            max_connections=args.max_connections,
        )
        if args.print_definitions:
            users = [broker_setup.BrokerUser(role, name, "", node) for role, name, node in roles]
            json.dump(broker_setup.definitions(args.vhost, users, bounds), out, indent=2)
            out.write("\n")
            return EXIT_OK
        declare_url, tls = _check_setup_arguments(args, roles)
        _warn_if_clear_text(args.management_url, err)
        # every mistake in the users before any password file is made
        broker_setup.check_users((role, name, "", node) for role, name, node in roles)
        management_password = _read_password(args.management_password_file)
        users, kept = [], set()
        for role, name, node in roles:
            password, existed = _password_file(args.passwords_dir, name, err)
            users.append(broker_setup.BrokerUser(role, name, password, node))
            if existed:
                kept.add(name)
        credentials = (args.management_user, management_password)
        broker_setup.setup(args.management_url, args.vhost, users, credentials=credentials)
        broker_setup.bound_vhost(args.management_url, args.vhost, bounds, credentials=credentials)
    except ValueError as error:
        print(f"puller: {error}", file=err)
        return EXIT_USAGE
    except broker_setup.BrokerSetupError as error:
        print(f"puller: {error}", file=err)
        return EXIT_BROKER
    print(f"vhost {args.vhost!r}: {len(users)} user(s) with their role's permissions", file=out)
    for user in users:
        state = "kept" if user.name in kept else "new"
        node = f" node {user.node}" if user.node else ""
        path = args.passwords_dir / user.name
        print(f"  {user.role.value:<9} {user.name}{node}  password: {path} ({state})", file=out)
    print(
        f"  bounds: node and reply queues expire {bounds.queue_expires:g}s unconsumed and hold "
        f"at most {bounds.queue_max_length} messages; the presence stream at most "
        f"{bounds.presence_max_bytes} bytes; at most {_count(bounds.max_queues)} queues and "
        f"{_count(bounds.max_connections)} connections",
        file=out,
    )
    if declare_url is not None:
        admin = next(user for user in users if user.role is broker_setup.Role.ADMIN)
        try:
            broker_setup.declare_topology(
                declare_url(admin.name, admin.password),
                history_max_age=args.history_max_age,
                history_max_bytes=args.history_max_bytes,
                tls=tls,
            )
        except broker_setup.BrokerSetupError as error:
            print(f"puller: {error}", file=err)
            return EXIT_BROKER
        print(f"topology declared as {admin.name!r}", file=out)
    return EXIT_OK


def _count(limit: int) -> str:
    return "any number of" if limit < 0 else str(limit)


def _check_setup_arguments(
    args: argparse.Namespace, roles: list[tuple[broker_setup.Role, str, str | None]]
) -> tuple[_UrlMaker | None, BrokerTls]:
    """How to reach the broker to declare the topology, if asked; raises ``ValueError``."""
    missing = [
        flag
        for flag, value in (
            ("--management-url", args.management_url),
            ("--management-user", args.management_user),
            ("--management-password-file", args.management_password_file),
            ("--passwords-dir", args.passwords_dir),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"broker-setup needs {', '.join(missing)}")
    env = PublisherSettings.from_env()  # the TLS files, for an amqps:// URL
    tls = BrokerTls(env.tls_ca_file, env.tls_cert_file, env.tls_key_file)
    if args.declare_topology is None:
        return None, tls
    admins = [name for role, name, _ in roles if role is broker_setup.Role.ADMIN]
    if len(admins) != 1:
        raise ValueError("--declare-topology needs exactly one --admin to declare as")
    problem = tls.problem(args.declare_topology)
    if problem is not None:
        raise ValueError(f"--declare-topology: {problem}")
    return _admin_url(args.declare_topology, args.vhost), tls


def _warn_if_clear_text(management_url: str, err: TextIO) -> None:
    """Passwords cross the network in clear over ``http://`` to another host: said, since
    inside a cluster's own network it may be what the operator chose."""
    parts = urlsplit(management_url)
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        print(
            f"puller: warning: {parts.hostname} is reached over plain HTTP: the passwords set "
            "up cross the network in clear; use https:// where the network is not trusted",
            file=err,
        )


def _admin_url(url: str, vhost: str) -> _UrlMaker:
    """``url`` (no credentials, no vhost) as a maker of the admin's URL on ``vhost``."""
    parts = urlsplit(url)
    if parts.scheme not in {"amqp", "amqps"} or not parts.hostname:
        raise ValueError(f"--declare-topology takes amqp(s)://HOST[:PORT], not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("--declare-topology takes no credentials: it uses the admin user's")
    if parts.path not in {"", "/"}:
        raise ValueError("--declare-topology takes no vhost: it uses --vhost")
    host = parts.netloc

    def make(user: str, password: str) -> str:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
        path = f"/{quote(vhost, safe='')}"
        return urlunsplit((parts.scheme, f"{credentials}@{host}", path, parts.query, ""))

    return make


def _read_password(path: Path) -> str:
    try:
        password = path.read_text().rstrip("\r\n")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    if not password:
        raise ValueError(f"{path} is empty: it should hold a password")
    return password


def _password_file(directory: Path, name: str, err: TextIO) -> tuple[str, bool]:
    """The password in ``directory/name`` and whether the file was there; a new one is made,
    random, and written only for its owner to read."""
    if not name or name in {".", ".."} or "/" in name or "\0" in name:
        raise ValueError(f"user name {name!r} cannot name a password file")
    path = directory / name
    if path.exists():
        if path.stat().st_mode & 0o077:
            print(f"puller: warning: {path} can be read by others than its owner", file=err)
        return _read_password(path), True
    password = secrets.token_urlsafe(32)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(password + "\n")
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror}") from None
    return password, False


def _worker_spec(text: str) -> tuple[str, str | None]:
    name, colon, node = text.partition(":")
    if not name or (colon and not node):
        raise argparse.ArgumentTypeError("NAME or NAME:NODE, both non-empty")
    return name, node if colon else None


def _catch_up_text(info: NodeInfo) -> str:
    if info.caught_up is None:
        return "catch-up unknown"
    state = "caught up" if info.caught_up else f"catching up ({info.replay_pending} pending)"
    if info.replay_failed:
        state += f", {info.replay_failed} replayed pulls failed"
    if info.history_gap is HistoryGap.UNRECOVERED:
        lost = f"{info.history_lost:,}" if info.history_lost else "an unknown number of"
        state += f"; LOST {lost} history entries while away, not recovered"
    elif info.history_gap is not HistoryGap.NONE:
        how = {HistoryGap.RECOVERED: "recovered from", HistoryGap.RECONCILING: "reconciling with"}
        state += f"; lost {info.history_lost:,} history entries while away, "
        state += f"{how.get(info.history_gap, info.history_gap.value)} the desired state"
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


def _limit(text: str) -> int:
    value = int(text)
    if value < -1:
        raise argparse.ArgumentTypeError("must be -1 (no limit) or more")
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
