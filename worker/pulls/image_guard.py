"""Answers and removals that never cross: a node never answers ``present`` or ``pulled``
for an image it is about to remove, nor removes one it has just answered for.

Pruning chooses its images from a snapshot (the engine's list and the usage log), and
requests keep coming while it removes them. One lock orders both sides:

- A request about to answer with image X **claims** it. The claim is refused while X is
  being removed, or when X was removed after the request looked at the engine; the request
  then pulls (see below) and answers ``pulled``. A granted claim counts X as used now, and
  no removal of X begins after it in the pass under way.
- A **pull** of R first waits for every removal under way of an image named R, then holds
  R until it has claimed what it pulled: meanwhile no removal of an image named R begins.
- A **removal** begins only when its image was not claimed since the pass's snapshot and
  no pull holds one of its names; the image is "removing" until it ends.

Nothing here asks the engine; the service and pruning do, outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from contract import ImageReference, InvalidReference, parse_reference
from worker.stores.contract import ImageInfo, StoredImage

REMOVED_MEMORY = 60.0
"""Seconds an image counts as "removed just now": a claim from memory (the image index,
which hears of the removal a moment later) is refused meanwhile and the request asks the
engine through a pull instead."""
REMOVAL_WAIT_SLICE = 0.5
"""Seconds between looks at ``stopping`` while a pull waits for a removal."""


@dataclass(frozen=True)
class Ticket:
    """One request's look at the engine, from before it looked until it answered."""

    number: int
    holds: ImageReference | None


