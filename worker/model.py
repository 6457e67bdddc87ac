"""The worker's own types: what the pull service works with, free of pika and the docker SDK.

The broker turns AMQP deliveries into :class:`Delivery`; an image store (the Docker Engine
today, containerd later) answers in :class:`ImageInfo` and :class:`PullProgress` and
raises ``PullFailed``; the service hands back a ``NodeResult`` through a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from contract import ImageReference, NodeProgress, NodeResult, PullFailed


@dataclass(frozen=True)
class Delivery:
    """One message from the node's queue or from the history stream."""

    body: bytes
    tag: int
    reply_to: str | None
    correlation_id: str | None
    source: object
    """The channel it came from, opaque to all but the broker: an answer to a delivery whose
    channel has closed since is not sent (the broker redelivers it, or a replay starts over)."""
    history_offset: int | None = None
    """Set when it comes from the history stream (a replay), not the node's live queue."""
    user_id: str | None = None
    """The AMQP ``user_id`` property: who published it, as the broker checked it."""


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


AnswerCallback = Callable[[NodeResult], None]
"""Receives a request's one result, on whatever thread produced it."""
ProgressCallback = Callable[[NodeProgress], None]


class ImageStore(Protocol):
    """A node's image store: the Docker Engine today, containerd later. Every method may be
    called from any thread; failures are raised as ``PullFailed``."""

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


class PullObserver(Protocol):
    """Sees every outcome of the pull service (metrics, today). Called from any thread;
    must not block."""

    def answered(self, result: NodeResult, from_memory: bool) -> None: ...

    def attempt_started(self, image: ImageReference) -> None: ...

    def attempt_ended(
        self,
        image: ImageReference,
        seconds: float,
        bytes_received: int,
        failure: PullFailed | None,
    ) -> None: ...
