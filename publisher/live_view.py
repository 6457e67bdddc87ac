"""What ``puller pull`` shows while nodes pull: a table redrawn in place on a terminal,
plain progress lines anywhere else."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

from contract import NodeProgress, NodeResult

BAR_WIDTH = 24
REDRAW_INTERVAL = 0.1
PLAIN_LINE_INTERVAL = 2.0


@dataclass
class _Row:
    node: str
    status: str = "waiting"
    done: int = 0
    total: int = 0
    seconds: float | None = None


class LiveView:
    """Receives progress and results; renders them as a live table or as plain lines."""

    def __init__(self, out: TextIO, nodes: list[str], live: bool) -> None:
        self._out = out
        self._live = live
        self._rows: dict[str, _Row] = {node: _Row(node) for node in nodes}
        self._started = time.monotonic()
        self._drawn_lines = 0
        self._last_draw = 0.0
        self._last_plain: dict[str, float] = {}
        if live:
            self._draw(force=True)

    def progress(self, message: NodeProgress) -> None:
        if message.total <= 0:
            return  # nothing to show until the engine knows the size
        row = self._row(message.node)
        row.status, row.done, row.total = "pulling", message.done, message.total
        if self._live:
            self._draw()
        elif time.monotonic() - self._last_plain.get(message.node, 0.0) >= PLAIN_LINE_INTERVAL:
            self._last_plain[message.node] = time.monotonic()
            print(
                f"progress {message.node} {_size(message.done, message.total)}",
                file=self._out,
                flush=True,
            )

    def result(self, result: NodeResult) -> None:
        row = self._row(result.node)
        row.status, row.seconds = result.status.value, result.seconds
        if row.total:
            row.done = row.total
        if self._live:
            self._draw()

    def close(self) -> None:
        """Leaves the final table on screen (a terminal); prints nothing more otherwise."""
        if self._live:
            self._draw(force=True)

    def _row(self, node: str) -> _Row:
        return self._rows.setdefault(node, _Row(node))

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._last_draw = now
        width = max([len(node) for node in self._rows] + [4])
        lines = [self._line(row, width, now) for _, row in sorted(self._rows.items())]
        if self._drawn_lines:
            self._out.write(f"\x1b[{self._drawn_lines}F")  # back to the table's first line
        for line in lines:
            self._out.write(f"\x1b[2K{line}\n")
        self._drawn_lines = len(lines)
        self._out.flush()

    def _line(self, row: _Row, width: int, now: float) -> str:
        fraction = row.done / row.total if row.total else 0.0
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        seconds = row.seconds if row.seconds is not None else now - self._started
        size = _size(row.done, row.total) if row.total else ""
        return f"  {row.node:<{width}}  [{bar}] {row.status:<8} {seconds:7.1f}s  {size}"


def _size(done: int, total: int) -> str:
    """``done/total`` in the unit that suits ``total``: ``3.1/12.0 MB``, ``12/40 kB``."""
    if total >= 1_000_000:
        return f"{done / 1_000_000:.1f}/{total / 1_000_000:.1f} MB"
    if total >= 1_000:
        return f"{done / 1_000:.0f}/{total / 1_000:.0f} kB"
    return f"{done}/{total} B"
