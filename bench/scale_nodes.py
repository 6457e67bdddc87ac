"""Simulated nodes for ``bench/scale.py``: many in one process, served in turns by one thread.

Each node is the worker's own code for what grows with the number of nodes: its broker
(:class:`~worker.broker.WorkerBroker`: connection, topology, live queue, history readings,
presence channel, the history's end read over the stream protocol), its catch-up
(:class:`~worker.catch_up.replay.CatchUp` with its :class:`~worker.catch_up.ledger.Ledger`),
its presence announcements and its pull
service, over a store that holds every image (so every request is answered ``present``
from memory, at once). What is left out: the Docker engine, the health port, pruning, and
the daemon's threads; the daemon's connect, serve and reconnect loop is
:meth:`SimulatedNode.step`, in the same order with the same waits.

One thread may own many brokers: each :class:`WorkerBroker` checks its owner thread, and
each has a connection (and I/O loop) of its own, served by ``process_events`` for a short
slice in turn. A node whose turn has not come keeps its deliveries unread in its socket.

Run by ``bench/scale.py`` as ``python -m bench.scale_nodes SPEC`` (SPEC: JSON, see
:class:`FleetSpec`); commands come one JSON line each on standard input, answers go one
JSON line each on standard output (see :func:`serve_commands`); logs go to standard error.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import structlog

from contract import (
    BrokerUnavailable,
    CheckRequest,
    HistoryGap,
    InvalidMessage,
    PruneRequest,
    PullRequest,
    decode_request,
)
from contract import topology as topo
from worker.broker import NodeNameInUse, WorkerBroker
from worker.broker.delivery import Delivery
from worker.catch_up.ledger import Ledger, OffsetStore
from worker.catch_up.observer import ReplayObserver, TailOutcome
from worker.catch_up.replay import SWEEP_DELAY, CatchUp
from worker.catch_up.status import Phase
from worker.daemon import ARRIVAL_WAIT, CENSUS_EVERY
from worker.desired.keeper import Keeper
from worker.presence import PresenceAnnouncer
from worker.pulls.service import PullService
from worker.reconnect import ReconnectWaits
from worker.stores.contract import ImageInfo, PullProgress

SLICE = 0.002
"""Seconds each node's connection is served per turn."""
PULL_SLOTS = 2
"""``PULLER_MAX_CONCURRENT_PULLS``' default; the daemon derives prefetches from it."""


# -- the designs -----------------------------------------------------------------------------


DESIGNS = ("tail", "fallback")
"""Today's catch-up (worker/catch_up) in two settings: ``tail``, the history's end read over
the stream protocol (``PULLER_STREAM_PORT``; the broker runs ``rabbitmq_stream``); and
``fallback``, no stream port, so each connection finds the end with a marker written into
the history. (The earlier design, a marker per connection and per checkpoint, is gone
from the code; its figures stay in ``bench/results/scale.json`` under ``markers``.)"""


# -- the parts the bench supplies ---------------------------------------------------------------


