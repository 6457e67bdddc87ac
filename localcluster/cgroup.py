"""A cgroup v1 memory group: a process started inside it has a container's memory limit.

The kernel counts what the process uses as it would inside a pod with that
``resources.limits.memory``, and kills it (the OOM killer) past the limit. Needs root and
the v1 memory controller at ``/sys/fs/cgroup/memory``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
MIB = 2**20


class MemoryGroup:
    """A memory group of its own, made on ``with`` and removed after (its processes killed
    if any are left)."""

    def __init__(self, limit_bytes: int, name: str = "") -> None:
        self.limit_bytes = limit_bytes
        self.path = MEMORY_ROOT / (name or f"puller-{uuid.uuid4().hex[:8]}")

    def __enter__(self) -> MemoryGroup:
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        # No swap either, as in a container (where the kernel keeps swap accounting).
        with contextlib.suppress(OSError):
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(self.limit_bytes))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv``, started inside the group: a shell joins it, then becomes ``argv``
        (same process id), so everything the program allocates is counted."""
        procs = str(self.path / "cgroup.procs")
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def _number(self, name: str) -> int:
        return int((self.path / name).read_text())

    @property
    def usage_bytes(self) -> int:
        return self._number("memory.usage_in_bytes")

    @property
    def max_usage_bytes(self) -> int:
        return self._number("memory.max_usage_in_bytes")

    @property
    def oom_kills(self) -> int:
        """Processes the kernel killed for going over the limit."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]

    def remove(self, timeout: float = 10.0) -> None:
        if not self.path.exists():
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()  # refused while a process is still leaving it
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            else:
                return
