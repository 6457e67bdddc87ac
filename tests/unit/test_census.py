"""The census: how a worker learns how many nodes there are, without ever waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pika.exceptions
import pytest

from contract import topology as topo
from worker.broker.census import REOPEN_AFTER, Census

EVERY = 30.0


class Channel:
    """Records what the census sends; the test answers for the broker."""

    def __init__(self) -> None:
        self.is_open = True
        self.asked: list[Callable[[Any], None]] = []
        self._on_close: list[Callable[[Any, BaseException], None]] = []

    def add_on_close_callback(self, callback: Callable[[Any, BaseException], None]) -> None:
        self._on_close.append(callback)

    def queue_declare(self, queue: str, **options: Any) -> None:
        assert queue == topo.KEEPER_TOKEN.name  # every worker consumes it
        assert options["passive"] is True  # only asks: needs no permission
        self.asked.append(options["callback"])

    def answer(self, consumers: int) -> None:
        self.asked[-1](SimpleNamespace(method=SimpleNamespace(consumer_count=consumers)))

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


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + seconds)


def test_the_count_is_the_keeper_token_queues_consumers(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = Broker()
    census = Census(broker.open)
    census.join()
    channel = broker.serve()
    assert len(channel.asked) == 1  # counted once on joining
    channel.answer(5)
    assert census.nodes == 5
    census.ask(EVERY)
    assert len(channel.asked) == 1  # just counted: not asked again so soon
    later(monkeypatch, EVERY)
    census.ask(EVERY)
    assert len(channel.asked) == 2
    census.ask(EVERY)  # the last question is not answered yet: not asked twice
    assert len(channel.asked) == 2
    channel.answer(7)
    assert census.nodes == 7


def test_a_refused_count_keeps_the_last_and_is_asked_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = Broker()
    census = Census(broker.open)
    census.join()
    broker.serve().answer(100)
    broker.channels[-1].refuse(404)  # the queue deleted, or its broker node down
    assert census.nodes == 100
    assert census.refused is not None
    opened = len(broker.channels)
    census.ask(EVERY)
    assert len(broker.channels) == opened  # not at once
    later(monkeypatch, REOPEN_AFTER + 1)
    census.ask(EVERY)
    assert len(broker.channels) == opened + 1
    broker.serve().answer(9)
    assert census.nodes == 9
    assert census.refused is None


def test_no_count_before_the_first_answer() -> None:
    census = Census(Broker().open)
    assert census.nodes is None  # presence then keeps the base interval
