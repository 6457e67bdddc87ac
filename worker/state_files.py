"""Writing the worker's state files (``PULLER_STATE_DIR``) so that a reader, or the next
worker after a crash or a power cut, finds either the old content or the new, never a
part of either.

The content goes to a new file of its own (``O_EXCL``, mode 0600: two writers never share
one and a planted symlink is not followed), is flushed to the disk, renamed over the old
file, and the directory is flushed too, so that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_whole(path: Path, content: str) -> None:
    """Replaces ``path``'s content with ``content`` (UTF-8) all at once; raises
    :class:`OSError` (the old content is then untouched, and no partial file is left)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
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
