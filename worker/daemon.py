"""The node daemon as one object: :class:`Worker` starts its parts, serves until told to
stop (reconnecting as needed), then drains.

How a live request flows, and the thread each step runs on::

    connection thread  WorkerBroker delivers a Delivery -> Worker._on_live decodes it
                       (a broken message is refused and answered invalid_request at once)
                       -> PullService.submit(request, answer, progress)
                          known from memory? -> answer(...) right here, no hop
    inspect thread     asks the engine: there -> answer(present)
    pull thread        pulls (slots fair between registries; identical requests join)
                       -> answer(result) and progress(...) from this thread
    any thread         WorkerBroker.answer/progress hop onto the connection thread
    connection thread  reply + ack in one write (or kept for the next connection)

A replayed request (catch-up) flows the same way, except that its answer goes to the
catch-up ledger instead of a reply queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from functools import partial

import structlog

from contract import (
    BrokerUnavailable,
    CheckRequest,
    ErrorKind,
    InvalidMessage,
    Lane,
    NodeResult,
    NodeState,
    PruneRequest,
    decode_request,
)
from contract import topology as topo
from serving.http import Response, json_response
from serving.settings import broker_tls, image_policy
from worker.admission import Admission, RequestLimiter
from worker.broker import NodeNameInUse, WorkerBroker
from worker.broker.delivery import Delivery
from worker.catch_up.attempts import ReplayAttempts
from worker.catch_up.ledger import Ledger, OffsetStore
from worker.catch_up.replay import CatchUp
from worker.desired.keeper import Keeper
from worker.health import LOOP_SILENCE_LIMIT, HealthServer, Liveness
from worker.metrics import WorkerMetrics
from worker.presence import PresenceAnnouncer
from worker.pruning.disk_watch import DiskWatch, Housekeeping, engine_disk
from worker.pruning.pruner import Pruner
from worker.pruning.requests import PruneRequests
from worker.pruning.usage import USAGE_FILE, UsageLog
from worker.pulls.image_guard import ImageGuard
from worker.pulls.observers import Observers
from worker.pulls.owed import OWED_FILE
from worker.pulls.registry_health import NotFoundMemory, RegistryBreaker
from worker.pulls.retry import RetryPolicy
from worker.pulls.service import PullService
from worker.reconnect import ReconnectWaits
from worker.settings import WorkerSettings
from worker.stores.containerd import ContainerdStore
from worker.stores.contract import ImageStore, PrunableStore
from worker.stores.docker import DockerEngine
from worker.stores.pull_through import PullThrough
from worker.stores.registry_logins import DockerConfig

log = structlog.get_logger("worker")

EVENT_LOOP_SLICE = 0.5
CENSUS_EVERY = 6
"""Base presence intervals at least between two counts of the nodes (30 s by default)."""
ARRIVAL_WAIT = 5.0
"""Seconds a new connection waits for RabbitMQ to confirm the node's first announcement
(in the stream), before it serves anyway."""
CANCEL_GRACE = 5.0
"""Seconds, after cancelling, to send the ``cancelled`` replies."""
WARM_IN_HAND_LIMIT = 10_000
"""Warm-ups a worker acknowledges on receipt and keeps in memory (a few hundred bytes
each); beyond this, they stay unacknowledged in the broker like session requests."""


class Worker:
    """One node's worker: the broker, the pull service, catch-up, presence and health."""

    def __init__(
        self,
        settings: WorkerSettings,
        offsets: OffsetStore,
        store: ImageStore | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics()
        self.usage = UsageLog(settings.state_dir / USAGE_FILE)
        self._guard = ImageGuard(on_use=self.usage.used_now)
        self.admission = Admission(image_policy(settings), settings.allowed_publishers)
        self._breaker = RegistryBreaker(settings.registry_cooldown)
        self._store = store or self._image_store(settings)
        self._service = PullService(
            settings.node_name,
            self._store,
            settings.max_concurrent_pulls,
            RetryPolicy(attempts=1 + settings.pull_retries, first_delay=settings.retry_delay),
            self._breaker,
            NotFoundMemory(settings.not_found_memory),
            observer=Observers(self.metrics, self.usage),
            admission=self.admission,
            owed_file=settings.state_dir / OWED_FILE,
            guard=self._guard,
            limiter=(
                RequestLimiter(settings.max_requests_per_minute)
                if settings.max_requests_per_minute
                else None
            ),
        )
        self._broker = WorkerBroker(
            settings.amqp_url,
            settings.node_name,
            prefetch=max(8, 2 * settings.max_concurrent_pulls),
            heartbeat=settings.heartbeat,
            history_stream=topo.history_stream(
                settings.history_max_age, settings.history_max_bytes
            ),
            # A replay leaves a pull slot free for live requests (unless there is only one).
            replay_prefetch=replay_slots(settings),
            tls=broker_tls(settings),
            stream_port=settings.stream_port,
            broker_order=settings.broker_order,
        )
        self._waits = ReconnectWaits(settings.reconnect_spread)
        self._catch_up = CatchUp(
            settings.node_name,
            Ledger(offsets),
            self._service,
            self._broker,
            settings.history_max_age,
            observer=self.metrics,
            attempts=ReplayAttempts(settings.state_dir),
            working_limit=replay_slots(settings),
            read_desired=partial(self._broker.desired.read_newest, topo.DESIRED_STREAM.name),
        )
        self._keeper = Keeper(
            settings.node_name,
            self._broker.desired,
            self._broker.find_tail,
            settings.history_max_age,
            settings.desired_state_interval,
            on_written=lambda _state: self.metrics.desired_states_written.inc(),
        )
        self.image_pruner, self._housekeeping = self._pruning(settings)
        self._pruner = PruneRequests(settings.node_name, lambda: self.image_pruner, self.admission)
        self._presence = PresenceAnnouncer(
            settings.node_name,
            self._store,
            settings.presence_interval,
            self._catch_up.status,
            settings.presence_target_rate,
        )
        self._liveness = Liveness()
        self._health = (
            HealthServer(
                settings.health_port,
                {"/alive": self._alive, "/ready": self._ready, "/metrics": self._metrics},
                settings.health_max_connections,
            )
            if settings.health_port
            else None
        )
        self._draining = False
        self._not_connected_because = "not connected to RabbitMQ yet"
        self._arriving = False
        """Connected, and the connection's first announcement not settled yet."""

    def _image_store(self, settings: WorkerSettings) -> ImageStore:
        """The node's engine the settings name."""
        if settings.image_store == "containerd":
            if settings.pull_through_caches:
                log.warning(
                    "PULLER_PULL_THROUGH_CACHES is for the Docker Engine and is ignored: give "
                    "containerd the cache as a mirror in PULLER_CONTAINERD_HOSTS_DIR instead"
                )
            return ContainerdStore(
                settings.containerd_address,
                settings.containerd_namespace,
                stall_timeout=settings.stall_timeout,
                pull_timeout=settings.pull_timeout,
                snapshotter=settings.containerd_snapshotter,
                hosts_dir=settings.containerd_hosts_dir,
                docker_config=DockerConfig(settings.docker_config),
                root=str(settings.containerd_root),
            )
        return DockerEngine(
            settings.docker_host,
            stall_timeout=settings.stall_timeout,
            pull_timeout=settings.pull_timeout,
            docker_config=DockerConfig(settings.docker_config),
            pull_through=(
                PullThrough(settings.pull_through_caches, self.metrics.cache_outcome)
                if settings.pull_through_caches
                else None
            ),
        )

    def _pruning(self, settings: WorkerSettings) -> tuple[Pruner | None, Housekeeping]:
        """The pruner (for ``prune`` requests; ``None`` when the store cannot prune) and the
        housekeeping thread (the usage log, and the disk high-water mode when set)."""
        store = self._store
        if not isinstance(store, PrunableStore):
            if settings.disk_high_water is not None:
                log.warning("this image store cannot prune; PULLER_DISK_HIGH_WATER is ignored")
            return None, Housekeeping(self.usage, None, None, settings.disk_check_interval)
        pruner = Pruner(store, self.usage, on_outcome=self.metrics.pruned, removals=self._guard)
        watch = None
        if settings.disk_high_water is not None:
            data_root, setting = settings.docker_data_root, "PULLER_DOCKER_DATA_ROOT"
            if settings.image_store == "containerd":
                data_root, setting = settings.containerd_root, "PULLER_CONTAINERD_ROOT"
            watch = DiskWatch(
                pruner,
                lambda: engine_disk(store, data_root, setting),
                settings.disk_high_water,
                settings.disk_low_water,
                settings.prune_keep_file,
                settings.prune_min_idle,
                on_disk=self.metrics.disk_checked,
            )
        return pruner, Housekeeping(self.usage, pruner, watch, settings.disk_check_interval)

    def run(self, stopping: threading.Event) -> None:
        self.start()
        self.serve(stopping)
        self.drain()

    def start(self) -> None:
        self._store.start()
        owed = self._service.resume_owed()
        if owed:
            log.info(
                "pulls owed since before a restart are made once the engine answers", images=owed
            )
        self._housekeeping.start()
        if self._health is not None:
            self._health.start()
        self._presence.start()
        if self._presence.engine_version is None:
            log.warning(
                "the node's image store is not reachable yet; requests will fail until it is",
                engine=self._store.describe(),
            )
        else:
            log.info(
                "starting",
                engine=self._store.describe(),
                engine_version=self._presence.engine_version,
            )
        rules = self.admission.describe()
        if self.admission.policy.restricts or self.admission.publishers is not None:
            log.info("requests are checked", rules=rules)
        else:
            log.warning(
                "every image may be pulled, for anyone who may publish: set "
                "PULLER_ALLOWED_IMAGES (and PULLER_ALLOWED_PUBLISHERS) to restrict it",
                rules=rules,
            )

    def serve(self, stopping: threading.Event) -> None:
        """Connects, serves and reconnects (random, bounded waits: see
        :mod:`worker.reconnect`) until ``stopping`` is set."""
        attempt = 0
        while not stopping.is_set():
            self._liveness.tick()
            attempt += 1
            try:
                self._broker.connect(self._on_live)
                self._arriving = True
                try:
                    self._catch_up.on_connect()
                    self._keeper.on_connect()
                    self._announce_arrival()
                finally:
                    self._liveness.tick()  # the wait was the loop's: it did not hang
                    self._arriving = False
            except (BrokerUnavailable, NodeNameInUse) as error:
                self._disconnected(str(error))
                wait = self._waits.after_failure()
                log.warning(
                    "cannot serve yet", error=str(error), attempt=attempt, retry_in=round(wait, 1)
                )
                self._wait(stopping, wait)
                continue
            self.metrics.connections.inc()
            log.info("serving", queue=self._broker.queue, broker=self._broker.where)
            self._waits.connected()
            attempt = 0
            try:
                while not stopping.is_set():
                    self._liveness.tick()
                    if self._presence.due():
                        census = self._broker.census
                        self._broker.announce(self._presence.message(nodes=census.nodes))
                        census.ask(every=CENSUS_EVERY * self.settings.presence_interval)
                    self._broker.process_events(EVENT_LOOP_SLICE)
                    self._catch_up.checkpoint_if_due(self._service.unfinished)
                    self._keeper.tick()
                    self.metrics.keeper.set(1 if self._keeper.holding else 0)
            except BrokerUnavailable as error:
                wait = self._waits.after_loss()
                log.warning(
                    "connection lost; reconnecting", error=str(error), retry_in=round(wait, 2)
                )
                self._disconnected(str(error))
                self._wait(stopping, wait)

    def _announce_arrival(self) -> None:
        """The connection's first presence announcement, confirmed before ``/ready`` says
        "connected": whoever reads the roster after that finds this node (announced
        unconfirmed, a roster read at once could miss it)."""
        arrived = self._broker.announce_arrival(
            self._presence.message(nodes=self._broker.census.nodes, first=True), ARRIVAL_WAIT
        )
        if not arrived:
            log.warning(
                "RabbitMQ did not confirm this node's announcement; publishers list the "
                "node once an announcement reaches the presence stream",
                answer="refused" if arrived is False else f"none in {ARRIVAL_WAIT:g}s",
                stream=topo.PRESENCE.name,
            )

    def drain(self) -> None:
        """Says it is leaving, takes no more requests, answers those in flight for up to the
        grace period, cancels the rest, and closes everything."""
        self._draining = True
        self._presence.stop()
        if self._broker.connected:
            with contextlib.suppress(BrokerUnavailable):
                self._broker.announce(
                    self._presence.message(NodeState.LEAVING, nodes=self._broker.census.nodes)
                )
            self._broker.stop_consuming()
        self._serve_while_unfinished(self.settings.shutdown_grace)
        if self._service.unfinished:
            log.warning("grace period over; cancelling", unanswered=self._service.unfinished)
            self._service.cancel()
            self._serve_while_unfinished(CANCEL_GRACE)
        if self._service.unfinished:
            log.warning("stopping with requests unanswered", unanswered=self._service.unfinished)
        self._service.shutdown(wait=False)
        self._catch_up.close()  # a stop of its own: what it had in hand did not stop it
        self._pruner.shutdown()
        self._broker.close()
        self._housekeeping.stop()
        self._store.close()
        if self._health is not None:
            self._health.stop()
        log.info("stopped")

    # -- the connection's thread ------------------------------------------------------------

    def _on_live(self, delivery: Delivery) -> None:
        """A live request: decode it, then hand it to the pull service (a check too; a
        prune to the pruner). Never raises."""
        try:
            request = decode_request(delivery.body)
        except InvalidMessage as error:
            self._refuse(delivery, str(error))
            return
        except Exception as error:  # a decoder bug must not take the worker down
            log.exception("decoding failed unexpectedly")
            self._refuse(delivery, f"the worker could not decode the message: {error}")
            return
        if isinstance(request, CheckRequest):
            self._service.check(
                request, partial(self._broker.answer, delivery), asked_by=delivery.user_id
            )
            return
        if isinstance(request, PruneRequest):
            self._pruner.serve(request, partial(self._broker.answer, delivery), delivery.user_id)
            return
        self._catch_up.note_live(request)
        if request.lane is Lane.WARM and self._service.warm_in_hand < WARM_IN_HAND_LIMIT:
            delivery = self._broker.acknowledge(delivery)
        self._service.submit(
            request,
            partial(self._broker.answer, delivery),
            partial(self._broker.progress, delivery),
            asked_by=delivery.user_id,
        )

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        log.warning(
            "rejected a message that breaks the contract",
            reason=reason,
            correlation_id=delivery.correlation_id,
            bytes=len(delivery.body),
        )
        result = None
        if delivery.reply_to:
            result = NodeResult.failure(
                request_id=_printable(delivery.correlation_id) or "unknown",
                node=self.settings.node_name,
                image="",
                kind=ErrorKind.INVALID_REQUEST,
                message=reason,
                seconds=0.0,
            )
        self._broker.answer(delivery, result, refuse=True)

    def _disconnected(self, reason: str) -> None:
        self._not_connected_because = f"not connected to RabbitMQ: {reason}"
        self._catch_up.on_disconnect()
        self._keeper.on_disconnect()
        self._broker.close()

    def _wait(self, stopping: threading.Event, seconds: float) -> None:
        """Waits, still alive: the liveness probe must not fail while the broker is down."""
        deadline = time.monotonic() + seconds
        while not stopping.is_set() and time.monotonic() < deadline:
            self._liveness.tick()
            stopping.wait(min(EVENT_LOOP_SLICE, max(0.0, deadline - time.monotonic())))

    def _serve_while_unfinished(self, seconds: float) -> None:
        """Keeps the connection's thread serving (replies, acks) until nothing is unanswered
        and every answer handed to the connection's thread has gone out."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._liveness.tick()
            if not self._broker.connected:
                if not self._service.unfinished:
                    return
                time.sleep(0.1)
                continue
            if not self._service.unfinished and not self._broker.handing_over:
                return
            try:
                self._broker.process_events(0.1)
            except BrokerUnavailable:
                self._broker.close()

    # -- health (any thread) -----------------------------------------------------------------

    def _metrics(self) -> Response:
        def refresh() -> None:
            status = self._catch_up.status()
            self.metrics.connected.set(1 if self._broker.connected else 0)
            self.metrics.caught_up.set(1 if status.caught_up else 0)
            self.metrics.replay_pending.set(status.replay_pending)
            self.metrics.registries_down.set(len(self._breaker.down()))

        return self.metrics.exposition(refresh)

    def _alive(self) -> Response:
        return self._liveness.answer()

    def _ready(self) -> Response:
        status = self._catch_up.status()
        arrived = not self._arriving
        if self._draining:
            reason = "draining: the worker is stopping and takes no new requests"
        elif self._liveness.silence() >= LOOP_SILENCE_LIMIT:
            reason = "the worker's loop is stuck"
        elif not status.connected:
            reason = self._not_connected_because
        elif not arrived:
            reason = "connecting: waiting for RabbitMQ to confirm this node's announcement"
        elif not status.caught_up:
            reason = f"catching up: {status.phase} ({status.replay_pending} in hand)"
        else:
            reason = "connected and caught up"
        ready = reason == "connected and caught up"
        body = {"ready": ready, "reason": reason, **dataclasses.asdict(status)}
        body["connected"] = status.connected and arrived  # in the roster, as far as it knows
        return json_response(200 if ready else 503, body)


def replay_slots(settings: WorkerSettings) -> int:
    """Replayed requests worked at once: a pull slot is left to live requests (unless there
    is only one)."""
    return max(1, settings.max_concurrent_pulls - 1)


def _printable(text: str | bytes | None) -> str | None:
    """A correlation id to use as a request id, if it is printable ASCII text (pika gives
    one that is not UTF-8 as ``bytes``)."""
    if not isinstance(text, str) or not text.isprintable() or not text.isascii():
        return None
    return text[:128]
