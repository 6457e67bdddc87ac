"""Logins for a client that sends a user name and a password itself (containerd's ``ctr``),
and the terminal that hands it the password; the Docker Engine's header is tested in
test_engine_errors.py, the whole on real parts in tests/integration/test_containerd.py."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract import ErrorKind, PullFailed, parse_reference
from localcluster.registry import docker_config
from worker.stores.containerd import ContainerdStore
from worker.stores.containerd.ctr import PASSWORD_LIMIT, PasswordTerminal, ctr_failure, ctr_login
from worker.stores.registry_logins import MAX_CONFIG_BYTES, BasicLogin, DockerConfig, RegistryLogin

REGISTRY = "registry.example:5000"
IMAGE = parse_reference(f"{REGISTRY}/team/app:1")
PASSWORD = "pa55-w0rd-never-shown"  # noqa: S105 - a made-up one, looked for in messages
REFUSED = "failed to resolve reference: pulling from host failed: 401 Unauthorized"


def test_a_config_json_login_gives_the_user_and_password(tmp_path: Path) -> None:
    docker_config(tmp_path, REGISTRY, "ci", PASSWORD)

    login = DockerConfig(tmp_path).login(REGISTRY)

    assert login.basic == BasicLogin("ci", PASSWORD)
    assert login.basic_problem is None
    assert PASSWORD not in repr(login)
    assert PASSWORD not in repr(login.basic)


def test_an_identity_token_is_a_login_ctr_cannot_send_and_the_failure_says_so(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {REGISTRY: {"identitytoken": PASSWORD}}})
    )

    login = ctr_login(DockerConfig(tmp_path).login(REGISTRY))
    failure = ctr_failure(REFUSED, IMAGE, "/run/containerd/containerd.sock", login)

    assert login.basic is None
    assert failure.kind is ErrorKind.UNAUTHORIZED
    assert f"registry {REGISTRY} needs a login" in failure.message
    assert "is an identity token, and containerd's ctr can only send a user name" in (
        failure.message
    )
    assert PASSWORD not in failure.message


@pytest.mark.parametrize(
    ("user", "password", "problem"),
    [
        ("team:ci", PASSWORD, "the user name for registry.example:5000 has a colon"),
        ("c\x00i", PASSWORD, "the user name for registry.example:5000 has a control character"),
        ("ci", f"{PASSWORD}\nsecond line", "has a control character (a line break, a tab"),
        ("ci", f"{PASSWORD}\r", "has a control character"),
        ("ci", f"a\x15{PASSWORD}", "has a control character"),  # ^U: erases the line
        ("ci", f"a\x7f{PASSWORD}", "has a control character"),  # DEL: erases a character
        ("ci", f"{PASSWORD}\x04", "has a control character"),  # ^D: ends the line
        ("ci", f"{PASSWORD}\udc80", "is not valid text (UTF-8)"),
        ("ci", "x" * (PASSWORD_LIMIT + 1), f"is longer than {PASSWORD_LIMIT} bytes"),
    ],
)
def test_a_login_ctr_would_misread_is_not_sent_and_the_failure_says_why(
    user: str, password: str, problem: str
) -> None:
    basic = BasicLogin(user, password)
    login = ctr_login(RegistryLogin(REGISTRY, "header", "/cfg/config.json", basic=basic))

    failure = ctr_failure(REFUSED, IMAGE, "/run/containerd/containerd.sock", login)

    assert login.basic is None
    assert "needs a login" in failure.message
    assert problem in failure.message
    assert password not in failure.message
    assert PASSWORD not in failure.message


def test_a_sent_login_that_is_refused_says_which_file_to_correct() -> None:
    basic = BasicLogin("ci", "pw")
    login = ctr_login(RegistryLogin(REGISTRY, "header", "/cfg/config.json", basic=basic))

    failure = ctr_failure(REFUSED, IMAGE, "/run/containerd/containerd.sock", login)

    assert login.basic == basic
    assert f"registry {REGISTRY} refused the worker's login from /cfg/config.json" in (
        failure.message
    )


def test_no_login_says_where_the_worker_looked(tmp_path: Path) -> None:
    login = ctr_login(DockerConfig(tmp_path).login(REGISTRY))

    failure = ctr_failure(REFUSED, IMAGE, "/run/containerd/containerd.sock", login)

    assert failure.kind is ErrorKind.UNAUTHORIZED
    assert f"looked in {tmp_path / 'config.json'} (DOCKER_CONFIG={tmp_path}): no such file" in (
        failure.message
    )


READER = """
import os, sys, termios
echo = bool(termios.tcgetattr(0)[3] & termios.ECHO)
print(os.isatty(0), echo, sys.stdin.readline().rstrip("\\n"))
"""
"""What ``ctr`` does when the registry asks: a line from the terminal on standard input."""


@pytest.mark.parametrize(
    "password", [PASSWORD, "ünïcødé pass", "with spaces", "x" * PASSWORD_LIMIT]
)
def test_the_password_reaches_the_reader_through_a_terminal_with_echo_off(password: str) -> None:
    terminal = PasswordTerminal(BasicLogin("ci", password))
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", READER],
            stdin=terminal.reader,
            stdout=subprocess.PIPE,
            start_new_session=True,  # as the store starts ctr: no controlling terminal
        )
        terminal.handed_over()
        out, _ = child.communicate(timeout=30)
    finally:
        terminal.close()

    assert out.decode().rstrip("\n") == f"True False {password}"
    assert password not in " ".join(child.args)  # type: ignore[arg-type]


def test_a_reader_that_never_asks_leaves_nothing_open() -> None:
    terminal = PasswordTerminal(BasicLogin("ci", PASSWORD))
    child = subprocess.run([sys.executable, "-c", "pass"], stdin=terminal.reader, check=True)
    terminal.handed_over()
    terminal.close()
    terminal.close()  # twice is harmless

    assert child.returncode == 0
    assert terminal.reader == -1


def terminals_open() -> list[str]:
    """This process's descriptors of pseudo-terminals (other threads of the test run may
    open and close other files meanwhile)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/ptmx" or target.startswith("/dev/pts/"):
            found.append(f"{fd} {target}")
    return sorted(found)


