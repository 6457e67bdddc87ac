"""The desired state: its message, the merge/prune view, the recover decision, reconciling
in catch-up and the keeper's round, without services."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import ANY

import pytest

from contract import (
    ErrorKind,
    HistoryGap,
    InvalidMessage,
    NodeResult,
    PullRequest,
    Status,
    parse_reference,
)
from contract import topology as topo
from contract.desired import DesiredState
from tests.unit.test_catch_up import FakeBroker, RecordingServer, request_body, submitted_images
from worker.broker import TailRead
from worker.broker.desired import OnEntry, StreamRead
from worker.catch_up.ledger import Ledger, OffsetStore, Place, entry_identity
from worker.catch_up.reconcile import covers
from worker.catch_up.replay import CatchUp
from worker.catch_up.status import Phase
from worker.desired.keeper import Keeper
from worker.desired.view import DesiredView
from worker.metrics import WorkerMetrics


def request(image: str, at: float, refresh: bool = False, request_id: str = "") -> PullRequest:
    return PullRequest(
        parse_reference(image), request_id or f"{image}-{at}".replace(":", "-"), at, refresh=refresh
    )


def snapshot(
    through: int, complete_since: float = 0.0, requests: tuple[PullRequest, ...] = ()
) -> DesiredState:
    return DesiredState(time.time(), "keeper-node", 3600.0, through, complete_since, requests)


# -- the message -------------------------------------------------------------------------------


def test_a_snapshot_goes_through_the_wire_unchanged() -> None:
    state = snapshot(41, 5.0, (request("a:1", 10.0), request("b:1", 11.0, refresh=True)))
    assert DesiredState.decode(state.encode()) == state
    big = snapshot(9, requests=tuple(request(f"img{n}:1", float(n)) for n in range(200)))
    assert len(big.encode()) > 16 * 1024, "bigger than any other message: allowed"
    assert DesiredState.decode(big.encode()) == big


@pytest.mark.parametrize(
    "body",
    [
        b'{"version": 1, "type": "desired_state", "written_at": 1}',
        b'{"version": 1, "type": "pull"}',
        b"not json",
    ],
)
def test_a_broken_snapshot_is_one_clear_error(body: bytes) -> None:
    with pytest.raises(InvalidMessage):
        DesiredState.decode(body)


# -- the view ----------------------------------------------------------------------------------


def test_the_view_keeps_the_newest_request_per_image_and_an_older_refresh() -> None:
    refresh = request("a:1", 10.0, refresh=True)
    newest = request("a:1", 20.0)
    other = request("b:1", 15.0)
    view = DesiredView([refresh, request("a:1", 5.0), newest, other, request("b:1", 1.0)])
    assert view.requests() == (refresh, other, newest)
    newer_refresh = request("a:1", 30.0, refresh=True)
    view.add(newer_refresh)
    assert view.requests() == (other, newer_refresh), "the newest is the refresh: once"


def test_the_view_drops_what_left_the_window() -> None:
    view = DesiredView([request("a:1", 10.0), request("b:1", 20.0, refresh=True)])
    view.prune(since=15.0)
    assert [str(r.image) for r in view.requests()] == ["docker.io/library/b:1"]
    view.prune(since=25.0)
    assert view.requests() == ()


@pytest.mark.parametrize(
    ("through", "complete_since", "first", "saved_at", "covered"),
    [
        (39, 0.0, 40, 100.0, True),  # reaches the entry before the first left
        (50, 0.0, 40, None, True),  # beyond it; unbroken history: any saved place
        (38, 0.0, 40, 100.0, False),  # stops short of the lost range
        (45, 90.0, 40, 100.0, True),  # complete since before the saved place
        (45, 110.0, 40, 100.0, False),  # itself lost some after the saved place
        (45, 90.0, 40, None, False),  # an older state file: time unknown
    ],
)
def test_whether_a_snapshot_makes_good_a_loss(
    through: int, complete_since: float, first: int, saved_at: float | None, covered: bool
) -> None:
    assert covers(snapshot(through, complete_since), first, saved_at) is covered


# -- reconciling in catch-up -------------------------------------------------------------------


class DesiredReader:
    """Plays the broker's read of the newest snapshot: kept until the test answers."""

    def __init__(self) -> None:
        self.asked: list[Callable[[bytes | None, str | None], None]] = []

    def __call__(self, on_found: Callable[[bytes | None, str | None], None]) -> None:
        self.asked.append(on_found)

    def answer(self, body: bytes | None, why: str | None = None) -> None:
        self.asked.pop(0)(body, why)


