"""The churn soak: a seeded random schedule of faults, applied to a whole puller system on this
machine while a session-like load requests images, and a checker that asks every node's own
Docker Engine what reached it. Used by ``bench/soak.py`` and
``tests/integration/test_churn_soak.py``.

The system: a :class:`~localcluster.broker_cluster.BrokerCluster` (3 RabbitMQ nodes), a
:class:`~localcluster.cluster.LocalCluster` (a registry; per node a ``dockerd`` and a
``puller-worker``, each worker given every broker address, its own broker first, spread
round the cluster), and one :class:`~publisher.Publisher` given every broker address.

The faults (:class:`FaultKind`), each at a time offset from the start of the churn:

- ``kill_worker``: SIGKILL to a node's worker; started again ``down_for`` seconds later.
- ``restart_engine``: a node's ``dockerd`` stopped (SIGTERM) and started again at once; its
  worker keeps running.
- ``stop_broker``: a broker node stopped (cleanly, or SIGKILL when ``hard``), started again
  ``down_for`` seconds later. Never two at once: the cluster keeps its majority.
- ``add_node``: a new node (engine and worker) joins.
- ``remove_node``: a node leaves for good (worker stopped with SIGTERM, engine stopped); it is
  not counted at the end.

What the design promises, and so what the checker expects: **every image requested during the
run is, at the end, on every node that is still there**, including nodes added during the run
and images requested before they joined. A request that a node's live queue did not receive
(its worker was dead, its broker node was away, it did not exist yet) is in the history stream
(``puller.history.stream``); a worker replays it on every connection from where it got to,
and a worker that never ran (no saved place) applies the newest snapshot of the desired state
if one covers the window, else replays the stream from its first entry, so a new node gets
every request younger than ``PULLER_HISTORY_MAX_AGE`` (a week by default; a soak
lasts minutes, and :func:`run_soak` checks that it fits).

The figure: (request, node) pairs where a node there at the end lacks the request's image after
the convergence window; and, per request, the time from its publish until its image was on
every node there at the end (the convergence time; p50 and p99 are reported). Images are seen
by polling each engine's image list every ``poll_interval`` seconds: the times are that coarse.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import docker

from contract import BrokerUnavailable, NoNodes
from localcluster.broker_cluster import BrokerCluster
from localcluster.cluster import LocalCluster, WorkerProcess
from localcluster.engines import NodeEngine, listening
from publisher import Publisher

WORKER_ENV = {
    "PULLER_PRESENCE_INTERVAL": "1",
    # A lost broker node is noticed within seconds, as in the failover tests.
    "PULLER_HEARTBEAT": "2",
    "PULLER_SHUTDOWN_GRACE": "5",
    # worker_url spreads the nodes over the broker nodes by number: keep its order.
    "PULLER_BROKER_ORDER": "listed",
}
WORKER_START_TIMEOUT = 120.0
ENGINE_START_TIMEOUT = 120.0
PUBLISH_RETRY_DELAY = 0.5
ENGINE_API_VERSION = "1.41"
"""Debian 12's dockerd (20.10) speaks it; the observer's clients are made without asking."""


class FaultKind(StrEnum):
    KILL_WORKER = "kill_worker"
    RESTART_ENGINE = "restart_engine"
    STOP_BROKER = "stop_broker"
    ADD_NODE = "add_node"
    REMOVE_NODE = "remove_node"


ALL_KINDS: tuple[FaultKind, ...] = tuple(FaultKind)
WEIGHTS = {
    FaultKind.KILL_WORKER: 4,
    FaultKind.RESTART_ENGINE: 3,
    FaultKind.STOP_BROKER: 2,
    FaultKind.ADD_NODE: 1,
    FaultKind.REMOVE_NODE: 1,
}
"""How often each kind is drawn, relative to the others."""

WORKER_DOWN = (1.0, 8.0)
"""Seconds a killed worker stays down, drawn uniformly."""
BROKER_DOWN = (3.0, 12.0)
BROKER_SETTLE = 25.0
"""Seconds the schedule leaves after a broker node is due back before it stops another: a
node takes 5-15 s to boot here (the executor waits anyway, see :class:`ChurnExecutor`)."""
NODE_SETTLE = 10.0
"""Seconds the schedule leaves a node alone after a fault of its own is over."""


@dataclass(frozen=True)
class Fault:
    """One event of the schedule: ``kind`` applied to ``target`` (a node's name, or
    ``broker-N`` for broker node N) ``at`` seconds after the churn began."""

    at: float
    kind: FaultKind
    target: str
    down_for: float = 0.0
    """kill_worker and stop_broker: seconds before the target is started again."""
    hard: bool = False
    """stop_broker: SIGKILL rather than a clean ``rabbitmqctl stop``."""

    def describe(self) -> str:
        if self.kind is FaultKind.KILL_WORKER:
            return f"SIGKILL worker {self.target}, restart after {self.down_for:.1f}s"
        if self.kind is FaultKind.RESTART_ENGINE:
            return f"restart dockerd of {self.target}"
        if self.kind is FaultKind.STOP_BROKER:
            how = "SIGKILL" if self.hard else "stop"
            return f"{how} {self.target}, start after {self.down_for:.1f}s"
        if self.kind is FaultKind.ADD_NODE:
            return f"add node {self.target}"
        return f"remove node {self.target}"


def broker_target(index: int) -> str:
    return f"broker-{index}"


def broker_index(target: str) -> int:
    return int(target.removeprefix("broker-"))


def make_schedule(
    seed: int,
    duration: float,
    nodes: Sequence[str],
    brokers: int = 3,
    *,
    mean_gap: float = 4.0,
    force: Collection[FaultKind] = (),
    min_nodes: int = 2,
    max_added: int = 3,
    start: float = 2.0,
) -> list[Fault]:
    """A random schedule of faults for ``duration`` seconds, the same for the same arguments.

    Gaps between faults are exponential with mean ``mean_gap``. Every kind in ``force`` comes
    at least once, spread over the first half of the run, if the schedule has room.
    Rules: a node is not hit again while a fault of its own is in effect (and ``NODE_SETTLE``
    after); a
    broker node is stopped only ``BROKER_SETTLE`` after the last one was due back; at least
    ``min_nodes`` nodes remain; at most ``max_added`` nodes are added (named on from the
    highest ``node-N``); every fault is over (targets due back) by ``duration``."""
    rng = random.Random(seed)  # noqa: S311 - a replayable schedule, not a secret
    present = list(nodes)
    busy_until: dict[str, float] = dict.fromkeys(present, 0.0)
    broker_free_at = 0.0
    added = 0
    next_number = 1 + max((_node_number(name) for name in nodes), default=0)
    pending = [kind for kind in ALL_KINDS if kind in set(force)]
    rng.shuffle(pending)
    # A step of its own for each forced kind, spread over the first half of the run (which
    # leaves room for the last of them to be over by the end), among the random steps.
    times = [
        (start + (duration / 2 - start) * (j + 0.5) / len(pending), True)
        for j in range(len(pending))
    ]
    at = start
    while True:
        at += rng.expovariate(1.0 / mean_gap)
        if at >= duration - 1.0:
            break
        times.append((at, False))
    schedule: list[Fault] = []
    for at, forced_step in sorted(times):
        drawn = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        others = [k for k in _shuffled(rng, ALL_KINDS) if k is not drawn]
        # A forced step tries only the kinds still owed; a random one those first too.
        candidates = list(pending) if forced_step else [*pending, drawn, *others]
        for kind in candidates:
            fault = _try(
                rng,
                kind,
                at,
                duration,
                present,
                busy_until,
                broker_free_at,
                brokers,
                min_nodes,
                added < max_added,
                f"node-{next_number}",
            )
            if fault is None:
                continue
            schedule.append(fault)
            if kind in pending:
                pending.remove(kind)
            if kind is FaultKind.STOP_BROKER:
                broker_free_at = at + fault.down_for + BROKER_SETTLE
            elif kind is FaultKind.ADD_NODE:
                present.append(fault.target)
                busy_until[fault.target] = at + NODE_SETTLE
                added += 1
                next_number += 1
            elif kind is FaultKind.REMOVE_NODE:
                present.remove(fault.target)
            else:
                busy_until[fault.target] = at + fault.down_for + NODE_SETTLE
            break
    return schedule


def _try(
    rng: random.Random,
    kind: FaultKind,
    at: float,
    duration: float,
    present: list[str],
    busy_until: dict[str, float],
    broker_free_at: float,
    brokers: int,
    min_nodes: int,
    may_add: bool,
    new_name: str,
) -> Fault | None:
    """A fault of ``kind`` at ``at`` that keeps the rules, or ``None``."""
    idle = [name for name in present if busy_until[name] <= at]
    if kind is FaultKind.KILL_WORKER:
        down = round(rng.uniform(*WORKER_DOWN), 1)
        if idle and at + down < duration:
            return Fault(round(at, 1), kind, rng.choice(idle), down)
    elif kind is FaultKind.RESTART_ENGINE:
        if idle:
            return Fault(round(at, 1), kind, rng.choice(idle))
    elif kind is FaultKind.STOP_BROKER:
        down = round(rng.uniform(*BROKER_DOWN), 1)
        if brokers >= 3 and at >= broker_free_at and at + down < duration:
            target = broker_target(rng.randint(1, brokers))
            return Fault(round(at, 1), kind, target, down, hard=rng.random() < 0.5)
    elif kind is FaultKind.ADD_NODE:
        if may_add:
            return Fault(round(at, 1), kind, new_name)
    elif idle and len(present) > min_nodes:  # REMOVE_NODE
        return Fault(round(at, 1), kind, rng.choice(idle))
    return None


def _shuffled(rng: random.Random, kinds: Sequence[FaultKind]) -> list[FaultKind]:
    copy = list(kinds)
    rng.shuffle(copy)
    return copy


def _node_number(name: str) -> int:
    tail = name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


# -- the system under churn ----------------------------------------------------------------


@dataclass
class SoakNode:
    """A node of the soak: its engine and worker, and when it came and went."""

    name: str
    engine: NodeEngine
    worker: WorkerProcess
    added_at: float | None = None
    """Seconds into the churn; ``None`` for the nodes there from the start."""
    removed_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    restarts: int = 0


@dataclass(frozen=True)
class TimelineEntry:
    at: float
    """Seconds since the churn began."""
    text: str


class Timeline:
    """What happened when, in order; each entry also goes to ``echo`` as it happens."""

    def __init__(self, echo: Callable[[str], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: list[TimelineEntry] = []
        self._echo = echo
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, text: str, at: float | None = None) -> None:
        entry = TimelineEntry(round(self.now() if at is None else at, 2), text)
        with self._lock:
            self._entries.append(entry)
        if self._echo is not None:
            self._echo(f"  t={entry.at:7.2f}s  {text}")

    def entries(self) -> list[TimelineEntry]:
        with self._lock:
            return sorted(self._entries, key=lambda e: e.at)


class SoakSystem:
    """The nodes of a soak, the broker cluster they use and the registry holding the images."""

    def __init__(
        self,
        root: Path,
        brokers: BrokerCluster,
        vhost: str,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.brokers = brokers
        self.vhost = vhost
        self.urls = brokers.urls(vhost)
        self.cluster = LocalCluster(
            root=root,
            amqp_url=",".join(self.urls),
            nodes=0,
            # Any node's stream port answers for the cluster (its Metadata names the
            # history's leader); while that node is down, workers fall back to a marker.
            worker_env={
                **WORKER_ENV,
                "PULLER_STREAM_PORT": str(brokers.nodes[0].stream_port),
                **(worker_env or {}),
            },
        )
        self.nodes: dict[str, SoakNode] = {}
        self._lock = threading.Lock()
        """Guards ``nodes``; held for moments only (the observer reads it all the time)."""
        self._adding = threading.Lock()
        """One node added at a time: the cluster's lists are not made for threads."""

    def start(self, count: int) -> None:
        self.cluster.start()  # the registry: no node yet
        for number in range(1, count + 1):
            self.add_node(f"node-{number}")

    def worker_url(self, name: str) -> str:
        """Every broker address, the one after the node's number first: workers spread."""
        first = _node_number(name) % len(self.urls)
        return ",".join(self.urls[first:] + self.urls[:first])

    def add_node(self, name: str, at: float | None = None) -> SoakNode:
        """A node's engine and worker, serving when it returns (and only then in ``nodes``)."""
        with self._adding:
            if name in self.nodes:
                raise ValueError(f"there is a node {name} already")
            worker = self.cluster.add_node(name, amqp_url=self.worker_url(name))
            node = SoakNode(name, self.cluster.engines[-1], worker, added_at=at)
            with self._lock:
                self.nodes[name] = node
            return node

    def node(self, name: str, timeout: float) -> SoakNode:
        """Node ``name``, waiting up to ``timeout`` for it to be added."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                found = self.nodes.get(name)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise KeyError(f"no node {name} after {timeout:.0f}s")
            time.sleep(0.2)

    def present(self) -> list[SoakNode]:
        """The nodes not removed, in order of name."""
        with self._lock:
            nodes = [n for n in self.nodes.values() if n.removed_at is None]
        return sorted(nodes, key=lambda n: _node_number(n.name))

    def wait_ready(self, timeout: float) -> None:
        """Every present node's worker answers ``/ready`` with 200 (connected, caught up)."""
        deadline = time.monotonic() + timeout
        for node in self.present():
            while not _ready(node.worker):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.name}'s worker is not ready after {timeout:.0f}s")
                time.sleep(0.2)

    def stop(self) -> None:
        self.cluster.stop()

    def remove(self) -> None:
        self.cluster.remove()


