"""The cache's Prometheus metrics, on a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

PREFIX = "puller_blob_cache"


class Outcome(StrEnum):
    """How a request ended, the ``outcome`` label of ``puller_blob_cache_requests_total``."""

    KEPT = "kept"
    """A blob served from the cache's directory."""
    FETCHED = "fetched"
    """A blob served as it came from upstream (fetched once, however many asked)."""
    PASSED_THROUGH = "passed_through"
    """A blob served from upstream without keeping it (no room for it)."""
    HEAD = "head"
    """A blob's HEAD, answered without fetching it."""
    FORWARDED = "forwarded"
    """``/v2/`` or a manifest, passed to the upstream and its answer back."""
    DENIED = "denied"
    """The upstream refused the client this blob (401, 403, 404...)."""
    REFUSED = "refused"
    """A target or method the cache does not serve (400, 404, 405)."""
    UPSTREAM_ERROR = "upstream_error"
    """The upstream could not be reached or failed (502)."""
    CUT = "cut"
    """A blob stream that ended before its last byte: the fetch failed, the blob did not match
    its digest, or the client stopped reading or went away."""
    OWN = "own"
    """``/alive`` and ``/metrics``."""


class CacheMetrics:
    """Counters and gauges of one cache."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.served_bytes = Counter(
            f"{PREFIX}_served_bytes", "Blob bytes sent to clients.", registry=self.registry
        )
        self.upstream_fetches = Counter(
            f"{PREFIX}_upstream_fetches",
            "Blob fetches from upstream, by result (kept, passed_through, failed).",
            ["result"],
            registry=self.registry,
        )
        self.upstream_bytes = Counter(
            f"{PREFIX}_upstream_bytes",
            "Blob bytes received from upstream.",
            registry=self.registry,
        )
        self.digest_mismatches = Counter(
            f"{PREFIX}_digest_mismatches",
            "Blobs from upstream whose content did not match their digest (never served whole).",
            registry=self.registry,
        )
        self.kept_bytes = Gauge(
            f"{PREFIX}_kept_bytes", "Bytes of blobs kept in the directory.", registry=self.registry
        )
        self.kept_blobs = Gauge(
            f"{PREFIX}_kept_blobs", "Blobs kept in the directory.", registry=self.registry
        )
        self.limit_bytes = Gauge(
            f"{PREFIX}_limit_bytes", "The eviction limit (--max-bytes).", registry=self.registry
        )
        self.evictions = Counter(
            f"{PREFIX}_evictions", "Kept blobs removed to make room.", registry=self.registry
        )
        self.evicted_bytes = Counter(
            f"{PREFIX}_evicted_bytes", "Bytes of the blobs evicted.", registry=self.registry
        )
        for outcome in Outcome:
            self.requests.labels(outcome.value)
        for result in ("kept", "passed_through", "failed"):
            self.upstream_fetches.labels(result)

    def count(self, outcome: Outcome) -> None:
        self.requests.labels(outcome.value).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
