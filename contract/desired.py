"""The desired state: what the fleet was asked to have, in one message.

A worker that holds the keeper's token (see :data:`contract.topology.KEEPER_TOKEN`) writes
these into ``puller.desired.stream``; a worker whose missed range of the history is gone
reads the newest one to get back what it missed (see ``docs/design.md``, catch-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from contract.fields import MAX_NODE_NAME_LENGTH, Count, Field, Records, Seconds, Text
from contract.json_body import load_body
from contract.messages import Message, PullRequest

MAX_DESIRED_BYTES = 32 * 1000 * 1000
"""A snapshot is about 190 B per image: this bound holds well over 100,000 images."""
MAX_DESIRED_REQUESTS = 200_000


@dataclass(frozen=True)
class DesiredState(Message):
    """A snapshot of the desired state: per image, the newest request within the window
    (and the newest asking for a refresh, when that one is older)."""

    written_at: float
    written_by: str
    """The node whose worker wrote it (the keeper)."""
    window: float
    """Seconds back from ``written_at`` that ``requests`` cover (the keeper's max age)."""
    through_offset: int
    """Every history entry up to this offset is in it."""
    complete_since: float
    """Every request since this time is in it (0: built from an unbroken history)."""
    requests: tuple[PullRequest, ...] = ()

    TYPE: ClassVar[str] = "desired_state"
    FIELDS: ClassVar[tuple[Field[Any], ...]] = (
        Field("written_at", Seconds()),
        Field("written_by", Text(MAX_NODE_NAME_LENGTH)),
        Field("window", Seconds()),
        Field("through_offset", Count()),
        Field("complete_since", Seconds()),
        Field("requests", Records[PullRequest](PullRequest, MAX_DESIRED_REQUESTS)),
    )

    @classmethod
    def decode(cls, body: bytes) -> Self:
        return cls.from_fields(load_body(body, cls.TYPE, MAX_DESIRED_BYTES))
