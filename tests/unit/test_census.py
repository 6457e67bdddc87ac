"""The census: how a worker learns how many nodes there are, without ever waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pika.exceptions
import pytest

from contract import topology as topo
from worker.broker.census import REJOIN_AFTER, Census

EVERY = 30.0


class Channel:
    """Records what the census sends; the test answers for the broker."""

    def __init__(self) -> None:
        self.is_open = True
        self.declared: list[tuple[bool, Callable[[Any], None]]] = []
        self.consumed: list[tuple[str, bool, Callable[[Any], None]]] = []
        self._on_close: list[Callable[[Any, BaseException], None]] = []

    def add_on_close_callback(self, callback: Callable[[Any, BaseException], None]) -> None:
        self._on_close.append(callback)

    def add_on_cancel_callback(self, _callback: object) -> None:
        pass

    def queue_declare(self, queue: str, **options: Any) -> None:
        assert queue == topo.CENSUS.name
        self.declared.append((bool(options.get("passive")), options["callback"]))

    def basic_consume(self, queue: str, _on_message: object, **options: Any) -> None:
        self.consumed.append((queue, options["auto_ack"], options["callback"]))

    def answer(self, consumers: int) -> None:
        self.declared[-1][1](SimpleNamespace(method=SimpleNamespace(consumer_count=consumers)))

    def refuse(self, code: int) -> None:
        self.is_open = False
        for callback in self._on_close:
            callback(self, pika.exceptions.ChannelClosedByBroker(code, "refused"))


class Broker:
    """Opens channels as pika does: returned at once, opened (``on_open``) later."""

    def __init__(self) -> None:
        self.channels: list[Channel] = []
        self._opening: list[Callable[[], None]] = []

    def open(self, on_open: Callable[[Any], None]) -> Channel:
        channel = Channel()
        self.channels.append(channel)
        self._opening.append(lambda: on_open(channel))
        return channel

    def serve(self) -> Channel:
        """Opens the channels asked for; the latest."""
        opening, self._opening = self._opening, []
        for opened in opening:
            opened()
        return self.channels[-1]


def joined(census: Census, broker: Broker, consumers: int) -> Channel:
    census.join()
    channel = broker.serve()
    channel.answer(consumers)
    queue, auto_ack, consuming = channel.consumed[-1]
    assert (queue, auto_ack) == (topo.CENSUS.name, True)
    consuming(None)
    return channel


def test_the_count_is_the_census_queues_consumers(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = Broker()
    census = Census(broker.open)
    channel = joined(census, broker, consumers=4)
    assert channel.declared[0][0] is False  # declared, not only checked
    assert census.nodes == 5  # the four before, and this one
    census.ask(EVERY)
    assert len(channel.declared) == 1  # joining just counted: not asked again so soon
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + EVERY)
    census.ask(EVERY)
    assert channel.declared[-1][0] is True  # passive: it only asks
    census.ask(EVERY)  # the last question is not answered yet: not asked twice
    assert len(channel.declared) == 2
    channel.answer(7)
    assert census.nodes == 7


def test_a_user_that_may_not_declare_it_checks_it_exists() -> None:
    broker = Broker()
    census = Census(broker.open)
    census.join()
    broker.serve().refuse(403)
    channel = broker.serve()
    assert channel.declared[-1][0] is True
    channel.answer(2)
    assert census.nodes == 3
    assert census.refused is None


def test_a_missing_census_keeps_the_last_count_and_is_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = Broker()
    census = Census(broker.open)
    joined(census, broker, consumers=99)
    broker.channels[-1].refuse(404)  # deleted, or its broker node went down
    assert census.nodes == 100
    assert census.refused is not None
    opened = len(broker.channels)
    census.ask(EVERY)
    assert len(broker.channels) == opened  # not at once
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + REJOIN_AFTER + 1)
    census.ask(EVERY)
    assert len(broker.channels) == opened + 1
    broker.serve().answer(9)
    assert census.nodes == 10
