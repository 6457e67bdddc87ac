"""The worker's Prometheus metrics, served at ``GET /metrics`` on the health port.

One more consumer of the same outcomes: an observer of the pull service (each answer and
each pull attempt) and of catch-up (replays), wired in by the daemon, which also reports
connections. Every metric lives in the worker's own registry, so a test can run several.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from contract import HistoryGap, ImageReference, NodeResult, PullFailed, PullRequest
from serving.http import Response
from worker.catch_up.observer import ReplayObserver, SkipReason, TailOutcome
from worker.pruning.pruner import PruneOutcome
from worker.pulls.observers import PullObserver
from worker.stores.contract import DiskUsage

PULL_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class WorkerMetrics(PullObserver, ReplayObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.answers = self._counter(
            "answers",
            "Requests answered, by status and error kind ('' when none)",
            "status",
            "error_kind",
        )
        self.from_memory = self._counter(
            "answered_from_memory",
            "Requests answered with no engine call (image known, or not_found seen just now)",
        )
        self.pulls = self._counter(
            "pulls", "Pull attempts that ended, by outcome ('pulled' or the error kind)", "outcome"
        )
        self.pull_seconds = Histogram(
            "puller_worker_pull_duration_seconds",
            "Seconds one pull attempt took",
            buckets=PULL_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.pulled_bytes = self._counter(
            "pulled_bytes", "Bytes the engine reported downloading, over all pull attempts"
        )
        self.in_flight = self._gauge("pulls_in_flight", "Pull attempts running now")
        self.pull_through = self._counter(
            "pull_through",
            "Pulls from a registry with a pull-through cache, by how the layers came "
            "('cache', or 'fallback': the cache could not be used and the pull went direct)",
            "via",
        )
        self.replays = self._counter(
            "replayed", "History entries replayed (handed to the pull service) while catching up"
        )
        self.replays_skipped = self._counter(
            "replay_skipped",
            "History entries not replayed, by reason (served_live, too_old, invalid, forbidden, "
            "stopped_the_worker: the worker died each time it replayed it)",
            "reason",
        )
        self.replays_failed = self._counter("replay_failed", "Replayed requests whose pull failed")
        self.replay_pending = self._gauge(
            "replay_pending", "Replayed requests in hand, not yet done"
        )
        self.history_deliveries = self._counter(
            "history_deliveries",
            "History entries handled by this worker, whatever the phase (replay, sweep, "
            "checkpoint, finding the end)",
        )
        self.tail_reads = self._counter(
            "history_tail_reads",
            "Connections that found where the history ends, by how ('tail': over the stream "
            "protocol; 'fallback': it could not be read there, a marker was written)",
            "outcome",
        )
        self.history_sweeps = self._counter(
            "history_sweeps", "Sweeps done (one per connection, a few seconds after caught up)"
        )
        self.history_from_desired = self._counter(
            "history_started_from_desired",
            "Catch-ups of a node with no saved place (new, or its state deleted) that applied "
            "the desired state and replayed only the history after it",
        )
        self.history_gaps = self._counter(
            "history_gaps",
            "Catch-ups that found the history had lost entries this node had not replayed, "
            "by outcome ('recovered': made good from the desired state; 'unrecovered': what "
            "was left was replayed, the rest is missing)",
            "outcome",
        )
        self.history_lost = self._counter(
            "history_lost_entries", "History entries lost before this node replayed them"
        )
        self.history_gap_unrecovered = self._gauge(
            "history_gap_unrecovered",
            "1 from a catch-up that lost history entries until one that lost none",
        )
        self.keeper = self._gauge(
            "keeper", "1 while this worker holds the keeper's token (writes the desired state)"
        )
        self.desired_states_written = self._counter(
            "desired_states_written", "Snapshots of the desired state this worker wrote as keeper"
        )
        self.connections = self._counter(
            "broker_connections", "Connections to RabbitMQ opened (reconnects are this minus one)"
        )
        self.connected = self._gauge("broker_connected", "1 while connected to RabbitMQ")
        self.registries_down = self._gauge(
            "registries_down", "Registries known to be down now (their pulls fail at once)"
        )
        self.caught_up = self._gauge("caught_up", "1 once the node has replayed what it missed")
        self.pruned_images = self._counter(
            "pruned_images", "Images removed by pruning (on request, or over the disk's high mark)"
        )
        self.pruned_bytes = self._counter(
            "pruned_bytes", "Bytes freed by pruning (the removed images' sizes, as the engine says)"
        )
        self.disk_used_percent = self._gauge(
            "disk_used_percent", "Percent used of the engine's data disk, at the last check"
        )

        self._answers_by: dict[tuple[str, str], Counter] = {}

    def _counter(self, name: str, help_text: str, *labels: str) -> Counter:
        return Counter(f"puller_worker_{name}", help_text, labels, registry=self.registry)

    def _gauge(self, name: str, help_text: str) -> Gauge:
        return Gauge(f"puller_worker_{name}", help_text, registry=self.registry)

    # -- the pull service's observer ---------------------------------------------------------

    def answered(self, result: NodeResult, from_memory: bool) -> None:
        kind = result.error.kind.value if result.error is not None else ""
        labels = (result.status.value, kind)
        counter = self._answers_by.get(labels)
        if counter is None:  # labels() checks and locks: once per label pair, not per answer
            counter = self._answers_by[labels] = self.answers.labels(*labels)
        counter.inc()
        if from_memory:
            self.from_memory.inc()

    def attempt_started(self, image: ImageReference) -> None:
        self.in_flight.inc()

    def attempt_ended(
        self,
        image: ImageReference,
        seconds: float,
        bytes_received: int,
        failure: PullFailed | None,
    ) -> None:
        self.in_flight.dec()
        self.pulls.labels("pulled" if failure is None else failure.kind.value).inc()
        self.pull_seconds.observe(seconds)
        self.pulled_bytes.inc(bytes_received)

    # -- catch-up's observer -----------------------------------------------------------------

    def replay_started(self, request: PullRequest) -> None:
        self.replays.inc()

    def replay_skipped(self, reason: SkipReason) -> None:
        self.replays_skipped.labels(reason).inc()

    def replay_failed(self, result: NodeResult) -> None:
        self.replays_failed.inc()

    def history_delivered(self) -> None:
        self.history_deliveries.inc()

    def tail_read(self, outcome: TailOutcome) -> None:
        self.tail_reads.labels(outcome).inc()

    def history_gap(self, outcome: HistoryGap, lost: int) -> None:
        self.history_gaps.labels(outcome.value).inc()
        self.history_lost.inc(lost)
        self.history_gap_unrecovered.set(1 if outcome is HistoryGap.UNRECOVERED else 0)

    def history_whole(self) -> None:
        self.history_gap_unrecovered.set(0)

    def swept(self) -> None:
        self.history_sweeps.inc()

    def started_from_desired(self) -> None:
        self.history_from_desired.inc()

    # -- the store ---------------------------------------------------------------------------

    def cache_outcome(self, via: str) -> None:
        """From the engine: one pull from a registry with a pull-through cache."""
        self.pull_through.labels(via).inc()

    # -- pruning ---------------------------------------------------------------------------

    def pruned(self, outcome: PruneOutcome) -> None:
        """A prune pass's outcome; a dry run removed nothing."""
        if not outcome.dry_run:
            self.pruned_images.inc(len(outcome.removed))
            self.pruned_bytes.inc(outcome.bytes_freed)

    def disk_checked(self, disk: DiskUsage) -> None:
        self.disk_used_percent.set(disk.used_percent)

    # -- the health port ---------------------------------------------------------------------

    def exposition(self, refresh: Callable[[], None] | None = None) -> Response:
        if refresh is not None:
            refresh()
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
