"""The image store contract: what the worker may ask of a node's store, and the answers.

Every store (:mod:`worker.stores.docker`, :mod:`worker.stores.containerd`) keeps to it and
raises ``PullFailed`` (the failures both word the same way: :mod:`worker.stores.failures`).
Free of pika and the docker SDK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from contract import ImageReference


@dataclass(frozen=True)
class ImageInfo:
    """What the image store knows of an image it holds."""

    image_id: str
    digest: str | None


@dataclass(frozen=True)
class PullProgress:
    """Bytes downloaded so far over all layers the store reported, and their total."""

    done: int
    total: int


class ImageStore(Protocol):
    """A node's image store (the Docker Engine, containerd). Every method may be called from
    any thread; failures are raised as ``PullFailed``."""

    def describe(self) -> str:
        """Where the store is, for log lines and error messages."""
        ...

    def start(self) -> None:
        """Begins following the store's changes (so that known images are answered from
        memory); the store works without it, asking every time."""
        ...

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        """From memory only, never blocking: safe on the connection's thread."""
        ...

    def find_image(self, image: ImageReference) -> ImageInfo | None: ...

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo: ...

    def version(self) -> str: ...

    def cancel_pulls(self) -> None:
        """Cuts every running pull; each raises ``PullFailed`` of kind ``cancelled``."""
        ...

    def close(self) -> None: ...


# -- what pruning needs of a store (see worker.pruning) ----------------------------------------


@dataclass(frozen=True)
class StoredImage:
    """One image the store holds, as pruning sees it."""

    image_id: str
    names: tuple[str, ...]
    """``REPOSITORY:TAG`` names, as the engine spells them; empty for a dangling image."""
    repo_digests: tuple[str, ...]
    """``REPOSITORY@DIGEST`` references."""
    size_bytes: int
    """The engine's figure (``docker images`` SIZE): every layer, shared ones included."""
    created: float | None
    """When the image was built (seconds since the epoch); ``None`` when unknown. Not when
    it came to this node."""
    last_tagged: float | None
    """When it was last tagged on this node (``Metadata.LastTagTime``: ``docker tag``,
    build, import; a pull does not set it); ``None`` when never."""


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
    """The store refused to remove an image because something needs it now: a container
    (running or stopped) uses it, or another image is built on it. Not a failure: the
    image is kept."""


@runtime_checkable
class InterruptibleStore(Protocol):
    """A store that can cut one running pull (to make room for a session's pull)."""

    def interrupt(self, image: ImageReference) -> None:
        """Cuts the running pull of ``image``: it raises ``PullFailed`` of kind
        ``cancelled``; the engine keeps the layers it had finished."""
        ...


@runtime_checkable
class PrunableStore(Protocol):
    """What pruning asks of an image store, beside :class:`ImageStore` (a separate protocol
    so that stores which never prune, such as the test fakes, need not have it). Engine
    failures are raised as ``PullFailed`` (kinds ``engine_unavailable``, ``engine_error``)."""

    def images(self) -> list[StoredImage]:
        """Every image the store holds, dangling ones included (intermediate build layers
        that other images are built on are not listed)."""
        ...

    def images_in_use(self) -> set[str]:
        """The ids of the images of every container, stopped ones included."""
        ...

    def remove_image(self, image_id: str) -> bool:
        """Removes the image and every name it has, never by force; ``True`` when removed,
        ``False`` when it was gone already. Raises :class:`ImageInUse` when the store
        refuses because something uses it."""
        ...

    def data_root(self) -> str:
        """Where the store keeps its data, as the store itself sees that path (the Docker
        Engine's ``DockerRootDir``)."""
        ...


def store_name(image: ImageReference) -> str:
    """The name an image store keeps ``image`` under: fully qualified, tag or digest."""
    if image.digest is not None:
        return f"{image.repository}@{image.digest}"
    return f"{image.repository}:{image.tag}"
