"""The image store contract: what the worker may ask of a node's image store, and the answers.

Every store keeps it (:mod:`worker.stores.docker`, :mod:`worker.stores.containerd`, and the
unit tests' in-memory one), as the same cases check: tests/stores/conformance.py. Any method
may be called from any thread. Failures are ``PullFailed``, worded alike by every store
(:mod:`worker.stores.failures`): ``engine_unavailable`` when the store cannot be reached,
``not_found``, ``unauthorized``, ``registry_unreachable``, ``registry_error``, ``stalled``,
``timeout`` for a pull, ``cancelled`` for a pull cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from contract import ImageReference


@dataclass(frozen=True)
class ImageInfo:
    """An image the store holds: its id (the config's digest) and the manifest digest of the
    repository asked for (``None`` when the store has none, e.g. a locally built image)."""

    image_id: str
    digest: str | None


@dataclass(frozen=True)
class PullProgress:
    """Bytes downloaded so far over the layers the store reported, and their total, as exact
    as the store says them (containerd's ``ctr`` rounds to a tenth of a unit)."""

    done: int
    total: int


class ImageStore(Protocol):
    """A node's image store."""

    def describe(self) -> str:
        """Where the store is, for log lines and messages."""
        ...

    def version(self) -> str:
        """The daemon's version, for the roster."""
        ...

    def start(self) -> None:
        """Follows the store's image events, so that :meth:`known_image` can answer."""
        ...

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        """From memory only, never blocking; ``None`` when not known (or not started)."""
        ...

    def find_image(self, image: ImageReference) -> ImageInfo | None:
        """The image held under that name, from memory or the store; ``None``: not held."""
        ...

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        """Pulls the image, reporting bytes as they come; what :meth:`find_image` then says."""
        ...

    def cancel_pulls(self) -> None:
        """Cuts every running pull and refuses later ones: ``cancelled`` (the worker stops)."""
        ...

    def close(self) -> None:
        """Stops following the store's events; the store is not used after."""
        ...


@runtime_checkable
class InterruptibleStore(Protocol):
    """A store that can cut one running pull (to make room for a session's pull)."""

    def interrupt(self, image: ImageReference) -> None:
        """Cuts the running pull of ``image`` (``cancelled``, saying interrupted); or nothing."""
        ...


# -- what pruning asks of a store (worker.pruning) ----------------------------------------------


@dataclass(frozen=True)
class StoredImage:
    """One image the store holds, as pruning sees it."""

    image_id: str
    names: tuple[str, ...]
    """``REPOSITORY:TAG`` names; empty for a dangling image."""
    repo_digests: tuple[str, ...]
    """``REPOSITORY@DIGEST`` references."""
    size_bytes: int
    """The store's figure (Docker: unpacked, shared layers included; containerd: compressed)."""
    created: float | None
    """When it was built (seconds since the epoch); ``None``: unknown. Not when it came."""
    last_tagged: float | None
    """When last tagged on this node (``docker tag``, build, import; not a pull); ``None``:
    never, or unknown."""


@dataclass(frozen=True)
class DiskUsage:
    """The file system holding the store's data, as ``df`` shows it."""

    path: str
    total: int
    used: int
    free: int
    """Bytes an unprivileged writer may still use."""

    @property
    def used_percent(self) -> float:
        """``df``'s Use%: used over used plus free (blocks reserved for root left out)."""
        usable = self.used + self.free
        return 100.0 * self.used / usable if usable else 0.0


class ImageInUse(Exception):
    """The store will not remove an image something needs now (a container, running or not,
    was made from it, or another image is built on it): kept, not a failure."""


@runtime_checkable
class PrunableStore(Protocol):
    """What pruning asks of a store, beside :class:`ImageStore`."""

    def images(self) -> list[StoredImage]:
        """Every image held, each once with all its names (dangling ones included)."""
        ...

    def images_in_use(self) -> set[str]:
        """The ids of the images containers were made from, stopped ones included."""
        ...

    def remove_image(self, image_id: str) -> bool:
        """Removes the image, every name, never by force; ``False``: gone already; raises
        :class:`ImageInUse` when a container uses it."""
        ...

    def data_root(self) -> str:
        """Where the store keeps its data, as the store sees that path."""
        ...


def store_name(image: ImageReference) -> str:
    """The name a store keeps ``image`` under: fully qualified, tag or digest."""
    if image.digest is not None:
        return f"{image.repository}@{image.digest}"
    return f"{image.repository}:{image.tag}"
