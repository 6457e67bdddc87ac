"""Eviction: which images a node removes, and removing them. No docker import: the store is
a :class:`worker.stores.contract.PrunableStore`.

The rules, in order, for every image the engine lists (dangling ones included):

1. An image any container uses, running, stopped or only created, is never removed
   (``kept_in_use``). Containers are listed once for the choice and again just before each
   removal, and the engine itself refuses (a conflict, also counted here) to remove an image
   a container uses, or one other images are built on; removal is never forced.
2. An image on the keep list is never removed (``kept_listed``). It matches when one of its
   names or repository digests is a keep reference, both normalised as ``docker pull`` does
   (:func:`contract.parse_reference`): ``redis`` is ``docker.io/library/redis:latest``, so a
   bare repository keeps its ``latest`` tag only, as Docker reads it; ``NAME:TAG`` keeps that
   tag; ``NAME@DIGEST`` keeps the image with that repository digest; ``NAME:TAG@DIGEST``
   keeps by the digest (the tag is ignored, as a pull ignores it).
3. Of the rest, an image is a candidate when it has been unused at least
   ``rule.unused_for`` seconds (if set) and ``rule.min_idle`` seconds. "Last used" is the
   latest of: when this worker last answered ``pulled`` or ``present`` for it, when it was
   last tagged on the node (``LastTagTime``), and when this worker first saw it on the
   engine (see :mod:`worker.pruning.usage`). Its build time (``Created``) is no use date (a pull
   keeps the build time, however old), so it only breaks ties. The newest container made
   from an image would be a use date too, but an image with any container is never a
   candidate, so it never counts.
4. Candidates go oldest-unused first (then oldest built, then largest), until the rule's
   byte budget (``rule.bytes_to_free``) or the caller's stop condition is met.
5. A candidate asked for since the pass listed the images (answered ``present`` or
   ``pulled``, or being pulled) stays (``kept_asked``): each removal begins through a
   :class:`Removals` gate the pull service shares (:mod:`worker.pulls.image_guard`).

Bytes freed are the removed images' sizes as the engine reports them (``docker images``
SIZE): an upper bound when a removed image shares layers with one that stays. The
automatic mode (:mod:`worker.pruning.disk_watch`) therefore stops by reading the disk again
after each removal, not by sizes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

import structlog

from contract import ErrorKind, ImageReference, InvalidReference, PullFailed, parse_reference
from contract.image_list import entries, file_text
from worker.pulls.image_guard import carries
from worker.stores.contract import DiskUsage, ImageInUse, PrunableStore, StoredImage

__all__ = [
    "DiskUsage",
    "ImageInUse",
    "KeepListError",
    "PruneOutcome",
    "PruneRule",
    "Pruner",
    "Removal",
    "Removals",
    "StoredImage",
    "choose",
    "is_kept",
    "last_used",
    "parse_keep_list",
    "prune",
    "read_keep_file",
]

log = structlog.get_logger("worker.pruning")

DEFAULT_MIN_IDLE = 3600.0
"""Seconds the automatic mode leaves an image alone after its last use: an image just
pulled for a session that is about to start is not taken."""


class KeepListError(ValueError):
    """A keep list with a line that is no image reference; the message names the file (or
    source) and the line number."""


@dataclass(frozen=True)
class PruneRule:
    """What one pass may remove."""

    unused_for: float | None = None
    """Seconds an image must have been unused; ``None``: no age rule."""
    keep: tuple[str, ...] = ()
    """Image references never to remove, as the user wrote them (checked here: a bad one
    raises :class:`KeepListError`)."""
    dry_run: bool = False
    """Remove nothing; report what would be removed."""
    bytes_to_free: int | None = None
    """Stop once the removed images' sizes add up to this; ``None``: no budget."""
    min_idle: float = 0.0
    """Never an image used less than this many seconds ago (the automatic mode's hour)."""

    def __post_init__(self) -> None:
        if self.unused_for is not None and self.unused_for < 0:
            raise ValueError("unused_for is a number of seconds, at least 0")
        if self.min_idle < 0:
            raise ValueError("min_idle is a number of seconds, at least 0")
        if self.bytes_to_free is not None and self.bytes_to_free < 0:
            raise ValueError("bytes_to_free is at least 0")
        keep_references(self.keep)

    @property
    def parsed_keep(self) -> tuple[ImageReference, ...]:
        """The keep list, normalised."""
        return keep_references(self.keep)