class ImageGuard:
    """Orders answers and removals on one node (see the module's docstring). Thread-safe.

    ``on_use``: called, under the lock, with the id of every image claimed (the usage log,
    so that a pass that starts after a claim sees the image as used now)."""

    def __init__(
        self,
        on_use: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_use = on_use
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._counter = 0
        self._open: dict[int, ImageReference | None] = {}
        """Tickets open now, by number, with the reference each holds (a pull's)."""
        self._held: Counter[ImageReference] = Counter()
        self._passes: list[int] = []
        """The snapshots of the prune passes under way."""
        self._claimed: dict[str, int] = {}
        """Image id -> the counter at its latest claim; kept only while a pass runs."""
        self._removing: dict[str, StoredImage] = {}
        self._removed: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """Image id -> (counter, clock) when its removal ended, oldest first."""
        self._waiting = 0

    # -- the request side ---------------------------------------------------------------------

    def known(
        self, image: ImageReference, look: Callable[[], ImageInfo | None]
    ) -> ImageInfo | None:
        """``look()`` (memory only: it runs under the lock), claimed at once; ``None`` when
        it knows nothing or the image is being removed or was removed just now."""
        with self._lock:
            info = look()
            if info is None or not self._claimable(info.image_id, None, pulled=False):
                return None
            self._claim(info.image_id)
            return info

    def open(
        self,
        hold: ImageReference | None = None,
        stopping: threading.Event | None = None,
    ) -> Ticket:
        """A ticket, taken before looking at the engine. With ``hold`` (a pull of that
        reference), first waits while an image named so is being removed (or until
        ``stopping`` is set), then holds the name until :meth:`close`."""
        with self._changed:
            if hold is not None:
                self._waiting += 1
                while self._removing_named(hold) and not (stopping and stopping.is_set()):
                    self._changed.wait(REMOVAL_WAIT_SLICE)
                self._waiting -= 1
                self._held[hold] += 1
            self._counter += 1
            self._open[self._counter] = hold
            return Ticket(self._counter, hold)

    def claim(self, ticket: Ticket, info: ImageInfo, pulled: bool) -> bool:
        """Whether the request may answer with ``info`` (``pulled``: it comes from a pull
        made under ``ticket``); if so the image counts as used now."""
        with self._lock:
            if not self._claimable(info.image_id, ticket, pulled):
                return False
            if pulled:
                self._removed.pop(info.image_id, None)  # pulled again since: here
            self._claim(info.image_id)
            return True

    def wait_removed(
        self, image_id: str, stopping: threading.Event | None = None, timeout: float = 300.0
    ) -> None:
        """Waits while ``image_id`` is being removed (at most ``timeout`` seconds)."""
        deadline = self._clock() + timeout
        with self._changed:
            self._waiting += 1
            while (
                image_id in self._removing
                and not (stopping and stopping.is_set())
                and self._clock() < deadline
            ):
                self._changed.wait(REMOVAL_WAIT_SLICE)
            self._waiting -= 1

    def close(self, ticket: Ticket) -> None:
        with self._lock:
            self._open.pop(ticket.number, None)
            if ticket.holds is not None:
                self._held[ticket.holds] -= 1
                if self._held[ticket.holds] <= 0:
                    del self._held[ticket.holds]
            self._sweep()

    # -- the pruning side ---------------------------------------------------------------------

    def pass_started(self) -> int:
        """A prune pass's snapshot, taken before it lists the engine's images."""
        with self._lock:
            self._counter += 1
            self._passes.append(self._counter)
            return self._counter

    def begin_removal(self, snapshot: int, image: StoredImage) -> bool:
        """Marks ``image`` as being removed, unless it was claimed since ``snapshot`` or a
        pull holds one of its names (then it must stay)."""
        with self._lock:
            if self._claimed.get(image.image_id, 0) > snapshot:
                return False
            if self._held and carries(image, tuple(self._held)):
                return False
            self._removing[image.image_id] = image
            return True

    def end_removal(self, image_id: str, removed: bool) -> None:
        """The removal :meth:`begin_removal` allowed is over (``removed``: the image went)."""
        with self._changed:
            self._removing.pop(image_id, None)
            if removed:
                self._counter += 1
                self._removed.pop(image_id, None)
                self._removed[image_id] = (self._counter, self._clock())
            self._sweep()
            self._changed.notify_all()

    def pass_ended(self, snapshot: int) -> None:
        with self._lock:
            if snapshot in self._passes:
                self._passes.remove(snapshot)
            if not self._passes:
                self._claimed.clear()  # a later pass's snapshot follows every claim

    @property
    def waiting(self) -> int:
        """Requests waiting for a removal to end now."""
        with self._lock:
            return self._waiting

    @property
    def held(self) -> tuple[int, int, int, int]:
        """Open tickets, images claimed in passes under way, being removed, removed lately:
        all bounded (for tests)."""
        with self._lock:
            return len(self._open), len(self._claimed), len(self._removing), len(self._removed)

    # -- under the lock -----------------------------------------------------------------------

    def _claimable(self, image_id: str, ticket: Ticket | None, pulled: bool) -> bool:
        if image_id in self._removing:
            return False
        removed = self._removed.get(image_id)
        if removed is None:
            return True
        number, _ = removed
        if ticket is not None and number > ticket.number:
            return False  # removed after the request looked: what it saw is gone
        # Removed before it looked: a pull made since brought it back; an answer from the
        # engine's memory (which hears of removals a moment late) may be stale.
        return pulled

    def _claim(self, image_id: str) -> None:
        self._counter += 1
        if self._passes:
            self._claimed[image_id] = self._counter
        if self._on_use is not None:
            self._on_use(image_id)

    def _removing_named(self, reference: ImageReference) -> bool:
        return any(carries(image, (reference,)) for image in self._removing.values())

    def _sweep(self) -> None:
        """Forgets removals no open ticket predates and older than :data:`REMOVED_MEMORY`."""
        oldest_open = min(self._open, default=self._counter + 1)
        cutoff = self._clock() - REMOVED_MEMORY
        while self._removed:
            image_id, (number, when) = next(iter(self._removed.items()))
            if number >= oldest_open or when > cutoff:
                return
            del self._removed[image_id]


def carries(image: StoredImage, references: Sequence[ImageReference]) -> bool:
    """Whether a name or repository digest of ``image`` is one of ``references``, both
    normalised as ``docker pull`` reads them; a reference with a digest matches by it."""
    if not references:
        return False
    tags: set[tuple[str, str | None]] = set()
    digests: set[tuple[str, str | None]] = set()
    for name in (*image.names, *image.repo_digests):
        try:
            held = parse_reference(name)
        except InvalidReference:
            continue
        if held.digest is not None:
            digests.add((held.repository, held.digest))
        else:
            tags.add((held.repository, held.tag))
    for reference in references:
        if reference.digest is not None:
            if (reference.repository, reference.digest) in digests:
                return True
        elif (reference.repository, reference.tag) in tags:
            return True
    return False
