"""What catching up is doing, as ``/ready``, presence and the metrics see it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from contract import HistoryGap


class Phase(Enum):
    DISCONNECTED = "disconnected"
    FINDING_END = "finding the end of the history"
    REPLAYING = "replaying missed pulls"
    RECONCILING = "reconciling with the desired state"
    CAUGHT_UP = "caught up"
    CHECKPOINTING = "caught up (saving its place)"
    SWEEPING = "caught up (reading what came while it connected)"


CAUGHT_UP_PHASES = (Phase.CAUGHT_UP, Phase.CHECKPOINTING, Phase.SWEEPING)


@dataclass(frozen=True)
class CatchUpStatus:
    """What ``/ready`` and presence announcements say about catching up."""

    connected: bool
    caught_up: bool
    replay_pending: int
    """Replayed requests in hand, not yet done."""
    replay_failed: int
    """Replayed requests whose pull failed since the worker started."""
    history_offset: int | None
    phase: str
    history_gap: HistoryGap = HistoryGap.NONE
    """Whether the history lost entries this node had not replayed (until a catch-up that
    lost nothing)."""
    history_lost: int = 0
    """How many (0 when unknown: the stream was deleted and declared again)."""
