"""The presence interval rule: a node announces less often as the roster grows, declares the
interval in each announcement, and readers judge it by that."""

from __future__ import annotations

import json
from typing import cast

import pytest

from contract import (
    MAX_PRESENCE_INTERVAL,
    PRESENCE_MISSES,
    HistoryGap,
    NodePresence,
    decode_presence_stream,
)
from publisher.roster import RosterBook
from worker.catch_up.status import CatchUpStatus
from worker.presence import JITTER, PresenceAnnouncer, interval_for
from worker.stores.contract import ImageStore


class Engine:
    def version(self) -> str:
        return "27.0"


def status(caught_up: bool = True, pending: int = 0) -> CatchUpStatus:
    return CatchUpStatus(True, caught_up, pending, 0, None, "live")


@pytest.mark.parametrize(
    ("nodes", "rate", "expected"),
    [
        (None, 100.0, 5.0),  # count unknown: the base interval
        (1, 100.0, 5.0),
        (500, 100.0, 5.0),  # 100/s is what 500 nodes send every 5 s
        (1_000, 100.0, 10.0),
        (3_000, 100.0, 30.0),
        (6_000, 100.0, MAX_PRESENCE_INTERVAL),
        (100_000, 100.0, MAX_PRESENCE_INTERVAL),
        (100_000, 0.0, 5.0),  # stretching off
        (3, 1.0, 5.0),
        (30, 1.0, 30.0),
    ],
)
def test_the_interval_stretches_with_the_number_of_nodes(
    nodes: int | None, rate: float, expected: float
) -> None:
    assert interval_for(5.0, nodes, rate) == expected


def test_the_cluster_wide_rate_stays_at_the_target_until_the_cap() -> None:
    for nodes in (600, 1_000, 2_500, 6_000):
        assert nodes / interval_for(5.0, nodes, 100.0) == pytest.approx(100.0)
    assert 10_000 / interval_for(5.0, 10_000, 100.0) == pytest.approx(10_000 / 60)


def test_a_base_interval_longer_than_the_cap_is_kept() -> None:
    assert interval_for(90.0, 10_000, 100.0) == 90.0


def announcer(
    target_rate: float = 100.0, draws: list[tuple[float, float]] | None = None
) -> PresenceAnnouncer:
    seen = draws if draws is not None else []

    def draw(low: float, high: float) -> float:
        seen.append((low, high))
        return high

    return PresenceAnnouncer(
        "n1", cast(ImageStore, Engine()), 5.0, status, target_rate=target_rate, draw=draw
    )


def test_an_announcement_declares_the_interval_and_the_wait_is_drawn_below_it() -> None:
    draws: list[tuple[float, float]] = []
    presence = announcer(draws=draws)
    first = NodePresence.decode(presence.message(nodes=2_000, first=True))
    assert first.interval == 20.0
    assert draws[-1] == (0.0, 20.0)  # the first after connecting: anywhere in the interval
    later = NodePresence.decode(presence.message(nodes=3_000))
    assert later.interval == 30.0
    assert draws[-1] == pytest.approx(((1 - JITTER) * 30.0, 30.0))
    small = NodePresence.decode(presence.message(nodes=200))
    assert small.interval == 5.0
    assert draws[-1] == (5.0, 5.0)  # unstretched: every 5 s, as before


def test_the_next_announcement_is_due_after_the_drawn_wait() -> None:
    presence = announcer()
    assert presence.due()  # nothing said yet
    presence.message(nodes=2_000)
    assert not presence.due()


def test_a_change_of_state_is_announced_without_waiting_for_the_interval() -> None:
    now = [status(caught_up=False)]
    presence = PresenceAnnouncer(  # a base interval of 0: a change may be announced at once
        "n1", cast(ImageStore, Engine()), 0.0, lambda: now[0], 100.0, lambda _lo, hi: hi
    )
    presence.message(nodes=6_000)  # 60 s before the next
    assert not presence.due()
    now[0] = status(caught_up=False, pending=7)  # counts moving in a replay are no change
    assert not presence.due()
    now[0] = status(caught_up=True)
    assert presence.due()


def test_a_state_change_waits_for_the_base_interval() -> None:
    now = [status(caught_up=False)]
    presence = PresenceAnnouncer(
        "n1", cast(ImageStore, Engine()), 60.0, lambda: now[0], 100.0, lambda _lo, hi: hi
    )
    presence.message()
    now[0] = status(caught_up=True)
    assert not presence.due()  # at most one announcement per base interval


def test_an_older_workers_announcement_has_no_interval_and_keeps_the_readers_age_limit() -> None:
    body = json.loads(NodePresence("a", "1", None, 1.0, 2.0).encode())
    del body["interval"]
    older = decode_presence_stream(json.dumps(body).encode())
    assert isinstance(older, NodePresence)
    assert older.interval is None
    assert older.silent_after(15.0) == 15.0


def test_an_older_reader_ignores_the_interval_field() -> None:
    body = json.loads(NodePresence("a", "1", None, 1.0, 2.0, interval=30.0).encode())
    assert body["interval"] == 30.0  # an extra field, which decoders of version 1 skip
    assert body["version"] == 1


def test_a_reader_waits_three_declared_intervals_at_most_the_cap() -> None:
    def node(interval: float) -> NodePresence:
        return NodePresence("a", "1", None, 1.0, 2.0, interval=interval)

    assert node(1.0).silent_after(4.0) == 4.0
    assert node(20.0).silent_after(15.0) == PRESENCE_MISSES * 20.0
    assert node(1e9).silent_after(15.0) == PRESENCE_MISSES * MAX_PRESENCE_INTERVAL


def test_the_roster_keeps_a_node_for_three_of_its_declared_intervals() -> None:
    book = RosterBook()
    for name, interval in (("old", None), ("small", 5.0), ("large", 40.0)):
        presence = NodePresence(name, "1", None, 0.0, 1000.0, interval=interval)
        book.add(presence, seen=1000.0, horizon=0.0)
    max_age = 15.0

    def alive(at: float) -> list[str]:
        return [info.node for info in book.roster(at - max_age, max_age)]

    assert alive(1014.0) == ["large", "old", "small"]
    assert alive(1016.0) == ["large"]  # 15 s: the old and small ones are gone
    assert alive(1119.0) == ["large"]
    assert alive(1121.0) == []  # 3 x 40 s


def test_an_announcement_carries_the_catch_up_state() -> None:
    gap = CatchUpStatus(True, False, 2, 1, 9, "replaying", HistoryGap.UNRECOVERED, 4)
    presence = PresenceAnnouncer("n1", cast(ImageStore, Engine()), 5.0, lambda: gap)
    sent = NodePresence.decode(presence.message())
    assert (sent.caught_up, sent.replay_pending, sent.history_gap, sent.history_lost) == (
        False,
        2,
        HistoryGap.UNRECOVERED,
        4,
    )
    assert sent.interval == 5.0  # no target rate given: never stretched