def lost_range(
    tmp_path: Path, metrics: WorkerMetrics
) -> tuple[CatchUp, FakeBroker, RecordingServer, DesiredReader, float]:
    """A node saved at offset 5 (a request made at ``saved_at``); the history now starts at
    40 and ends at 41: 6..39 are gone."""
    body = request_body("saved:1")
    saved_at = PullRequest.decode(body).requested_at
    OffsetStore(tmp_path).save(Place(5, entry_identity(body), saved_at))
    broker, server, reader = FakeBroker(tail=True), RecordingServer(), DesiredReader()
    catch_up = CatchUp(
        "n",
        Ledger(OffsetStore(tmp_path)),
        server,
        broker,
        3600,
        observer=metrics,
        read_desired=reader,
        sweep_delay=3600,
    )
    catch_up.on_connect()
    broker.tail_read(41)
    broker.deliver(request_body("left:1"), 40)
    assert catch_up.phase is Phase.RECONCILING
    assert catch_up.status().history_gap is HistoryGap.RECONCILING
    assert (server.submitted, len(reader.asked)) == ([], 1), "the snapshot first"
    return catch_up, broker, server, reader, saved_at


def test_a_loss_the_snapshot_covers_is_recovered_then_the_rest_replayed(tmp_path: Path) -> None:
    metrics = WorkerMetrics()
    catch_up, broker, server, reader, _ = lost_range(tmp_path, metrics)
    lost = request("lost:1", time.time())
    reader.answer(snapshot(40, 0.0, (lost,)).encode())
    assert submitted_images(server) == ["docker.io/library/lost:1"]
    assert catch_up.status().replay_pending == 1 and not catch_up.status().caught_up
    server.answer_all(Status.PULLED)
    broker.run_later()
    assert broker.readings[-1].start == 41, "the history after the snapshot"
    broker.deliver(request_body("after:1"), 41)
    assert submitted_images(server) == ["docker.io/library/after:1"]
    server.answer_all()
    broker.run_later()
    status = catch_up.status()
    assert (status.caught_up, status.history_gap, status.history_lost, status.history_offset) == (
        True,
        HistoryGap.RECOVERED,
        33,
        41,
    )
    assert metrics.registry.get_sample_value(
        "puller_worker_history_gaps_total", {"outcome": "recovered"}
    )
    assert metrics.registry.get_sample_value("puller_worker_history_gap_unrecovered") == 0


def test_a_snapshot_that_stops_short_is_applied_and_the_loss_unrecovered(tmp_path: Path) -> None:
    catch_up, broker, server, reader, _ = lost_range(tmp_path, WorkerMetrics())
    reader.answer(snapshot(20, 0.0, (request("old:1", time.time()),)).encode())
    assert submitted_images(server) == ["docker.io/library/old:1"], "applied anyway"
    server.answer_all()
    broker.run_later()
    assert broker.readings[-1].start == 40, "from the first entry left"
    assert catch_up.status().history_gap is HistoryGap.UNRECOVERED


@pytest.mark.parametrize(
    ("body", "why"), [(None, None), (None, "no stream port"), (b"{broken", None)]
)
def test_no_snapshot_to_read_is_unrecovered(
    tmp_path: Path, body: bytes | None, why: str | None
) -> None:
    catch_up, broker, server, reader, _ = lost_range(tmp_path, WorkerMetrics())
    reader.answer(body, why)
    assert (server.submitted, broker.readings[-1].start) == ([], 40)
    assert catch_up.status().history_gap is HistoryGap.UNRECOVERED


def test_a_snapshot_read_for_an_earlier_connection_is_dropped(tmp_path: Path) -> None:
    catch_up, _broker, server, reader, _ = lost_range(tmp_path, WorkerMetrics())
    catch_up.on_disconnect()
    reader.answer(snapshot(40, 0.0, (request("lost:1", time.time()),)).encode())
    assert (server.submitted, catch_up.phase) == ([], Phase.DISCONNECTED)


def new_node(
    tmp_path: Path, metrics: WorkerMetrics, end: int = 99
) -> tuple[CatchUp, FakeBroker, RecordingServer, DesiredReader]:
    """A node with no saved place, connecting to a history that ends at ``end``."""
    broker, server, reader = FakeBroker(tail=True), RecordingServer(), DesiredReader()
    catch_up = CatchUp(
        "n",
        Ledger(OffsetStore(tmp_path)),
        server,
        broker,
        3600,
        observer=metrics,
        read_desired=reader,
        sweep_delay=3600,
    )
    catch_up.on_connect()
    broker.tail_read(end)
    assert catch_up.phase is Phase.RECONCILING and not catch_up.status().caught_up
    assert (server.submitted, broker.readings, len(reader.asked)) == ([], [], 1)
    return catch_up, broker, server, reader


