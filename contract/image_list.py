"""Files of image references, one a line: ``puller warm FILE``, ``puller prune --keep FILE``
and the worker's ``PULLER_PRUNE_KEEP_FILE``.

``#`` starts a comment (a reference never holds one); blank lines are skipped. A line that
is not an image reference is an error naming the file and the line. A UTF-8 byte-order mark
at the start (which some Windows editors write) is not part of the first line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from contract.errors import InvalidReference
from contract.reference import ImageReference, parse_reference

BYTE_ORDER_MARK = "\ufeff"


def entries(text: str) -> Iterator[tuple[int, str]]:
    """Each line's entry, with its line number (from 1): comments and blank lines left out."""
    text = text.removeprefix(BYTE_ORDER_MARK)
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.partition("#")[0].strip()
        if entry:
            yield number, entry


def parse_image_list(text: str, source: str) -> tuple[ImageReference, ...]:
    """The references in ``text``, normalised, in order, without repeats."""
    images: dict[ImageReference, None] = {}
    for number, entry in entries(text):
        try:
            images[parse_reference(entry)] = None
        except InvalidReference as error:
            raise InvalidReference(f"{source}, line {number}: {error}") from None
    return tuple(images)


def file_text(path: Path) -> str:
    """The text of the list file ``path``; :class:`InvalidReference` saying why it cannot be
    read."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark, if any, dropped
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise InvalidReference(f"{path} cannot be read: {reason}") from None


def read_image_list(path: Path) -> tuple[ImageReference, ...]:
    """The references in the file ``path``; :class:`InvalidReference` for a bad line or a
    file that cannot be read."""
    return parse_image_list(file_text(path), str(path))