@dataclass(frozen=True)
class Removal:
    """One image removed (or, in a dry run, that would be)."""

    image_id: str
    names: tuple[str, ...]
    size_bytes: int
    last_used: float
    """Seconds since the epoch (see the module's docstring)."""


@dataclass(frozen=True)
class PruneOutcome:
    """What one node did in one pass."""

    removed: tuple[Removal, ...]
    bytes_freed: int
    """The sum of the removed images' sizes (an upper bound; see the module's docstring)."""
    kept_in_use: int
    """Images old enough to go, kept because a container uses them (or the engine refused)."""
    kept_listed: int
    """Images old enough to go, kept because the keep list names them."""
    dry_run: bool
    errors: tuple[str, ...] = ()
    """Removals that failed, one message each; the pass goes on with the next image (and
    stops when the engine cannot be reached)."""
    kept_asked: int = 0
    """Images old enough to go, kept because they were asked for while the pass ran."""


@dataclass(frozen=True)
class Candidate:
    image: StoredImage
    last_used: float


@dataclass(frozen=True)
class Selection:
    """The candidates, oldest-unused first, and what the rules kept."""

    candidates: tuple[Candidate, ...]
    kept_in_use: int
    kept_listed: int


class Usage(Protocol):
    """When images were used and first seen (:class:`worker.pruning.usage.UsageLog`)."""

    def last_used(self, image_id: str) -> float | None: ...

    def first_seen(self, image_id: str) -> float | None: ...

    def saw(self, image_ids: Iterable[str], now: float) -> None: ...

    def forget(self, image_id: str) -> None: ...

    def flush(self) -> None: ...


class Removals(Protocol):
    """Where removals begin and end, so that none crosses an answer
    (:class:`worker.pulls.image_guard.ImageGuard`)."""

    def pass_started(self) -> int: ...

    def begin_removal(self, snapshot: int, image: StoredImage) -> bool: ...

    def end_removal(self, image_id: str, removed: bool) -> None: ...

    def pass_ended(self, snapshot: int) -> None: ...


# -- the policy --------------------------------------------------------------------------------


def keep_references(keep: Iterable[str]) -> tuple[ImageReference, ...]:
    """The keep list, normalised; raises :class:`KeepListError` naming a bad entry."""
    parsed = []
    for text in keep:
        try:
            parsed.append(parse_reference(text))
        except InvalidReference as error:
            raise KeepListError(f"keep list: {error}") from None
    return tuple(parsed)


def is_kept(image: StoredImage, keep: Sequence[ImageReference]) -> bool:
    """Whether a name or repository digest of ``image`` is one of ``keep`` (normalised)."""
    return carries(image, keep)


def last_used(image: StoredImage, usage: Usage, now: float) -> float:
    """The latest of when puller answered for it, when it was tagged here and when the worker
    first saw it; ``now`` when none is known (an image of unknown age is never old).

    A clock that was ahead for a moment must not keep an image for the length of the jump:
    the worker's own times after ``now`` count as ``now`` (and the usage log brings them
    back at each listing); the engine's tag time after ``now`` is left out (the engine keeps
    it, so it would count as ``now`` at every pass until the clock caught up)."""
    tagged = (
        image.last_tagged if image.last_tagged is not None and image.last_tagged <= now else None
    )
    known = [
        min(moment, now)
        for moment in (
            usage.last_used(image.image_id),
            tagged,
            usage.first_seen(image.image_id),
        )
        if moment is not None
    ]
    return max(known) if known else now


