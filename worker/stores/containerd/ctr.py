"""Running ``ctr`` against containerd's socket, and what its failures mean; how a login
reaches it (a user name on its command line, the password through a terminal)."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import pty
import signal
import subprocess
import termios
from typing import IO

from contract import ErrorKind, ImageReference, PullFailed
from worker.stores.failures import classified
from worker.stores.registry_logins import BasicLogin, RegistryLogin

QUERY_TIMEOUT = 30.0
"""Seconds a ``ctr`` query (not a pull) may take."""
CONNECT_TIMEOUT = "5s"
"""How long ``ctr`` tries to reach containerd's socket."""
NO_MESSAGE = "ctr exited with no message"
PASSWORD_LIMIT = 4000
"""The longest password a terminal line carries to ``ctr`` (a Linux terminal's line holds
4,095 characters)."""
ADVICE = {
    ErrorKind.ENGINE_UNAVAILABLE: (
        "containerd was stopping; the pull is retried (PULLER_PULL_RETRIES)"
    ),
    ErrorKind.NO_SPACE: (
        "free disk space on the node (the kubelet's image garbage collection, or "
        "`crictl rmi --prune`)"
    ),
}
"""What to do, where it differs from the Docker Engine's advice."""
UNREACHABLE = ("failed to dial", "dial unix", "code = unavailable", "failed to send write")
"""What ``ctr`` says when containerd's socket does not answer, or containerd went away
mid-call (``failed to send write``: the content store's stream, while a layer is copied);
a registry that does not answer is ``dial tcp``."""


class Ctr:
    """``ctr`` (the program ``program``) reaching containerd at ``address``, in ``namespace``."""

    def __init__(self, program: str, address: str, namespace: str) -> None:
        self.address = address
        self.base = [
            program,
            "--address",
            address,
            "--connect-timeout",
            CONNECT_TIMEOUT,
            "--namespace",
            namespace,
        ]

    def query(self, *arguments: str, timeout: float = QUERY_TIMEOUT) -> str:
        """``ctr``'s output for a question; raises :class:`PullFailed` when containerd cannot
        be asked."""
        try:
            done = subprocess.run(
                [*self.base, *arguments], capture_output=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise unavailable(self.address, error) from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()
            if any(text in said.lower() for text in UNREACHABLE):
                raise unavailable(self.address, said)
            what = f"`ctr {' '.join(arguments)}` failed: {said}"
            raise PullFailed(ErrorKind.ENGINE_ERROR, f"{what}; see containerd's log")
        return done.stdout.decode(errors="replace")


def plain_http(domain: str | None) -> bool:
    """Registries the Docker Engine pulls from over plain HTTP with no configuration:
    ``localhost`` and loopback addresses, any port."""
    if not domain:
        return False
    host = domain[1:].split("]", 1)[0] if domain.startswith("[") else domain.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def last_words(stderr: str) -> str:
    """``ctr``'s own error (its last ``ctr: ...`` line), else the last line it wrote."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ctr: "):
            return line[len("ctr: ") :]
    return lines[-1] if lines else NO_MESSAGE


def collect(stream: IO[bytes], into: list[bytes]) -> None:
    for chunk in stream:
        into.append(chunk)
        if len(into) > 200:  # ctr's info lines, retried hosts: the end is what matters
            del into[:100]


def kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)


def ctr_failure(
    said: str, image: ImageReference, address: str, login: RegistryLogin | None = None
) -> PullFailed:
    """What ``ctr``'s last words mean. Between ``ctr`` and containerd everything is gRPC
    (``code = Unavailable`` when containerd goes away); between ``ctr`` and the
    registry, HTTP. ``login``: what the pull gave ``ctr`` to log in with."""
    lowered = said.lower()
    if any(text in lowered for text in UNREACHABLE):
        return unavailable(address, said)
    failure = classified(said, image, login, engine="containerd", advice=ADVICE, basic_only=True)
    if failure.kind is ErrorKind.NOT_FOUND and "failed to resolve reference" not in lowered:
        # containerd's own "not found" (a snapshot, a blob): not the image's absence
        return PullFailed(
            ErrorKind.ENGINE_ERROR,
            f"pulling {image} failed: {said}; see the node's containerd log",
        )
    return failure


def unavailable(address: str, error: object) -> PullFailed:
    return PullFailed(
        ErrorKind.ENGINE_UNAVAILABLE,
        f"cannot reach containerd at {address} with ctr ({error}). Check that "
        "containerd runs on this node, that its socket is mounted into the worker "
        "(CONTAINERD_ADDRESS), and that ctr is installed",
    )


def ctr_login(login: RegistryLogin) -> RegistryLogin:
    """``login`` as ``ctr`` can use it: no user name and password (``basic``), with the
    reason in ``problem``, when ``ctr`` would misread them (it cuts ``--user`` at the first
    colon; a terminal line ends at a line break, and holds 4,095 characters)."""
    if login.basic is None:
        return dataclasses.replace(login, problem=login.basic_problem)
    user, password = login.basic.user, login.basic.password
    problem = None
    if ":" in user:
        problem = f"the user name for {login.registry} has a colon, which ctr cannot send"
    elif any(_is_control(c) for c in user):
        problem = f"the user name for {login.registry} has a control character"
    elif any(_is_control(c) for c in password):
        # A terminal edits a line as it is typed (^U erases it, DEL a character, ^D ends
        # it): ctr would read another password than the one given.
        problem = (
            f"the password for {login.registry} has a control character (a line break, "
            "a tab, DEL), which a terminal line cannot carry to ctr as it is"
        )
    elif not _utf8(user) or not _utf8(password):
        problem = f"the login for {login.registry} is not valid text (UTF-8)"
    elif len(password.encode()) > PASSWORD_LIMIT:
        problem = (
            f"the password for {login.registry} is longer than {PASSWORD_LIMIT} bytes, "
            "more than ctr can read"
        )
    if problem is None:
        return login
    return dataclasses.replace(login, header=None, basic=None, problem=problem)


class PasswordTerminal:
    """A pseudo-terminal with ``login``'s password typed into it, for ``ctr``'s standard
    input (``login`` has passed :func:`ctr_login`).

    ``ctr images pull --user USER`` reads the password from a terminal before it starts
    (it prints ``Password:`` first). Echo is off from the start, so the password never
    comes back out of the terminal; it is in the terminal's buffer, which the worker and
    that ``ctr`` alone hold, never on a command line or in an environment."""

    def __init__(self, login: BasicLogin) -> None:
        self._writer, self.reader = pty.openpty()
        try:
            modes = termios.tcgetattr(self.reader)
            modes[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(self.reader, termios.TCSANOW, modes)
            os.write(self._writer, login.password.encode() + b"\n")
        except BaseException:
            self.close()
            raise

    def handed_over(self) -> None:
        """``ctr`` has its own copy of the reading end: the worker's is closed."""
        _close_fd(self.reader)
        self.reader = -1

    def close(self) -> None:
        _close_fd(self.reader)
        _close_fd(self._writer)
        self.reader = self._writer = -1


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_control(character: str) -> bool:
    return ord(character) < 0x20 or ord(character) == 0x7F


def _close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
