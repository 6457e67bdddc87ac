"""The gateway's ``/metrics``: the roster is not read again at every scrape."""

from __future__ import annotations

import math
from typing import cast

from contract import BrokerUnavailable
from gateway.api import Gateway
from gateway.metrics import ROSTER_SCRAPE_MAX_AGE, GatewayMetrics
from gateway.settings import GatewaySettings
from localcluster.cluster import metric_value
from publisher import Publisher
from publisher.replies import AnswerMemory
from serving.http import Request


class CountingPublisher:
    """Stands in for :class:`Publisher`: counts roster reads."""

    def __init__(self) -> None:
        self.reads = 0
        self.nodes_up = 3
        self.down = False
        self.connected = True
        self.memory = AnswerMemory(64 * 2**20, 0, 0, 0, 0, 0)

    def nodes(self) -> list[object]:
        self.reads += 1
        if self.down:
            raise BrokerUnavailable("cannot connect to RabbitMQ at 127.0.0.1:9")
        return [object()] * self.nodes_up

    def answer_memory(self) -> AnswerMemory:
        return self.memory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(gateway: Gateway) -> float:
    response = gateway.handle(Request("GET", "/metrics", "", {}, b""))
    assert response.status == 200
    return metric_value(response.body.decode(), "puller_http_live_nodes")


def test_scrapes_within_the_max_age_reuse_one_roster_read() -> None:
    publisher, clock = CountingPublisher(), Clock()
    gateway = Gateway(cast(Publisher, publisher), GatewaySettings(), GatewayMetrics(), clock=clock)
    assert [scrape(gateway) for _ in range(5)] == [3.0] * 5
    assert publisher.reads == 1
    publisher.nodes_up = 4
    clock.now += ROSTER_SCRAPE_MAX_AGE - 0.1
    assert scrape(gateway) == 3.0  # still the last read's
    clock.now += 0.1
    assert scrape(gateway) == 4.0
    assert publisher.reads == 2


def test_an_unreachable_broker_is_not_asked_again_at_every_scrape() -> None:
    publisher, clock = CountingPublisher(), Clock()
    publisher.down = True
    gateway = Gateway(cast(Publisher, publisher), GatewaySettings(), GatewayMetrics(), clock=clock)
    assert math.isnan(scrape(gateway)) and math.isnan(scrape(gateway))
    assert publisher.reads == 1
    publisher.down = False
    clock.now += ROSTER_SCRAPE_MAX_AGE
    assert scrape(gateway) == 3.0


def test_the_answer_memory_is_scraped_as_bytes_kept_and_what_it_gave_up() -> None:
    publisher = CountingPublisher()
    gateway = Gateway(cast(Publisher, publisher), GatewaySettings(), GatewayMetrics())
    publisher.memory = AnswerMemory(1000, 900, 3, 2, 5, 0)
    scrape(gateway)
    publisher.memory = AnswerMemory(1000, 400, 2, 7, 5, 1)
    page = gateway.handle(Request("GET", "/metrics", "", {}, b"")).body.decode()
    assert 'puller_http_answer_memory_bytes{kind="kept"} 400.0' in page
    assert 'puller_http_answer_memory_bytes{kind="budget"} 1000.0' in page
    assert "puller_http_answer_memory_requests 2.0" in page
    assert 'puller_http_answer_memory_evictions_total{what="requests"} 7.0' in page
    assert 'puller_http_answer_memory_evictions_total{what="status_only"} 5.0' in page
    assert 'puller_http_answer_memory_evictions_total{what="progress"} 1.0' in page