def choose(
    images: Iterable[StoredImage],
    in_use: set[str],
    rule: PruneRule,
    usage: Usage,
    now: float,
) -> Selection:
    """The images ``rule`` lets go, oldest-unused first; never one in ``in_use`` (image ids
    of every container) or on the keep list."""
    keep = rule.parsed_keep
    candidates: list[Candidate] = []
    kept_in_use = kept_listed = 0
    for image in images:
        used = last_used(image, usage, now)
        idle = now - used
        if idle < rule.min_idle or (rule.unused_for is not None and idle < rule.unused_for):
            continue
        if image.image_id in in_use:
            kept_in_use += 1
        elif is_kept(image, keep):
            kept_listed += 1
        else:
            candidates.append(Candidate(image, used))
    candidates.sort(
        key=lambda c: (
            c.last_used,
            c.image.created if c.image.created is not None else float("-inf"),
            -c.image.size_bytes,
            c.image.image_id,
        )
    )
    return Selection(tuple(candidates), kept_in_use, kept_listed)


def prune(
    store: PrunableStore,
    rule: PruneRule,
    usage: Usage,
    now: float,
    enough: Callable[[int], bool] | None = None,
    removals: Removals | None = None,
) -> PruneOutcome:
    """One pass: lists the store's images and containers, chooses (:func:`choose`) and
    removes oldest-unused first. ``enough(bytes_freed_so_far)`` is asked before each removal
    and ends the pass when true (the automatic mode reads the disk there). ``removals``:
    the gate each removal goes through (none: nothing else uses the store).

    Raises ``PullFailed`` when the store cannot list its images or containers (nothing is
    removed then); a failed removal is one of the outcome's ``errors``.
    """
    if removals is None:
        return _prune(store, rule, usage, now, enough, None, 0)
    snapshot = removals.pass_started()
    try:
        return _prune(store, rule, usage, now, enough, removals, snapshot)
    finally:
        removals.pass_ended(snapshot)


def _prune(
    store: PrunableStore,
    rule: PruneRule,
    usage: Usage,
    now: float,
    enough: Callable[[int], bool] | None,
    removals: Removals | None,
    snapshot: int,
) -> PruneOutcome:
    images = store.images()
    in_use = store.images_in_use()
    usage.saw((image.image_id for image in images), now)
    selection = choose(images, in_use, rule, usage, now)
    removed: list[Removal] = []
    errors: list[str] = []
    freed = 0
    kept_in_use = selection.kept_in_use
    kept_asked = 0
    for candidate in selection.candidates:
        if rule.bytes_to_free is not None and freed >= rule.bytes_to_free:
            break
        if enough is not None and enough(freed):
            break
        image = candidate.image
        removal = Removal(image.image_id, image.names, image.size_bytes, candidate.last_used)
        if rule.dry_run:
            removed.append(removal)
            freed += image.size_bytes
            continue
        result = _remove(store, image, removals, snapshot)
        if result is _Result.ASKED:
            kept_asked += 1
            continue
        if result is _Result.IN_USE:
            kept_in_use += 1
            continue
        if result is _Result.GONE_ALREADY:
            continue
        if isinstance(result, PullFailed):
            errors.append(f"{_label(image)}: {result.message}")
            if result.kind is ErrorKind.ENGINE_UNAVAILABLE:
                break
            continue
        usage.forget(image.image_id)
        removed.append(removal)
        freed += image.size_bytes
        log.info(
            "removed an image",
            image_id=image.image_id,
            names=list(image.names),
            bytes=image.size_bytes,
            unused_seconds=round(now - candidate.last_used),
        )
    usage.flush()
    return PruneOutcome(
        removed=tuple(removed),
        bytes_freed=freed,
        kept_in_use=kept_in_use,
        kept_listed=selection.kept_listed,
        dry_run=rule.dry_run,
        errors=tuple(errors),
        kept_asked=kept_asked,
    )


