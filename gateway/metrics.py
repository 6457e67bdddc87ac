"""The gateway's Prometheus metrics, at ``GET /metrics``."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from publisher.replies import AnswerMemory
from serving.http import Response

ROUTES = (
    "/sha",
    "/alive",
    "/ready",
    "/pull_images",
    "/pull_image",
    "/pulls",
    "/nodes",
    "/openapi.json",
    "/metrics",
)
ROSTER_SCRAPE_MAX_AGE = 5.0
"""Seconds a scrape reuses the last one's roster count: a roster read puts a marker into the
presence stream and waits for it to come back, and sorts every node."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "puller_http_requests",
            "HTTP requests answered, by route and status ('other' for unknown paths)",
            ["path", "status"],
            registry=self.registry,
        )
        self.pull_images_seconds = Histogram(
            "puller_http_pull_images_seconds",
            "Seconds to answer /pull_images (and /pull_image): RabbitMQ's confirm included",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "puller_http_publish_failures",
            "Pull requests not published to a live node, by reason "
            "(broker_unavailable, no_nodes, invalid_image, forbidden)",
            ["reason"],
            registry=self.registry,
        )
        self.live_nodes = Gauge(
            "puller_http_live_nodes",
            f"Nodes in the roster, read at a scrape at most every {ROSTER_SCRAPE_MAX_AGE:g} s "
            "(NaN when RabbitMQ is unreachable)",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "puller_http_waiting_pulls",
            "Callers waiting in POST /pulls now",
            registry=self.registry,
        )
        self.connected = Gauge(
            "puller_http_broker_connected", "1 while connected to RabbitMQ", registry=self.registry
        )

        self.answer_bytes = Gauge(
            "puller_http_answer_memory_bytes",
            "Bytes of nodes' answers kept (estimated), and the budget (PULLER_ANSWER_MEMORY_MB)",
            ["kind"],
            registry=self.registry,
        )
        self.answer_requests = Gauge(
            "puller_http_answer_memory_requests",
            "Requests whose answers are kept",
            registry=self.registry,
        )
        self.answers_given_up = Counter(
            "puller_http_answer_memory_evictions",
            "What the answer memory gave up to stay within its budget: requests forgotten "
            "(oldest first), answers kept as node and status only, progress reports dropped",
            ["what"],
            registry=self.registry,
        )
        self._given_up = {"requests": 0, "status_only": 0, "progress": 0}

    def answer_memory(self, memory: AnswerMemory) -> None:
        """Sets the answer memory's figures from ``memory`` (its counts are since start)."""
        self.answer_bytes.labels("kept").set(memory.kept_bytes)
        self.answer_bytes.labels("budget").set(memory.budget)
        self.answer_requests.set(memory.requests)
        now = {
            "requests": memory.forgotten_requests,
            "status_only": memory.status_only_answers,
            "progress": memory.dropped_progress,
        }
        for what, count in now.items():
            self.answers_given_up.labels(what).inc(max(count - self._given_up[what], 0))
        self._given_up = now

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = (
            path if path in ROUTES else ("/pulls/{id}" if path.startswith("/pulls/") else "other")
        )
        self.requests.labels(route, str(status)).inc()
        if route in ("/pull_images", "/pull_image") and status == 200:
            self.pull_images_seconds.observe(seconds)

    def exposition(self, refresh: Callable[[], None]) -> Response:
        refresh()
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
