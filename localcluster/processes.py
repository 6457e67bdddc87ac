"""Starting, waiting for and stopping the daemons of a local cluster."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PORTS = range(20000, 32000)
"""Below Linux's ephemeral range (32768-60999), where the machine's outgoing connections
take their local ports: a port picked there can be taken before its server binds it."""
_handed_out: set[int] = set()


def free_port() -> int:
    """A port no one listens on now, below the ephemeral range, not handed out before by
    this process. The one way the local cluster and the tests pick ports."""
    for port in random.sample(PORTS, len(PORTS)):
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS}")


class LocalService:
    """A daemon of the local cluster serving HTTP on 127.0.0.1:``port``, its files under
    ``root`` (the dataclasses that use it declare the three fields)."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def remove(self) -> None:
        """Stops it and removes ``root``."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class ServiceFailed(RuntimeError):
    """A daemon of the local cluster did not start or did not become ready."""


def start_daemon(
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Starts ``argv`` in its own session, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,
        )


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Polls ``ready`` until it returns true; raises :class:`ServiceFailed` on timeout or exit."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServiceFailed(
                f"{what} exited with status {process.returncode}{_log_tail(log_path)}"
            )
        with contextlib.suppress(Exception):
            if ready():
                return
        if time.monotonic() > deadline:
            raise ServiceFailed(f"{what} was not ready after {timeout:.0f} s{_log_tail(log_path)}")
        time.sleep(0.1)


def stop_process_group(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM to the process group led by ``pid``, then SIGKILL if it outlives ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if process.poll() is None:
        stop_process_group(process.pid, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        waited = 0  # not our child: fall through to the signal probe
    if waited == pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _log_tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log_path}:\n" + "\n".join(tail)