@pytest.mark.parametrize(
    ("ctr", "raised"),
    [("no-ctr-here", PullFailed), ("ctr-with-\x00-in-its-name", ValueError)],
)
def test_a_ctr_that_cannot_start_leaves_no_terminal_open(
    tmp_path: Path, ctr: str, raised: type[Exception]
) -> None:
    docker_config(tmp_path, REGISTRY, "ci", PASSWORD)
    store = ContainerdStore(
        "/nonexistent/containerd.sock",
        stall_timeout=5,
        pull_timeout=5,
        docker_config=DockerConfig(tmp_path),
        ctr=str(tmp_path / ctr),
    )
    before = terminals_open()

    with pytest.raises(raised) as failed:
        store.pull(IMAGE)

    assert terminals_open() == before
    assert PASSWORD not in str(failed.value)


def test_a_config_that_is_no_regular_file_or_too_big_is_no_login_and_never_hangs(
    tmp_path: Path,
) -> None:
    config = DockerConfig(tmp_path)
    os.mkfifo(tmp_path / "config.json")  # nobody writes: reading it would block for ever
    assert config.login(REGISTRY).problem == "it is not a regular file"

    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    assert config.login(REGISTRY).problem == "it cannot be read (IsADirectoryError)"

    (tmp_path / "config.json").rmdir()
    entry = {"auth": base64.b64encode(f"ci:{PASSWORD}".encode()).decode()}
    padding = " " * MAX_CONFIG_BYTES
    (tmp_path / "config.json").write_text(json.dumps({"auths": {REGISTRY: entry}}) + padding)
    assert config.login(REGISTRY).problem == "it is larger than 1024 KiB"

    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert config.login(REGISTRY).problem == "it is not JSON"