def test_a_new_node_applies_the_snapshot_then_replays_only_the_history_after_it(
    tmp_path: Path,
) -> None:
    metrics = WorkerMetrics()
    catch_up, broker, server, reader = new_node(tmp_path, metrics)
    now = time.time()
    reader.answer(snapshot(97, 0.0, (request("a:1", now), request("b:1", now))).encode())
    assert submitted_images(server) == ["docker.io/library/a:1", "docker.io/library/b:1"]
    server.answer_all(Status.PULLED)
    broker.run_later()
    assert [reading.start for reading in broker.readings] == [97], "not from the first entry"
    broker.deliver(request_body("b:1"), 97)  # the entry the snapshot reaches: done already
    assert server.submitted == []
    broker.deliver(request_body("c:1"), 98)
    broker.deliver(request_body("d:1"), 99)
    assert submitted_images(server) == ["docker.io/library/c:1", "docker.io/library/d:1"]
    server.answer_all()
    broker.run_later()
    status = catch_up.status()
    assert (status.caught_up, status.history_gap, status.history_offset) == (
        True,
        HistoryGap.NONE,
        99,
    )
    assert (
        metrics.registry.get_sample_value("puller_worker_history_started_from_desired_total") == 1
    )


def test_a_new_node_whose_snapshot_reaches_the_end_reads_one_entry(tmp_path: Path) -> None:
    catch_up, broker, server, reader = new_node(tmp_path, WorkerMetrics())
    reader.answer(snapshot(99, 0.0, (request("a:1", time.time()),)).encode())
    server.answer_all()
    broker.run_later()
    assert [reading.start for reading in broker.readings] == [99]
    broker.deliver(request_body("z:1"), 99)  # that entry itself: nothing more to replay
    assert server.submitted == []
    assert catch_up.status().caught_up and catch_up.status().history_offset == 99


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (None, "no snapshot"),
        (b"{broken", "unreadable"),
        (snapshot(97, time.time() - 60).encode(), "complete only for the last minute"),
        (
            DesiredState(time.time(), "keeper-node", 60.0, 97, 0.0, ()).encode(),
            "a keeper whose window is a minute, this node's an hour",
        ),
        (snapshot(120).encode(), "beyond the end: from a stream deleted since"),
    ],
)
def test_a_new_node_replays_the_whole_history_when_no_snapshot_stands_for_it(
    tmp_path: Path, answer: bytes | None, why: str
) -> None:
    metrics = WorkerMetrics()
    catch_up, broker, server, reader = new_node(tmp_path, metrics)
    reader.answer(answer)
    assert server.submitted == [], why
    assert [reading.start for reading in broker.readings] == ["first"], why
    assert catch_up.status().history_gap is HistoryGap.NONE
    assert not metrics.registry.get_sample_value("puller_worker_history_started_from_desired_total")


def test_a_node_whose_place_is_from_a_deleted_stream_replays_the_new_one_from_its_start(
    tmp_path: Path,
) -> None:
    """Its place is beyond the new stream's end: the snapshot, written from the old stream,
    may be too; the node replays the new stream whole, as before."""
    OffsetStore(tmp_path).save(Place(500, entry_identity(request_body("old:1")), time.time()))
    broker, server, reader = FakeBroker(tail=True), RecordingServer(), DesiredReader()
    catch_up = CatchUp(
        "n", Ledger(OffsetStore(tmp_path)), server, broker, 3600, read_desired=reader
    )
    catch_up.on_connect()
    broker.tail_read(99)
    assert reader.asked == []
    assert [reading.start for reading in broker.readings] == ["first"]
    assert catch_up.status().history_gap is HistoryGap.UNRECOVERED


def test_a_new_node_without_a_desired_state_reader_replays_from_the_first_entry(
    tmp_path: Path,
) -> None:
    broker, server = FakeBroker(tail=True), RecordingServer()
    catch_up = CatchUp("n", Ledger(OffsetStore(tmp_path)), server, broker, 3600)
    catch_up.on_connect()
    broker.tail_read(99)
    assert [reading.start for reading in broker.readings] == ["first"]


# -- the keeper --------------------------------------------------------------------------------


class FakeLink:
    """Plays the connection's part for the keeper: the token, readings and publishes."""

    def __init__(self) -> None:
        self.on_token: Callable[[], None] | None = None
        self.newest: list[Callable[[bytes | None, str | None], None]] = []
        self.readings: list[tuple[str, int | str, OnEntry]] = []
        self.published: list[tuple[str, bytes, Callable[[bool], None]]] = []

    def consume_token(self, on_token: Callable[[], None]) -> None:
        self.on_token = on_token

    def read_stream(self, stream: str, start: int | str, on_entry: OnEntry) -> StreamRead:
        self.readings.append((stream, start, on_entry))
        return StreamRead()

    def read_newest(
        self, stream: str, on_found: Callable[[bytes | None, str | None], None]
    ) -> None:
        assert stream == topo.DESIRED_STREAM.name
        self.newest.append(on_found)

    def publish_confirmed(
        self, exchange: str, body: bytes, on_confirmed: Callable[[bool], None]
    ) -> None:
        self.published.append((exchange, body, on_confirmed))