class _Result(Enum):
    REMOVED = "removed"
    ASKED = "asked for since the pass began"
    IN_USE = "in use"
    GONE_ALREADY = "gone already"


def _remove(
    store: PrunableStore, image: StoredImage, removals: Removals | None, snapshot: int
) -> _Result | PullFailed:
    """Removes one candidate, through ``removals`` when given; what became of it."""
    if removals is not None and not removals.begin_removal(snapshot, image):
        log.info("image kept: asked for since the prune began", image_id=image.image_id)
        return _Result.ASKED
    touched = False
    try:
        if image.image_id in store.images_in_use():  # a container made since the listing
            return _Result.IN_USE
        touched = True  # from here names may go, even when the removal then fails
        if not store.remove_image(image.image_id):
            return _Result.GONE_ALREADY  # someone else freed it
    except ImageInUse as refused:
        log.info("image kept: in use", image_id=image.image_id, reason=str(refused))
        return _Result.IN_USE
    except PullFailed as failure:
        log.warning("could not remove an image", image_id=image.image_id, error=str(failure))
        return failure
    finally:
        if removals is not None:
            removals.end_removal(image.image_id, touched)
    return _Result.REMOVED


def _label(image: StoredImage) -> str:
    return image.names[0] if image.names else image.image_id


# -- keep lists --------------------------------------------------------------------------------


def parse_keep_list(text: str, source: str = "keep list") -> tuple[str, ...]:
    """One image reference a line, as :mod:`contract.image_list` reads them (kept as the
    user wrote them). Raises :class:`KeepListError` naming ``source`` and the line."""
    references: list[str] = []
    for number, entry in entries(text):
        try:
            parse_reference(entry)
        except InvalidReference as error:
            raise KeepListError(f"{source}, line {number}: {error}") from None
        references.append(entry)
    return tuple(references)


def read_keep_file(path: Path) -> tuple[str, ...]:
    """The keep list in ``path``; raises :class:`KeepListError` when it cannot be read or a
    line is no image reference."""
    try:
        text = file_text(path)
    except InvalidReference as error:
        raise KeepListError(f"keep list {error}") from None
    return parse_keep_list(text, str(path))


# -- running passes: on request, and when the disk fills -----------------------------------------


class Pruner:
    """Runs prune passes one at a time, for a ``prune`` request and the automatic mode
    alike. ``on_outcome`` sees every pass's outcome (the metrics)."""

    def __init__(
        self,
        store: PrunableStore,
        usage: Usage,
        clock: Callable[[], float] = time.time,
        on_outcome: Callable[[PruneOutcome], None] | None = None,
        removals: Removals | None = None,
    ) -> None:
        """``removals``: the gate the node's pull service shares (see :func:`prune`)."""
        self._store = store
        self._usage = usage
        self._clock = clock
        self._on_outcome = on_outcome
        self._removals = removals
        self._lock = threading.Lock()

    def prune(self, rule: PruneRule, enough: Callable[[int], bool] | None = None) -> PruneOutcome:
        """One pass (see :func:`prune`; raises ``PullFailed`` when the store cannot list)."""
        with self._lock:
            outcome = prune(self._store, rule, self._usage, self._clock(), enough, self._removals)
        log.info(
            "pruned" if not rule.dry_run else "pruned (dry run: nothing removed)",
            removed=len(outcome.removed),
            bytes_freed=outcome.bytes_freed,
            kept_in_use=outcome.kept_in_use,
            kept_asked=outcome.kept_asked,
            kept_listed=outcome.kept_listed,
            errors=len(outcome.errors),
            unused_for=rule.unused_for,
        )
        if self._on_outcome is not None:
            self._on_outcome(outcome)
        return outcome

    def note_images(self) -> None:
        """Records the images the engine holds now as seen (their age counts from here)."""
        with self._lock:
            images = self._store.images()
            self._usage.saw((image.image_id for image in images), self._clock())
            self._usage.flush()
