"""Which broker of a cluster each worker tries first, and how long it waits to reconnect."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter

import pytest

from contract import BrokerUnavailable
from contract.connection import spread_order
from worker.broker import WorkerBroker
from worker.reconnect import ReconnectWaits

NAMES = [f"node-{i}" for i in range(3000)]


def predicted(count: int, name: str) -> list[int]:
    """The order the docs promise: SHA-256 of "NAME NUL INDEX", lowest first."""
    return sorted(range(count), key=lambda i: hashlib.sha256(f"{name}\0{i}".encode()).digest())


def test_a_node_tries_the_brokers_in_an_order_its_name_fixes() -> None:
    assert spread_order(3, "node-1") == [2, 0, 1]  # what test_cluster_failover relies on
    for name in ("node-1", "node-2", "ip-10-0-3-17.eu-west-1.compute.internal"):
        order = spread_order(3, name)
        assert order == predicted(3, name)
        assert sorted(order) == [0, 1, 2]
        assert spread_order(3, name) == order  # the same at every start


def test_nodes_share_the_brokers_and_a_lost_brokers_nodes_share_the_others() -> None:
    orders = {name: spread_order(3, name) for name in NAMES}
    firsts = Counter(order[0] for order in orders.values())
    assert set(firsts) == {0, 1, 2}
    assert all(900 <= count <= 1100 for count in firsts.values()), firsts
    # Broker 0 goes: its nodes fail over to their second choice, split over 1 and 2.
    seconds = Counter(order[1] for order in orders.values() if order[0] == 0)
    assert set(seconds) == {1, 2}
    assert min(seconds.values()) >= 0.4 * firsts[0], seconds


def test_a_broker_added_at_the_end_takes_its_share_from_each_and_moves_no_one_else() -> None:
    moved = Counter(
        (spread_order(3, name)[0], spread_order(4, name)[0])
        for name in NAMES
        if spread_order(4, name)[0] != spread_order(3, name)[0]
    )
    assert {after for _, after in moved} == {3}  # a node moves only onto the new broker
    assert 600 <= sum(moved.values()) <= 900  # about a quarter of 3,000
    assert {before for before, _ in moved} == {0, 1, 2}


def test_one_broker_is_always_first() -> None:
    assert spread_order(1, "node-1") == [0]
    assert spread_order(0, "node-1") == []


def attempted(error: BrokerUnavailable) -> list[int]:
    """The ports a failed connect tried, in the order its message names them."""
    return [int(port) for port in re.findall(r"127\.0\.0\.1:(\d+) vhost", str(error))]


@pytest.mark.parametrize("node", ["node-1", "node-2", "node-3", "node-4"])
def test_a_worker_tries_the_brokers_in_its_own_order_and_listed_keeps_the_list(
    node: str,
) -> None:
    ports = [9, 19, 29]  # nothing listens there: each attempt is refused at once
    url = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/%2F" for port in ports)
    expected = [ports[i] for i in predicted(3, node)]
    for order, want in (("spread", expected), ("listed", ports)):
        broker = WorkerBroker(url, node, prefetch=8, heartbeat=30, broker_order=order)
        with pytest.raises(BrokerUnavailable) as raised:
            broker.connect(lambda _delivery: None)
        assert attempted(raised.value) == want
        broker.close()


def test_an_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError, match="broker_order"):
        WorkerBroker("amqp://guest:guest@127.0.0.1:9/%2F", "n", 8, 30, broker_order="random")


def test_after_a_lost_connection_nodes_come_back_spread_over_the_whole_spread() -> None:
    draws = random.Random(25)
    waits = [ReconnectWaits(10.0, uniform=draws.uniform).after_loss() for _ in range(1000)]
    assert all(0.0 <= wait <= 10.0 for wait in waits)
    per_second = Counter(int(wait) for wait in waits)
    assert sorted(per_second) == list(range(10))
    assert max(per_second.values()) <= 150  # at most 15 % of the nodes in any one second


def test_no_spread_means_reconnecting_at_once() -> None:
    assert ReconnectWaits(0.0).after_loss() == 0.0


def test_failed_attempts_wait_longer_each_time_up_to_the_cap_and_start_over_once_connected() -> (
    None
):
    waits = ReconnectWaits(1.0, first=0.5, cap=15.0, uniform=random.Random(7).uniform)
    bounds = [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    for bound in bounds:
        assert bound / 2 <= waits.after_failure() <= bound
    waits.connected()
    assert 0.25 <= waits.after_failure() <= 0.5
    waits.after_failure()
    waits.after_loss()  # a connection that served, then was lost: the backoff starts over
    assert 0.25 <= waits.after_failure() <= 0.5


def test_waits_that_cannot_be_are_refused() -> None:
    for spread, first, cap in ((-1.0, 0.5, 15.0), (1.0, 0.0, 15.0), (1.0, 2.0, 1.0)):
        with pytest.raises(ValueError, match="waits need"):
            ReconnectWaits(spread, first, cap)