def _ready(worker: WorkerProcess) -> bool:
    try:
        return worker.health("/ready")[0] == 200
    except OSError:
        return False


class ChurnExecutor:
    """Applies a schedule to a :class:`SoakSystem`: each fault on a thread of its own, started
    at its time; a fault whose target is still busy with an earlier one waits for it, and a
    broker node is stopped only while every other one runs (one lock for all of them)."""

    def __init__(self, system: SoakSystem, timeline: Timeline) -> None:
        self.system = system
        self.timeline = timeline
        self.errors: list[str] = []
        self._broker_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._errors_lock = threading.Lock()

    def run(self, schedule: Sequence[Fault], stopping: threading.Event | None = None) -> None:
        """Starts every fault at its time, then waits until all are over (targets back)."""
        stopping = stopping or threading.Event()
        for fault in sorted(schedule, key=lambda f: f.at):
            delay = fault.at - self.timeline.now()
            if delay > 0 and stopping.wait(delay):
                break
            thread = threading.Thread(
                target=self._apply, args=(fault,), name=f"fault-{fault.kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        for thread in self._threads:
            thread.join()

    def _apply(self, fault: Fault) -> None:
        try:
            if fault.kind is FaultKind.STOP_BROKER:
                self._stop_broker(fault)
            elif fault.kind is FaultKind.ADD_NODE:
                self.timeline.add(f"add node {fault.target}: starting its engine and worker")
                node = self.system.add_node(fault.target, at=self.timeline.now())
                self.timeline.add(f"node {node.name} serving (worker catching up)")
            else:
                node = self.system.node(fault.target, timeout=WORKER_START_TIMEOUT)
                with node.lock:
                    if node.removed_at is not None:
                        self.timeline.add(f"skipped ({fault.target} was removed): {fault.kind}")
                        return
                    if fault.kind is FaultKind.KILL_WORKER:
                        self._kill_worker(node, fault.down_for)
                    elif fault.kind is FaultKind.RESTART_ENGINE:
                        self._restart_engine(node)
                    else:
                        self._remove(node)
        except Exception as error:
            message = f"FAILED {fault.describe()}: {type(error).__name__}: {error}"
            with self._errors_lock:
                self.errors.append(message)
            self.timeline.add(message)

    def _kill_worker(self, node: SoakNode, down_for: float) -> None:
        worker = node.worker
        process = worker.process
        if process is None:
            raise RuntimeError(f"{node.name} has no worker process")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        self.timeline.add(f"SIGKILL worker {node.name} (pid {process.pid})")
        time.sleep(down_for)
        _keep_log(worker, node.restarts)
        node.restarts += 1
        worker.start(timeout=WORKER_START_TIMEOUT)
        self.timeline.add(f"worker {node.name} restarted and serving")

    def _restart_engine(self, node: SoakNode) -> None:
        self.timeline.add(f"stopping dockerd of {node.name}")
        node.engine.stop()
        node.engine.start(timeout=ENGINE_START_TIMEOUT)
        self.timeline.add(f"dockerd of {node.name} answering again")

    def _remove(self, node: SoakNode) -> None:
        node.worker.stop()
        node.engine.stop()
        node.removed_at = self.timeline.now()
        self.timeline.add(f"removed node {node.name} (worker and dockerd stopped)")

    def _stop_broker(self, fault: Fault) -> None:
        index = broker_index(fault.target)
        brokers = self.system.brokers
        with self._broker_lock:
            how = "SIGKILL" if fault.hard else "stop"
            self.timeline.add(f"{how} {fault.target} ({brokers.node(index).name})")
            brokers.stop_node(index, kill=fault.hard)
            self.timeline.add(f"{fault.target} down")
            time.sleep(fault.down_for)
            self.timeline.add(f"starting {fault.target}")
            brokers.start_node(index)
            self.timeline.add(f"{fault.target} back in the cluster")


def _keep_log(worker: WorkerProcess, restarts: int) -> None:
    """A worker's launch empties its log: keep the one of the run that was killed."""
    if worker.log_path.exists():
        worker.log_path.replace(worker.log_path.with_name(f"{worker.log_path.name}.{restarts}"))


# -- the load ----------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One image asked for by the load: when its confirmed publish was made, and its id."""

    image: str
    planned_at: float
    published_at: float | None = None
    """Seconds since the churn began, taken just before the call that succeeded."""
    request_id: str | None = None
    attempts: int = 0
    no_nodes: bool = False
    """``NoNodes``: no worker queue was bound at that moment; the history copy was stored, so
    it still counts (the nodes catch up on it)."""


def push_images(cluster: LocalCluster, count: int, seed: int) -> list[str]:
    """``count`` distinct small images in the cluster's registry (a tiny layer of its own each)."""
    rng = random.Random(seed)  # noqa: S311 - image contents, not a secret
    run = uuid.uuid4().hex[:6]
    return [
        cluster.registry.push_files(
            f"soak/{run}-{number:03d}", "1", {"payload.bin": rng.randbytes(64)}
        )
        for number in range(count)
    ]


class Load(threading.Thread):
    """Publishes ``Publisher.request()`` for each image once, spread evenly over ``spread``
    seconds; an attempt that raises ``BrokerUnavailable`` is made again (a new request) until
    one is confirmed or ``give_up_after`` seconds have passed since the churn began."""

    def __init__(
        self,
        publisher: Publisher,
        images: Sequence[str],
        spread: float,
        timeline: Timeline,
        give_up_after: float,
    ) -> None:
        super().__init__(name="soak-load", daemon=True)
        step = spread / max(1, len(images))
        self.records = [RequestRecord(image, i * step) for i, image in enumerate(images)]
        self.publisher = publisher
        self.timeline = timeline
        self.give_up_after = give_up_after
        self.failures = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        for record in self.records:
            delay = record.planned_at - self.timeline.now()
            if delay > 0 and self.stopping.wait(delay):
                return
            self._publish(record)

    def _publish(self, record: RequestRecord) -> None:
        while not self.stopping.is_set():
            record.attempts += 1
            began = self.timeline.now()
            try:
                record.request_id = self.publisher.request(record.image)
            except NoNodes as error:
                record.request_id, record.no_nodes = error.request_id, True
                self.timeline.add(f"request for {_short(record.image)}: no worker queue bound")
            except BrokerUnavailable as error:
                self.failures += 1
                if self.timeline.now() > self.give_up_after:
                    self.timeline.add(f"gave up requesting {_short(record.image)}: {error}")
                    return
                if self.failures <= 20 or self.failures % 20 == 0:
                    self.timeline.add(
                        f"request() for {_short(record.image)} raised BrokerUnavailable "
                        f"(retrying): {str(error)[:120]}"
                    )
                self.stopping.wait(PUBLISH_RETRY_DELAY)
                continue
            record.published_at = began
            return

    def published(self) -> list[RequestRecord]:
        return [r for r in self.records if r.published_at is not None]


def _short(image: str) -> str:
    return image.partition("/")[2]


# -- the checker -------------------------------------------------------------------------------


class Observer(threading.Thread):
    """Polls the image list of every present node's own engine (docker SDK on its socket)
    every ``interval`` seconds, and keeps when each wanted image was first seen on each node."""

    def __init__(
        self, system: SoakSystem, wanted: Collection[str], timeline: Timeline, interval: float
    ) -> None:
        super().__init__(name="soak-observer", daemon=True)
        self.system = system
        self.wanted = frozenset(wanted)
        self.timeline = timeline
        self.interval = interval
        self.first_seen: dict[tuple[str, str], float] = {}
        """(node, image) -> seconds since the churn began."""
        self._lock = threading.Lock()
        self._clients: dict[str, docker.DockerClient] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.poll()
            self.stopping.wait(self.interval)

    def close(self) -> None:
        """Closes the engines' clients (once the thread is over)."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def poll(self) -> None:
        for node in self.system.present():
            seen_at = self.timeline.now()
            tags = self._tags(node)
            if tags is None:
                continue
            with self._lock:
                for image in self.wanted & tags:
                    self.first_seen.setdefault((node.name, image), seen_at)

    def _tags(self, node: SoakNode) -> set[str] | None:
        if not listening(node.engine.socket, timeout=2):
            return None
        client = self._clients.get(node.name)
        if client is None:
            # A pinned API version: with none, the SDK asks the engine for its version as it
            # makes the client (see _answers).
            client = docker.DockerClient(
                base_url=node.engine.docker_host, version=ENGINE_API_VERSION, timeout=10
            )
            self._clients[node.name] = client
        try:
            listed = client.api.images()
        except Exception:  # the engine is restarting or gone: ask again next time
            client.close()
            del self._clients[node.name]
            return None
        return {tag for image in listed for tag in image.get("RepoTags") or ()}

    def seen(self) -> dict[tuple[str, str], float]:
        with self._lock:
            return dict(self.first_seen)


@dataclass
class SoakResult:
    seed: int
    schedule: list[Fault]
    timeline: list[TimelineEntry]
    requests: list[RequestRecord]
    final_nodes: list[str]
    """The nodes there at the end: the ones counted."""
    added: list[str]
    removed: list[str]
    missing: list[tuple[str, str]]
    """(image, node) pairs: a node there at the end lacks an image that was requested."""
    convergence: dict[str, float]
    """image -> seconds from its publish until it was on every node there at the end."""
    unpublished: list[str]
    """Images the load never got a confirmed publish for (not counted in ``missing``)."""
    errors: list[str]
    """Faults the executor could not apply (a target that did not come back, say)."""
    churn_seconds: float
    converged_after: float | None
    """Seconds after the churn ended until every pair was present; ``None``: never."""
    publish_failures: int
    history_resent: int = 0
    """History copies RabbitMQ returned (not routable yet) that the publisher sent again."""
    history_unrouted: int = 0
    """Requests the history never took (confirmed to the live nodes only)."""
    kept: Path | None = None
    """Where the nodes' logs were kept (a failed run); ``None``: removed."""

    @property
    def pairs(self) -> int:
        return len(self.final_nodes) * len([r for r in self.requests if r.published_at is not None])

    def percentile(self, fraction: float) -> float | None:
        return percentile(list(self.convergence.values()), fraction)

    def report(self) -> str:
        """The result as lines a person reads."""
        published = [r for r in self.requests if r.published_at is not None]
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        lines = [
            f"seed {self.seed}",
            f"nodes at the end ({len(self.final_nodes)}): {', '.join(self.final_nodes)}",
            f"added during the run: {', '.join(self.added) or 'none'};"
            f" removed (not counted): {', '.join(self.removed) or 'none'}",
            f"requests confirmed: {len(published)} of {len(self.requests)}"
            f" ({self.publish_failures} attempt(s) raised BrokerUnavailable and were made again;"
            f" {sum(r.no_nodes for r in published)} found no worker queue bound)",
            f"history copies sent again (returned by RabbitMQ): {self.history_resent};"
            f" requests not in the history: {self.history_unrouted}",
            "expected: every requested image on every node there at the end, nodes added"
            " late included (a new worker applies the desired state or replays the history)",
            f"missing (request, node) pairs: {len(self.missing)} of {self.pairs}",
        ]
        lines.extend(f"  MISSING {image} on {node}" for image, node in self.missing)
        if p50 is not None and p99 is not None:
            worst = max(self.convergence.values())
            lines.append(
                "convergence (publish -> on every node there at the end), "
                f"{len(self.convergence)} requests: p50 {p50:.2f}s, p99 {p99:.2f}s, "
                f"max {worst:.2f}s"
            )
        after = (
            f"{self.converged_after:.1f}s after the churn"
            if self.converged_after is not None
            else "not within the convergence window"
        )
        lines.append(f"churn lasted {self.churn_seconds:.1f}s; all pairs present: {after}")
        lines.extend(f"  unpublished: {image}" for image in self.unpublished)
        lines.extend(f"  fault error: {error}" for error in self.errors)
        if self.kept is not None:
            lines.append(f"workers' and engines' logs kept under {self.kept}")
        return "\n".join(lines)


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; ``None`` for no samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


@dataclass(frozen=True)
class SoakConfig:
    seed: int
    nodes: int = 10
    images: int = 200
    churn_seconds: float = 180.0
    convergence_window: float = 180.0
    """Seconds after the churn (every fault over, every request published) to wait for the
    images to arrive; the wait ends as soon as every pair is present."""
    mean_gap: float = 4.0
    force: tuple[FaultKind, ...] = ALL_KINDS
    max_added: int = 3
    poll_interval: float = 0.5
    history_max_age: float = 7 * 24 * 3600.0
    worker_env: dict[str, str] = field(default_factory=dict)


def run_soak(
    config: SoakConfig,
    brokers: BrokerCluster,
    root: Path,
    echo: Callable[[str], None] | None = None,
) -> SoakResult:
    """Runs the whole soak against ``brokers`` (every node running; left running), with its
    nodes and registry under ``root`` (removed at the end, but kept, processes stopped, when
    something is missing); ``echo`` gets progress lines."""
    say = echo or (lambda _line: None)
    window = config.churn_seconds + config.convergence_window
    if window >= config.history_max_age:
        raise ValueError(
            f"the soak lasts up to {window:.0f}s but the history keeps requests for "
            f"{config.history_max_age:.0f}s (PULLER_HISTORY_MAX_AGE): a node could miss some"
        )
    vhost = f"soak-{uuid.uuid4().hex[:8]}"
    brokers.add_vhost(vhost)
    env = {"PULLER_HISTORY_MAX_AGE": f"{config.history_max_age:g}", **config.worker_env}
    system = SoakSystem(root, brokers, vhost, env)
    names = [f"node-{n}" for n in range(1, config.nodes + 1)]
    schedule = make_schedule(
        config.seed,
        config.churn_seconds,
        names,
        len(brokers.nodes),
        mean_gap=config.mean_gap,
        force=config.force,
        min_nodes=max(2, config.nodes // 2),
        max_added=config.max_added,
    )
    result: SoakResult | None = None
    try:
        say(f"starting {config.nodes} nodes (engine + worker) on vhost {vhost} ...")
        system.start(config.nodes)
        system.wait_ready(WORKER_START_TIMEOUT)
        say(f"pushing {config.images} images to the registry {system.cluster.registry.address} ...")
        images = push_images(system.cluster, config.images, config.seed)
        result = _churn(config, system, schedule, images, echo)
        if result.missing or result.errors:
            result.kept = root
        return result
    finally:
        if result is not None and result.kept is not None:
            system.stop()
        else:
            system.remove()
        with contextlib.suppress(Exception):
            brokers.ctl("delete_vhost", vhost)


def _churn(
    config: SoakConfig,
    system: SoakSystem,
    schedule: list[Fault],
    images: list[str],
    echo: Callable[[str], None] | None,
) -> SoakResult:
    """The churn itself, with the load and the observer, then the convergence window."""
    with Publisher(",".join(_rotated(system.urls, config.seed)), connect_timeout=5) as publisher:
        if not publisher.connect(30):
            raise BrokerUnavailable(f"the publisher cannot connect: {publisher.connection_problem}")
        if echo is not None:
            echo(f"churn for {config.churn_seconds:g}s, {len(schedule)} faults; timeline:")
        timeline = Timeline(echo)
        observer = Observer(system, images, timeline, config.poll_interval)
        load = Load(
            publisher, images, config.churn_seconds * 0.9, timeline, config.churn_seconds + 60
        )
        executor = ChurnExecutor(system, timeline)
        observer.start()
        load.start()
        try:
            executor.run(schedule)
            load.join()
            churn_seconds = timeline.now()
            timeline.add("churn over: every fault healed, every request made")
            converged_after = _converge(system, observer, load, timeline, config)
        finally:
            load.stopping.set()
            observer.stopping.set()
            observer.join(timeout=30)
        try:
            result = _result(
                config,
                schedule,
                timeline,
                load,
                observer,
                system,
                executor,
                churn_seconds,
                converged_after,
            )
            result.history_resent = publisher.history_resent
            result.history_unrouted = publisher.history_unrouted
            return result
        finally:
            observer.close()


def _rotated(urls: list[str], seed: int) -> list[str]:
    first = seed % len(urls)
    return urls[first:] + urls[:first]


def _converge(
    system: SoakSystem, observer: Observer, load: Load, timeline: Timeline, config: SoakConfig
) -> float | None:
    """Waits until every published image is on every present node, or the window ends."""
    began = timeline.now()
    deadline = time.monotonic() + config.convergence_window
    while True:
        missing = _missing(system, observer, load)
        if not missing:
            after = timeline.now() - began
            timeline.add(f"every image on every node ({after:.1f}s after the churn)")
            return after
        if time.monotonic() > deadline:
            timeline.add(f"convergence window over: {len(missing)} pair(s) missing")
            return None
        time.sleep(config.poll_interval)


def _missing(system: SoakSystem, observer: Observer, load: Load) -> list[tuple[str, str]]:
    seen = observer.seen()
    return [
        (record.image, node.name)
        for record in load.published()
        for node in system.present()
        if (node.name, record.image) not in seen
    ]


def _result(
    config: SoakConfig,
    schedule: list[Fault],
    timeline: Timeline,
    load: Load,
    observer: Observer,
    system: SoakSystem,
    executor: ChurnExecutor,
    churn_seconds: float,
    converged_after: float | None,
) -> SoakResult:
    observer.poll()  # one last look
    seen = observer.seen()
    final = system.present()
    convergence: dict[str, float] = {}
    for record in load.published():
        times = [seen.get((node.name, record.image)) for node in final]
        if record.published_at is not None and all(t is not None for t in times):
            convergence[record.image] = max(t for t in times if t is not None) - record.published_at
    return SoakResult(
        seed=config.seed,
        schedule=schedule,
        timeline=timeline.entries(),
        requests=load.records,
        final_nodes=[node.name for node in final],
        added=[n.name for n in system.nodes.values() if n.added_at is not None],
        removed=[n.name for n in system.nodes.values() if n.removed_at is not None],
        missing=_missing(system, observer, load),
        convergence=convergence,
        unpublished=[r.image for r in load.records if r.published_at is None],
        errors=list(executor.errors),
        churn_seconds=churn_seconds,
        converged_after=converged_after,
        publish_failures=load.failures,
    )


def new_seed() -> int:
    """A seed for a new schedule, printed so that the run can be replayed."""
    return int.from_bytes(os.urandom(4), "big")
