"""The roles' RabbitMQ permissions, and ``setup``/``puller broker-setup`` against a fake
management API (the real broker: tests/integration/test_broker_users.py)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract import topology as topo
from contract.fields import MAX_NODE_NAME_LENGTH
from publisher import cli
from publisher.broker_setup import (
    Bounds,
    BrokerSetupError,
    BrokerUser,
    Permissions,
    Role,
    bound_vhost,
    definitions,
    operator_policies,
    permissions,
    setup,
    vhost_limits,
)

REFUSED_URL = "http://127.0.0.1:9"
"""Nothing listens on port 9: connections are refused at once."""


def may(pattern: str, name: str) -> bool:
    """RabbitMQ's check: the pattern *searched* in the resource's name (Erlang's ``re:run``)."""
    return re.search(pattern, name) is not None


# -- the patterns ------------------------------------------------------------------------------


def test_the_patterns_of_each_role() -> None:
    assert permissions(Role.ADMIN) == Permissions(r"^puller\..*$", r"^puller\..*$", r"^puller\..*$")
    assert permissions("worker", "node-1") == Permissions(
        configure=r"^puller\.node\.node\-1$",
        write=(
            r"^(?:puller\.node\.node\-1|puller\.replies|puller\.presence|puller\.history"
            r"|puller\.desired|puller\.keeper)$"
        ),
        read=(
            r"^(?:puller\.node\.node\-1|puller\.pulls|puller\.history\.stream"
            r"|puller\.desired\.stream|puller\.keeper\.token)$"
        ),
    )
    assert permissions(Role.WORKER) == Permissions(
        configure=r"^puller\.node\..+$",
        write=(
            r"^(?:puller\.node\..+|puller\.replies|puller\.presence|puller\.history"
            r"|puller\.desired|puller\.keeper)$"
        ),
        read=(
            r"^(?:puller\.node\..+|puller\.pulls|puller\.history\.stream"
            r"|puller\.desired\.stream|puller\.keeper\.token)$"
        ),
    )
    assert permissions(Role.PUBLISHER) == Permissions(
        configure=r"^puller\.reply\..+$",
        write=r"^(?:puller\.pulls|puller\.history|puller\.presence|puller\.reply\..+)$",
        read=r"^(?:puller\.reply\..+|puller\.replies|puller\.presence\.stream)$",
    )


@dataclass(frozen=True)
class Can:
    """What one AMQP operation needs, from RabbitMQ's access-control table."""

    configure: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    def allowed(self, granted: Permissions) -> bool:
        return (
            all(may(granted.configure, name) for name in self.configure)
            and all(may(granted.write, name) for name in self.write)
            and all(may(granted.read, name) for name in self.read)
        )


def declare(name: str) -> Can:
    return Can(configure=(name,))


def bind(queue: str, exchange: str) -> Can:
    return Can(write=(queue,), read=(exchange,))


def publish(exchange: str) -> Can:
    return Can(write=(exchange,))


def consume(queue: str) -> Can:
    return Can(read=(queue,))


NODE = topo.node_queue_name("node-1")
OTHER_NODE = topo.node_queue_name("node-2")
REPLY = f"{topo.REPLY_QUEUE_PREFIX}0123456789abcdef0123456789abcdef"
HISTORY = topo.HISTORY_STREAM_NAME
PRESENCE = topo.PRESENCE_STREAM.name
SHARED = [item.name for item in topo.shared_declarations() if not isinstance(item, topo.Binding)]

WORKER_DOES = [
    declare(NODE),
    bind(NODE, topo.PULLS.name),
    consume(NODE),
    publish(topo.REPLIES.name),
    publish(topo.PRESENCE.name),
    publish(topo.HISTORY.name),
    consume(HISTORY),
    publish(topo.DESIRED.name),  # the keeper's snapshot
    consume(topo.DESIRED_STREAM.name),
    publish(topo.KEEPER.name),  # a token when none is ready
    consume(topo.KEEPER_TOKEN.name),
]
WORKER_MAY_NOT = [
    publish(topo.PULLS.name),
    publish("amq.default"),
    declare(OTHER_NODE),
    consume(OTHER_NODE),
    bind(OTHER_NODE, topo.PULLS.name),
    declare(REPLY),
    consume(REPLY),
    consume(PRESENCE),
    *(declare(name) for name in SHARED),
    # (un)binding the streams, which would cut every node off the history or the roster
    bind(HISTORY, topo.HISTORY.name),
    bind(PRESENCE, topo.PRESENCE.name),
    bind(HISTORY, topo.PULLS.name),
    bind(topo.DESIRED_STREAM.name, topo.DESIRED.name),
    bind(topo.KEEPER_TOKEN.name, topo.KEEPER.name),
]
PUBLISHER_DOES = [
    declare(REPLY),
    bind(REPLY, topo.REPLIES.name),
    consume(REPLY),
    publish(topo.PULLS.name),
    publish(topo.HISTORY.name),
    publish(topo.PRESENCE.name),  # the roster's marker
    consume(PRESENCE),
]
PUBLISHER_MAY_NOT = [
    publish(topo.REPLIES.name),
    publish("amq.default"),
    declare(NODE),
    consume(NODE),
    bind(NODE, topo.PULLS.name),
    consume(HISTORY),
    declare("amq.gen-abc"),  # a server-named queue
    *(declare(name) for name in SHARED),
    bind(HISTORY, topo.HISTORY.name),
    bind(PRESENCE, topo.PRESENCE.name),
    publish(topo.DESIRED.name),
    consume(topo.DESIRED_STREAM.name),
    consume(topo.KEEPER_TOKEN.name),
]


@pytest.mark.parametrize("operation", WORKER_DOES)
def test_a_worker_may_do_its_job(operation: Can) -> None:
    assert operation.allowed(permissions(Role.WORKER, "node-1"))
    assert operation.allowed(permissions(Role.WORKER))


@pytest.mark.parametrize("operation", WORKER_MAY_NOT)
def test_a_worker_may_not(operation: Can) -> None:
    assert not operation.allowed(permissions(Role.WORKER, "node-1"))


@pytest.mark.parametrize("operation", PUBLISHER_DOES)
def test_a_publisher_may_do_its_job(operation: Can) -> None:
    assert operation.allowed(permissions(Role.PUBLISHER))


@pytest.mark.parametrize("operation", PUBLISHER_MAY_NOT)
def test_a_publisher_may_not(operation: Can) -> None:
    assert not operation.allowed(permissions(Role.PUBLISHER))


def test_the_admin_has_every_puller_name_and_nothing_else() -> None:
    granted = permissions(Role.ADMIN)
    for operation in [*WORKER_DOES, *PUBLISHER_DOES, *(declare(name) for name in SHARED)]:
        if operation != publish("amq.default"):
            assert operation.allowed(granted)
    for name in ("amq.default", "amq.gen-abc", "other", "xpuller.pulls", "puller"):
        assert not may(granted.configure, name)


@pytest.mark.parametrize("node", ["a.b", "n+1", "(.*)", "a|puller.pulls", "x$", "[ab]", "n 1\\"])
def test_a_node_name_is_matched_literally(node: str) -> None:
    granted = permissions(Role.WORKER, node)
    own = topo.node_queue_name(node)
    assert may(granted.configure, own)
    assert may(granted.read, own)
    assert not may(granted.configure, topo.node_queue_name("other"))
    assert not may(granted.read, topo.node_queue_name(node.replace(".", "X")) + "x")
    assert not may(granted.write, topo.PULLS.name)


@given(
    node=st.text(min_size=1, max_size=MAX_NODE_NAME_LENGTH).filter(str.isprintable),
    other=st.text(min_size=1, max_size=MAX_NODE_NAME_LENGTH).filter(str.isprintable),
)
def test_a_worker_for_one_node_has_that_node_queue_only(node: str, other: str) -> None:
    granted = permissions(Role.WORKER, node)
    own = topo.node_queue_name(node)
    assert may(granted.configure, own)
    assert may(granted.write, own)
    assert may(granted.read, own)
    if other != node:
        assert not may(granted.configure, topo.node_queue_name(other))
        assert not may(granted.read, topo.node_queue_name(other))
    for near in (own + other, other + own, own[:-1]):
        assert not may(granted.configure, near)


def test_a_node_goes_with_a_worker_only() -> None:
    with pytest.raises(ValueError, match="only a worker"):
        permissions(Role.PUBLISHER, "node-1")
    with pytest.raises(ValueError, match="not empty"):
        permissions(Role.WORKER, "")
    with pytest.raises(ValueError):
        permissions("root")


def test_the_definitions_hold_the_vhost_and_the_permissions() -> None:
    users = [BrokerUser(Role.WORKER, "w", "", "n"), BrokerUser(Role.PUBLISHER, "p", "")]
    found = definitions("puller", users)
    assert found["vhosts"] == [{"name": "puller"}]
    assert found["permissions"] == [
        {"user": "w", "vhost": "puller", **permissions(Role.WORKER, "n")._asdict()},
        {"user": "p", "vhost": "puller", **permissions(Role.PUBLISHER)._asdict()},
    ]


def test_a_user_repr_has_no_password() -> None:
    assert "s3cret" not in repr(BrokerUser(Role.ADMIN, "a", "s3cret"))


# -- setup, against a fake management API ------------------------------------------------------


@dataclass
class FakeManagement:
    """Answers every PUT with ``status`` (and ``reason``), and keeps what it was sent."""

    url: str = ""
    status: int = 201
    reason: str = ""
    requests: list[tuple[str, str, dict[str, Any], str]] = field(default_factory=list)
    """Method, raw path, JSON body, Authorization header (the PUTs)."""
    users: dict[str, dict[str, str]] = field(default_factory=dict)
    """What a GET of ``/api/users/NAME`` finds (404 for the others)."""


@pytest.fixture
def management() -> Iterator[FakeManagement]:
    fake = FakeManagement()

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            fake.requests.append(("PUT", self.path, body, self.headers["Authorization"]))
            answer = json.dumps({"error": "x", "reason": fake.reason}).encode()
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer) if fake.status >= 400 else 0))
            self.end_headers()
            if fake.status >= 400:
                self.wfile.write(answer)

        def do_GET(self) -> None:
            name = unquote(self.path.removeprefix("/api/users/"))
            found = fake.users.get(name)
            status = fake.status if fake.status >= 400 else (200 if found else 404)
            answer = json.dumps(found or {"error": "x", "reason": fake.reason}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def test_setup_creates_the_vhost_the_users_and_their_permissions(
    management: FakeManagement,
) -> None:
    users = [
        BrokerUser(Role.WORKER, "node/1", "pw-w", "n1"),
        ("publisher", "sessions", "pw-p", None),
    ]
    setup(management.url, "/", users, credentials=("ops", "ops-pw"))
    paths = [(path, body) for _method, path, body, _auth in management.requests]
    assert paths == [
        ("/api/vhosts/%2F", {}),
        ("/api/users/node%2F1", {"password": "pw-w", "tags": ""}),
        ("/api/permissions/%2F/node%2F1", permissions(Role.WORKER, "n1")._asdict()),
        ("/api/users/sessions", {"password": "pw-p", "tags": ""}),
        ("/api/permissions/%2F/sessions", permissions(Role.PUBLISHER)._asdict()),
    ]
    assert {auth for *_rest, auth in management.requests} == {"Basic b3BzOm9wcy1wdw=="}


def test_a_wrong_login_is_one_line_without_the_password(management: FakeManagement) -> None:
    management.status = 401
    with pytest.raises(BrokerSetupError) as raised:
        setup(management.url, "v", [], credentials=("ops", "ops-pw"))
    message = str(raised.value)
    assert message == (
        f"RabbitMQ's management API at {management.url} refused user 'ops': "
        "wrong user name or password (401)"
    )


def test_a_user_without_the_administrator_tag_is_told_so(management: FakeManagement) -> None:
    management.status = 403
    with pytest.raises(BrokerSetupError, match=r"administrator tag"):
        setup(management.url, "v", [], credentials=("ops", "ops-pw"))


def test_what_the_broker_echoes_loses_the_passwords(management: FakeManagement) -> None:
    management.status = 400
    management.reason = "bad password pw-secret-1 for\nops-pw"
    with pytest.raises(BrokerSetupError) as raised:
        setup(
            management.url,
            "v",
            [BrokerUser(Role.ADMIN, "a", "pw-secret-1")],
            credentials=("ops", "ops-pw"),
        )
    message = str(raised.value)
    assert "pw-secret-1" not in message
    assert "ops-pw" not in message
    assert "400" in message
    assert "\n" not in message


def test_an_unreachable_api_is_one_line_without_the_password() -> None:
    with pytest.raises(BrokerSetupError) as raised:
        setup(REFUSED_URL, "v", [BrokerUser(Role.ADMIN, "a", "pw-a")], credentials=("u", "pw-u"))
    message = str(raised.value)
    assert message.startswith(f"cannot reach RabbitMQ's management API at {REFUSED_URL}:")
    assert "ConnectionRefusedError" in message
    assert "pw-" not in message


@pytest.mark.parametrize(
    ("url", "users", "problem"),
    [
        ("http://ops:pw@127.0.0.1:9", [], "credentials apart"),
        ("ftp://127.0.0.1", [], "http"),
        (REFUSED_URL, [("admin", "a", "x", None), ("worker", "a", "y", None)], "twice"),
        (REFUSED_URL, [("publisher", "p", "x", "node-1")], "only a worker"),
        (REFUSED_URL, [("root", "r", "x", None)], "root"),
        (REFUSED_URL, [("admin", "", "x", None)], "not empty"),
    ],
)
def test_mistakes_are_refused_before_anything_is_sent(
    url: str, users: list[tuple[str, str, str, str | None]], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        setup(url, "v", users, credentials=("ops", "pw"))


# -- the command -------------------------------------------------------------------------------


def test_the_command_prints_definitions_without_a_broker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["broker-setup", "--print-definitions", "--vhost=v", "--publisher=p", "--worker=w:n1"]
    assert cli.main(argv) == cli.EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed == definitions(
        "v", [BrokerUser(Role.PUBLISHER, "p", ""), BrokerUser(Role.WORKER, "w", "", "n1")]
    )


def setup_argv(management: FakeManagement, tmp_path: Path, *users: str) -> list[str]:
    secret = tmp_path / "ops-password"
    secret.write_text("ops-pw\n")
    return [
        "broker-setup",
        f"--management-url={management.url}",
        "--management-user=ops",
        f"--management-password-file={secret}",
        "--vhost=v",
        f"--passwords-dir={tmp_path / 'passwords'}",
        *users,
    ]


def test_the_command_writes_new_passwords_for_their_owner_only_and_keeps_them(
    management: FakeManagement, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = setup_argv(management, tmp_path, "--admin=ops-admin", "--worker=w1:node-1")
    assert cli.main(argv) == cli.EXIT_OK
    first = capsys.readouterr().out
    files = {path.name: path for path in (tmp_path / "passwords").iterdir()}
    assert sorted(files) == ["ops-admin", "w1"]
    passwords = {name: path.read_text().strip() for name, path in files.items()}
    assert all(len(password) >= 32 for password in passwords.values())
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in files.values())
    assert (tmp_path / "passwords").stat().st_mode & 0o777 == 0o700
    assert "(new)" in first

    assert cli.main(argv) == cli.EXIT_OK
    second = capsys.readouterr().out
    assert {name: path.read_text().strip() for name, path in files.items()} == passwords
    assert "(kept)" in second
    assert "(new)" not in second
    sent = [body["password"] for _m, path, body, _a in management.requests if "/users/" in path]
    assert sent == [passwords["ops-admin"], passwords["w1"]] * 2
    for output in (first, second):
        assert not any(password in output for password in passwords.values())
        assert "ops-pw" not in output


def test_the_command_refuses_a_wrong_login_with_exit_3(
    management: FakeManagement, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    management.status = 401
    assert cli.main(setup_argv(management, tmp_path, "--publisher=p")) == cli.EXIT_BROKER
    err = capsys.readouterr().err
    assert "401" in err
    assert "ops-pw" not in err


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ([], "name at least one user"),
        (["--admin=a", "--declare-topology=amqp://u:p@host"], "no credentials"),
        (["--admin=a", "--declare-topology=amqp://host/v"], "no vhost"),
        (["--publisher=p", "--declare-topology=amqp://host"], "exactly one --admin"),
        (["--admin=../a"], "password file"),
        (["--admin=a", "--publisher=a"], "named twice"),
    ],
)
def test_command_mistakes_exit_2(
    management: FakeManagement,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    problem: str,
) -> None:
    assert cli.main(setup_argv(management, tmp_path, *extra)) == cli.EXIT_USAGE
    assert problem in capsys.readouterr().err
    assert management.requests == []
    assert not (tmp_path / "passwords").exists()


def test_the_command_needs_the_management_api(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["broker-setup", "--vhost=v", "--admin=a"]) == cli.EXIT_USAGE
    assert "--management-url" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["w:", ":n", ""])