class EveryImageStore:
    """An image store that holds every image: ``known_image`` answers from memory."""

    def describe(self) -> str:
        return "every image (bench)"

    def version(self) -> str:
        return "bench"

    def start(self) -> None:
        """Nothing to follow."""

    def known_image(self, image: object) -> ImageInfo:
        return ImageInfo("sha256:" + "0" * 64, None)

    def find_image(self, image: object) -> ImageInfo:
        return self.known_image(image)

    def pull(
        self, image: object, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        return self.known_image(image)

    def cancel_pulls(self) -> None:
        """No pull ever runs."""

    def close(self) -> None:
        """Nothing to stop."""


class Tally(ReplayObserver):
    """Counts history deliveries by the catch-up phase they came in, how each connection
    found the history's end, sweeps and gaps; remembers which requests were replayed."""

    def __init__(self) -> None:
        self.deliveries: Counter[str] = Counter()
        self.tail_reads: Counter[str] = Counter()
        self.sweeps = 0
        self.gaps = 0
        self.replayed: set[str] = set()
        self.phase: Callable[[], Phase] = lambda: Phase.DISCONNECTED

    def history_delivered(self) -> None:
        self.deliveries[self.phase().name.lower()] += 1

    def tail_read(self, outcome: TailOutcome) -> None:
        self.tail_reads[outcome] += 1

    def swept(self) -> None:
        self.sweeps += 1

    def history_gap(self, outcome: HistoryGap, lost: int) -> None:
        self.gaps += 1

    def replay_started(self, request: PullRequest) -> None:
        self.replayed.add(request.request_id)


@dataclass(frozen=True)
class NodeSettings:
    amqp_url: str
    design: str
    state_root: str
    presence_interval: float
    checkpoint_interval: float
    sweep_delay: float = SWEEP_DELAY
    reconnect_spread: float = 1.0
    """``PULLER_RECONNECT_SPREAD``: the most seconds a node waits after a lost connection."""
    stream_port: int | None = None
    """The broker's stream-protocol port (design ``tail``); none: the marker fallback."""
    presence_target_rate: float = 100.0
    """``PULLER_PRESENCE_TARGET_RATE``' default."""
    desired_state_interval: float = 600.0
    """``PULLER_DESIRED_STATE_INTERVAL``' default."""
    heartbeat: int = 30
    history_max_age: float = topo.DEFAULT_HISTORY_MAX_AGE
    history_max_bytes: int = topo.DEFAULT_HISTORY_MAX_BYTES


class SimulatedNode:
    """One node: the worker's broker, catch-up, presence and pull service, driven by
    :meth:`step` as the daemon's loop drives them."""

    def __init__(self, name: str, settings: NodeSettings) -> None:
        self.name = name
        store = EveryImageStore()
        self.tally = Tally()
        self.service = PullService(name, store, slots=PULL_SLOTS)
        self.broker = WorkerBroker(
            settings.amqp_url,
            name,
            prefetch=max(8, 2 * PULL_SLOTS),
            heartbeat=settings.heartbeat,
            history_stream=topo.history_stream(
                settings.history_max_age, settings.history_max_bytes
            ),
            replay_prefetch=max(1, PULL_SLOTS - 1),
            stream_port=settings.stream_port,
        )
        offsets = OffsetStore(Path(settings.state_root) / name)
        self.catch_up = CatchUp(
            name,
            Ledger(offsets),
            self.service,
            self.broker,
            settings.history_max_age,
            checkpoint_interval=settings.checkpoint_interval,
            sweep_delay=settings.sweep_delay,
            observer=self.tally,
            working_limit=max(1, PULL_SLOTS - 1),
            read_desired=partial(self.broker.desired.read_newest, topo.DESIRED_STREAM.name),
        )
        # Every node competes for the keeper's token, as the daemon's does; one holds it.
        self.keeper = Keeper(
            name,
            self.broker.desired,
            self.broker.find_tail,
            settings.history_max_age,
            settings.desired_state_interval,
            on_written=self._snapshot_written,
        )
        self.snapshots = 0
        self.tally.phase = lambda: self.catch_up.phase
        self.presence = PresenceAnnouncer(
            name,
            store,
            settings.presence_interval,
            self.catch_up.status,
            settings.presence_target_rate,
        )
        self.presence_interval = settings.presence_interval
        self.serving = False
        self.retry_at = 0.0
        self.waits = ReconnectWaits(settings.reconnect_spread)
        self.announcements = 0
        self.connections = 0
        self.attempts = 0
        self.live = 0

    def step(self, gate: str) -> None:
        """One turn: connect when due, or serve the connection for a slice. ``gate``:
        ``open``; ``refuse`` stands for a broker that cannot be reached yet (an attempt
        fails and the next waits longer, as the daemon's does); ``hold`` makes no attempt
        (all held nodes try at once when it opens)."""
        if not self.serving:
            if gate != "hold" and time.monotonic() >= self.retry_at:
                self._connect(gate == "open")
            return
        try:
            if self.presence.due():
                census = self.broker.census
                self.broker.announce(self.presence.message(nodes=census.nodes))
                census.ask(every=CENSUS_EVERY * self.presence_interval)
                self.announcements += 1
            self.broker.process_events(SLICE)
            self.catch_up.checkpoint_if_due(self.service.unfinished)
            self.keeper.tick()
        except BrokerUnavailable:
            self._disconnected()
            self.retry_at = time.monotonic() + self.waits.after_loss()

    def _connect(self, may_connect: bool) -> None:
        self.attempts += 1
        try:
            if not may_connect:
                raise BrokerUnavailable("the broker is held back by the bench")
            self.broker.connect(self._on_live)
            self.catch_up.on_connect()
            self.keeper.on_connect()
            self.broker.announce_arrival(
                self.presence.message(nodes=self.broker.census.nodes, first=True), ARRIVAL_WAIT
            )
            self.announcements += 1
        except (BrokerUnavailable, NodeNameInUse):
            self._disconnected()
            self.retry_at = time.monotonic() + self.waits.after_failure()
            return
        self.serving = True
        self.connections += 1
        self.waits.connected()

    def _disconnected(self) -> None:
        self.serving = False
        self.catch_up.on_disconnect()
        self.keeper.on_disconnect()
        self.broker.close()

    def _snapshot_written(self, _state: object) -> None:
        self.snapshots += 1

    def _on_live(self, delivery: Delivery) -> None:
        """A live request, as the daemon's ``_on_live`` serves a pull (the bench sends no
        checks or prunes; one is refused)."""
        try:
            request = decode_request(delivery.body)
        except InvalidMessage:
            self.broker.answer(delivery, None, refuse=True)
            return
        if isinstance(request, CheckRequest | PruneRequest):
            self.broker.answer(delivery, None, refuse=True)
            return
        self.live += 1
        self.catch_up.note_live(request)
        self.service.submit(
            request,
            partial(self.broker.answer, delivery),
            partial(self.broker.progress, delivery),
            asked_by=delivery.user_id,
        )

    def report(self, replayed: bool) -> dict[str, Any]:
        status = self.catch_up.status()
        return {
            "name": self.name,
            "serving": self.serving,
            "caught_up": status.caught_up,
            "phase": status.phase,
            "history_offset": status.history_offset,
            "deliveries": dict(self.tally.deliveries),
            "tail_reads": dict(self.tally.tail_reads),
            "sweeps": self.tally.sweeps,
            "gaps": self.tally.gaps,
            "keeper": self.keeper.holding,
            "snapshots": self.snapshots,
            "announcements": self.announcements,
            "connections": self.connections,
            "attempts": self.attempts,
            "live": self.live,
            **({"replayed": sorted(self.tally.replayed)} if replayed else {}),
        }

    def close(self) -> None:
        if self.serving:
            self.broker.stop_consuming()
        self.broker.close()
        self.service.shutdown(wait=False)


@dataclass(frozen=True)
class FleetSpec:
    """One process's nodes: their names and settings."""

    names: list[str]
    settings: NodeSettings

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def decode(text: str) -> FleetSpec:
        raw = json.loads(text)
        return FleetSpec(list(raw["names"]), NodeSettings(**raw["settings"]))


def serve_commands(nodes: list[SimulatedNode], commands: TextIO, answers: TextIO) -> None:
    """Turns over the nodes until told to stop, reading commands between turns:
    ``{"do": "status", "replayed": bool}`` -> a list of node reports;
    ``{"do": "gate", "gate": "open" | "refuse" | "hold"}`` -> whether nodes may connect
    (see :meth:`SimulatedNode.step`; ``open`` at start);
    ``{"do": "forget"}`` -> forgets which requests were replayed;
    ``{"do": "stop"}`` -> closes every node and returns."""
    gate = "open"
    while True:
        for node in nodes:
            node.step(gate)
        if not select.select([commands], [], [], 0)[0]:
            continue
        line = commands.readline()
        if not line:
            break
        command = json.loads(line)
        answer: object = True
        if command["do"] == "status":
            answer = [node.report(bool(command.get("replayed"))) for node in nodes]
        elif command["do"] == "gate":
            gate = str(command["gate"])
        elif command["do"] == "forget":
            for node in nodes:
                node.tally.replayed.clear()
        elif command["do"] == "stop":
            break
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    for node in nodes:
        node.close()
    answers.write("true\n")
    answers.flush()


def main() -> None:
    spec = FleetSpec.decode(sys.argv[1])
    # Answers on the original standard output; anything else printed goes to the log.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    nodes = [SimulatedNode(name, spec.settings) for name in spec.names]
    serve_commands(nodes, sys.stdin, answers)


if __name__ == "__main__":
    main()
