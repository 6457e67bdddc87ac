"""A memory limit for one process, as a pod's ``resources.limits.memory`` sets it: a cgroup v1
memory group (``/sys/fs/cgroup/memory/NAME``) that the process enters before it starts.
Past the limit the kernel reclaims the group's page cache, then kills a process in it.

Needs root and the cgroup v1 memory controller (this machine has both). Remove the group
(:meth:`MemoryGroup.remove`) once its processes have exited.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


class MemoryGroup:
    """A memory group of ``limit_bytes`` (swap included, as a container's)."""

    def __init__(self, limit_bytes: int, name: str | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.path = MEMORY_ROOT / (name or f"puller-test-{uuid.uuid4().hex[:8]}")

    def create(self) -> MemoryGroup:
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        swap = self.path / "memory.memsw.limit_in_bytes"
        if swap.exists():  # no swap beyond the limit either
            swap.write_text(str(self.limit_bytes))
        return self

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the group (a shell enters it, then becomes ``argv``: same pid)."""
        enter = f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"'
        return ["sh", "-c", enter, "sh", *argv]

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    @property
    def peak_bytes(self) -> int:
        """The group's highest charge so far (anonymous memory and page cache)."""
        return int(self._read("memory.max_usage_in_bytes"))

    @property
    def anonymous_bytes(self) -> int:
        """The group's anonymous memory now (``rss`` in ``memory.stat``): its charge less the
        page cache (which the kernel reclaims before it kills; a worker's log file, written
        here rather than through a container runtime's pipe, is page cache)."""
        for line in self._read("memory.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "rss":
                return int(value)
        return 0

    @property
    def oom_kills(self) -> int:
        """Processes the kernel killed in this group for memory."""
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Removes the group (its processes must have exited)."""
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.path)


def resident_bytes(pid: int) -> tuple[int, int]:
    """A process's resident set now and at its peak (``VmRSS``, ``VmHWM``), in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]
