"""Writing and reading the worker's state files (``PULLER_STATE_DIR``).

Writing: a reader, or the next worker after a crash or a power cut, finds either the old
content or the new, never a part of either. The content goes to a new file of its own
(``O_EXCL``, mode 0600: two writers never share one and a planted symlink is not followed),
is flushed to the disk, renamed over the old file, and the directory is flushed too, so
that the rename itself survives a power cut.

Reading: JSON, where ``Infinity``, ``NaN`` and numbers too large for a float (which
Python's parser accepts) are read as :class:`NotFinite`, so that a reader rejects the entry
holding one, says so, and keeps the rest of the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


class NotFinite:
    """A number in a state file that is no finite number (``Infinity``, ``NaN``, ``1e999``),
    as the file spells it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def parse_state(text: str) -> Any:
    """``text`` as JSON, non-finite numbers read as :class:`NotFinite`; raises ``ValueError``
    for text that is no JSON."""
    return json.loads(text, parse_constant=NotFinite, parse_float=_finite_float)


def is_finite_number(value: object) -> bool:
    """A JSON number (not a boolean) that is finite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite_float(text: str) -> float | NotFinite:
    value = float(text)
    return value if math.isfinite(value) else NotFinite(text)


def write_whole(path: Path, content: str, durable: bool = True) -> None:
    """Replaces ``path``'s content with ``content`` (UTF-8) all at once; raises
    :class:`OSError` (the old content is then untouched, and no partial file is left).
    ``durable=False``: not flushed to the disk, for a file written often whose loss in a
    power cut costs little (the rename still makes it whole to any reader, and to the next
    worker after this process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(content)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    if durable:
        _flush_directory(path.parent)


def _flush_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable. A file system that cannot flush a directory
    (some network ones) is left as it is: the rename is still atomic there."""
    try:
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(handle)
    finally:
        os.close(handle)