def new_keeper() -> tuple[Keeper, FakeLink, list[Callable[[TailRead], None]]]:
    link, tails = FakeLink(), list[Callable[[TailRead], None]]()
    keeper = Keeper("k", link, tails.append, window=3600.0, interval=600.0)
    keeper.on_connect()
    return keeper, link, tails


def test_the_keeper_writes_only_with_the_token_and_merges_the_history_after_the_snapshot() -> None:
    keeper, link, tails = new_keeper()
    keeper.tick()
    assert link.newest == [], "no token, no round"
    assert link.on_token is not None
    link.on_token()
    keeper.tick()
    now = time.time()
    old, stale = request("a:1", now - 100), request("gone:1", now - 7200)
    link.newest.pop()(snapshot(9, 0.0, (old, stale)).encode(), None)
    tails.pop()(TailRead(12))
    stream, start, on_entry = link.readings.pop()
    assert (stream, start) == (topo.HISTORY_STREAM_NAME, 9)
    on_entry(9, old.encode())  # the snapshot's own last entry: already in
    newer = request("a:1", now - 10)
    on_entry(11, newer.encode())
    on_entry(12, request("b:1", now - 5).encode())
    exchange, body, confirmed = link.published.pop()
    state = DesiredState.decode(body)
    assert (exchange, state.through_offset, state.complete_since, state.written_by) == (
        topo.DESIRED.name,
        12,
        0.0,
        "k",
    )
    assert [str(r.image) for r in state.requests] == [
        "docker.io/library/a:1",
        "docker.io/library/b:1",
    ], "the newest per image, what left the window dropped"
    assert state.requests[0] == newer
    confirmed(True)
    keeper.tick()
    assert link.newest == [], "the next round waits for the interval"


def test_the_keeper_writes_nothing_when_the_history_did_not_move() -> None:
    keeper, link, tails = new_keeper()
    assert link.on_token is not None
    link.on_token()
    keeper.tick()
    link.newest.pop()(snapshot(12).encode(), None)
    tails.pop()(TailRead(12))
    assert (link.readings, link.published) == ([], [])


def test_a_keeper_that_finds_the_history_lost_entries_says_from_when_it_is_complete() -> None:
    keeper, link, tails = new_keeper()
    assert link.on_token is not None
    link.on_token()
    keeper.tick()
    link.newest.pop()(None, None)  # the first snapshot: from the whole history
    tails.pop()(TailRead(30))
    _stream, start, on_entry = link.readings.pop()
    assert start == "first"
    survivor = request("s:1", time.time() - 50)
    on_entry(20, survivor.encode())  # the stream's first entry left is not at its start
    on_entry(30, request("t:1", time.time()).encode())
    state = DesiredState.decode(link.published.pop()[1])
    assert state.complete_since == survivor.requested_at
    assert state.through_offset == 30


def test_the_token_is_forgotten_with_the_connection() -> None:
    keeper, link, _ = new_keeper()
    first_token = link.on_token
    assert first_token is not None
    keeper.on_disconnect()
    first_token()  # handed over late, for the old connection
    assert not keeper.holding
    keeper.on_connect()
    assert link.on_token is not None
    link.on_token()
    assert keeper.holding


def test_a_snapshot_beyond_the_end_leaves_nothing_to_replay_and_keeps_its_place(
    tmp_path: Path,
) -> None:
    catch_up, broker, server, reader, _ = lost_range(tmp_path, WorkerMetrics())
    lost = request("lost:1", time.time())
    reader.answer(snapshot(41, 0.0, (lost,)).encode())
    server.answer_all()
    readings = len(broker.readings)
    broker.run_later()
    assert len(broker.readings) == readings, "nothing after the snapshot to read"
    status = catch_up.status()
    assert (status.caught_up, status.history_gap) == (True, HistoryGap.RECOVERED)
    assert OffsetStore(tmp_path).load() == Place(41, None, lost.requested_at)


def test_a_reconciling_pull_cancelled_by_shutdown_is_not_recovered(tmp_path: Path) -> None:
    catch_up, broker, server, reader, _ = lost_range(tmp_path, WorkerMetrics())
    reader.answer(snapshot(41, 0.0, (request("lost:1", time.time()),)).encode())
    [(lost, answer)] = server.submitted
    answer(
        NodeResult.failure(
            lost.request_id, "n", str(lost.image), ErrorKind.CANCELLED, "stopping", 0.1
        )
    )
    broker.run_later()
    assert catch_up.status().history_gap is HistoryGap.UNRECOVERED
    assert OffsetStore(tmp_path).load() == Place(5, ANY, ANY), "the place stays before it"