def test_a_bad_worker_spec_is_a_usage_error(spec: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["broker-setup", "--vhost=v", f"--worker={spec}"])
    assert exit_info.value.code == 2


def test_a_user_with_tags_is_never_changed(management: FakeManagement) -> None:
    management.users["ops-too"] = {"name": "ops-too", "tags": "administrator"}
    with pytest.raises(BrokerSetupError, match="exists with tags 'administrator'"):
        setup(
            management.url,
            "v",
            [("publisher", "sessions", "pw", None), ("admin", "ops-too", "pw2", None)],
            credentials=("ops", "ops-pw"),
        )
    assert management.requests == []  # nothing was changed, not even the first user


def test_the_management_user_is_never_made_a_puller_user(management: FakeManagement) -> None:
    with pytest.raises(ValueError, match="management user"):
        setup(management.url, "v", [("admin", "ops", "pw", None)], credentials=("ops", "x"))
    assert management.requests == []


def test_the_bounds_are_operator_policies_and_vhost_limits(management: FakeManagement) -> None:
    bounds = Bounds(queue_expires=2.5, queue_max_length=7, presence_max_bytes=1000)
    bound_vhost(management.url, "v/1", bounds, credentials=("ops", "ops-pw"))
    sent = {path: body for _m, path, body, _a in management.requests}
    own = sent["/api/operator-policies/v%2F1/puller-own-queues"]
    assert own["definition"] == {"expires": 2500, "max-length": 7}
    for name in ("puller.node.a", "puller.reply.b"):
        assert re.search(own["pattern"], name)
    for name in (
        "puller.pulls",
        "puller.presence.stream",
        "puller.history.stream",
        "x.puller.node.a",
    ):
        assert not re.search(own["pattern"], name)
    presence = sent["/api/operator-policies/v%2F1/puller-presence-stream"]
    assert presence["definition"] == {"max-length-bytes": 1000}
    assert re.search(presence["pattern"], "puller.presence.stream")
    assert not re.search(presence["pattern"], "puller.presence")
    assert sent["/api/vhost-limits/v%2F1/max-queues"] == {"value": 1000}
    assert sent["/api/vhost-limits/v%2F1/max-connections"] == {"value": 1000}
    assert definitions("v/1", [], bounds)["parameters"] == [
        {"vhost": "v/1", "component": "operator_policy", "name": name, "value": value}
        for name, value in operator_policies(bounds).items()
    ] + [
        {
            "vhost": "v/1",
            "component": "vhost-limits",
            "name": "limits",
            "value": vhost_limits(bounds),
        }
    ]


@pytest.mark.parametrize(
    "wrong",
    [
        {"queue_expires": 0.5},
        {"queue_max_length": 0},
        {"presence_max_bytes": 0},
        {"max_queues": -2},
        {"max_connections": -5},
    ],
)
def test_bounds_out_of_range_are_refused(wrong: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Bounds(**wrong)  # type: ignore[arg-type]


def test_the_command_puts_the_bounds_it_is_given(
    management: FakeManagement, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = setup_argv(
        management, tmp_path, "--publisher=p", "--queue-expires=30", "--max-queues=-1"
    )
    assert cli.main(argv) == cli.EXIT_OK
    sent = {path: body for _m, path, body, _a in management.requests}
    assert sent["/api/operator-policies/v/puller-own-queues"]["definition"]["expires"] == 30000
    assert sent["/api/vhost-limits/v/max-queues"] == {"value": -1}
    assert "any number of queues" in capsys.readouterr().out
