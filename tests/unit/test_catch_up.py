"""The catch-up ledger, its state file and its phases, without services."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from contract import (
    ErrorKind,
    HistoryGap,
    HistoryMarker,
    NodeResult,
    PullRequest,
    Status,
    parse_reference,
)
from serving.http import Request, json_response
from worker.broker import HistoryReading, TailRead
from worker.broker.delivery import Delivery
from worker.catch_up.attempts import ATTEMPTS_FILE, ReplayAttempts
from worker.catch_up.ledger import (
    STATE_FILE,
    CannotKeepState,
    Ledger,
    OffsetStore,
    Place,
    entry_identity,
    lost_entries,
)
from worker.catch_up.replay import CatchUp
from worker.catch_up.status import Phase
from worker.health import HealthServer
from worker.metrics import WorkerMetrics
from worker.pulls.answers import AnswerCallback, ProgressCallback


def test_the_saved_place_advances_only_over_entries_done_in_order(tmp_path: Path) -> None:
    ledger = Ledger(OffsetStore(tmp_path))
    assert ledger.committed is None
    for offset in (10, 11, 12):
        ledger.delivered(offset, f"id{offset}")
    ledger.done(12)
    ledger.done(11)
    assert ledger.committed is None, "10 is not done: a restart must replay it"
    ledger.done(10)
    assert ledger.committed == Place(12, "id12")
    assert ledger.in_hand == 0
    assert Ledger(OffsetStore(tmp_path)).committed == Place(12, "id12")


def test_a_restart_forgets_what_was_in_hand_but_not_what_was_saved(tmp_path: Path) -> None:
    ledger = Ledger(OffsetStore(tmp_path))
    ledger.delivered(0, "a")
    ledger.done(0)
    ledger.delivered(1, "b")
    ledger.restart()
    assert (ledger.in_hand, ledger.committed_offset) == (0, 0)


def test_forgetting_the_place_removes_the_state_file(tmp_path: Path) -> None:
    ledger = Ledger(OffsetStore(tmp_path))
    ledger.jump(Place(7, "x"))
    ledger.forget_place()
    assert ledger.committed is None
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize(
    "content", ["not json", '{"offset": -1}', '{"offset": true}', "[]", '{"identity": "x"}']
)
def test_a_damaged_state_file_means_replaying_the_window(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert Ledger(OffsetStore(tmp_path)).committed is None


def test_an_older_state_file_without_identity_is_still_read(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"offset": 41, "saved_at": 1.0}))
    assert Ledger(OffsetStore(tmp_path)).committed == Place(41, None)


def test_a_state_dir_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CannotKeepState, match="PULLER_STATE_DIR"):
        OffsetStore(tmp_path / "a-file" / "state")


def get(path: str) -> Request:
    return Request("GET", path, "", {}, b"")


def test_the_health_server_answers_its_routes_and_names_them_for_unknown_paths() -> None:
    server = HealthServer(0, {"/alive": lambda: json_response(200, {"alive": True})})
    server.stop()  # answer() needs no running server
    assert server.answer(get("/alive")).status == 200
    missing = server.answer(get("/nope"))
    assert missing.status == 404 and b"GET /alive" in missing.body
    assert server.answer(Request("POST", "/alive", "", {}, b"")).status == 404


class FakeBroker:
    """Records what catch-up asks of the broker; no AMQP. Each reading is its own source.
    ``tail``: where the history ends as the stream protocol reads it (kept until the test
    hands it over with :meth:`tail_read`); without it, that read fails at once, and
    catch-up falls back to a marker."""

    def __init__(self, tail: bool = False) -> None:
        self.readings: list[HistoryReading] = []
        self.acked: list[int | None] = []
        self.stops = 0
        self.later: list[Callable[[], None]] = []
        self.tail = tail
        self.tail_asked: list[Callable[[TailRead], None]] = []

    def find_tail(self, on_tail: Callable[[TailRead], None]) -> None:
        if self.tail:
            self.tail_asked.append(on_tail)
        else:
            on_tail(TailRead(None, "the fake broker has no stream port"))

    def tail_read(self, offset: int | None) -> None:
        self.tail_asked.pop(0)(TailRead(offset))

    def read_history(self, reading: HistoryReading) -> None:
        self.readings.append(reading)

    def stop_history(self) -> None:
        self.stops += 1

    def answer(self, delivery: Delivery, result: NodeResult | None) -> None:
        self.acked.append(delivery.history_offset)

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.later.append(callback)

    def is_current(self, delivery: Delivery) -> bool:
        return delivery.source is self.readings[-1]

    def run_later(self) -> None:
        while self.later:
            self.later.pop(0)()

    def deliver(self, body: bytes, offset: int) -> None:
        reading = self.readings[-1]
        reading.on_entry(Delivery(body, offset + 1, None, None, reading, history_offset=offset))


class RecordingServer:
    def __init__(self) -> None:
        self.submitted: list[tuple[PullRequest, AnswerCallback]] = []

    def submit(
        self,
        request: PullRequest,
        answer: AnswerCallback,
        progress: ProgressCallback | None = None,
        *,
        asked_by: str | None = None,
        live: bool = True,
    ) -> None:
        assert not live, "replayed requests are not live"
        self.submitted.append((request, answer))

    def answer_all(self, status: Status = Status.PULLED) -> None:
        for request, answer in self.submitted:
            answer(NodeResult(request.request_id, "n", str(request.image), status, 0.1))
        self.submitted.clear()


def new_catch_up(
    tmp_path: Path, tail: bool = False, observer: WorkerMetrics | None = None
) -> tuple[CatchUp, FakeBroker, RecordingServer]:
    """Catch-up with checkpoints and its sweep due at once; ``tail``: the stream protocol
    reads where the history ends (else catch-up falls back to a marker)."""
    broker, server = FakeBroker(tail), RecordingServer()
    catch_up = CatchUp(
        "n",
        Ledger(OffsetStore(tmp_path)),
        server,
        broker,
        3600,
        checkpoint_interval=0,
        observer=observer,
        sweep_delay=0,
    )
    return catch_up, broker, server


def find_end(catch_up: CatchUp, broker: FakeBroker, end: int) -> None:
    """Plays the broker's part in FINDING_END: the last chunk, then the marker at ``end``."""
    reading = broker.readings[-1]
    assert (catch_up.phase, reading.start) == (Phase.FINDING_END, "last")
    assert reading.marker is not None
    broker.deliver(reading.marker, end)


def marker_body() -> bytes:
    """Another node's marker: an entry done as soon as it is read."""
    return HistoryMarker("another-node", uuid.uuid4().hex).encode()


def request_body(image: str = "a:1") -> bytes:
    return PullRequest.new(parse_reference(image)).encode()


def test_a_new_node_replays_from_the_first_entry_up_to_the_end(tmp_path: Path) -> None:
    catch_up, broker, server = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=2)
    assert (catch_up.phase, broker.readings[-1].start) == (Phase.REPLAYING, "first")
    first, second = request_body("a:1"), request_body("b:1")
    broker.deliver(first, 0)
    broker.deliver(second, 1)
    assert len(server.submitted) == 2
    assert catch_up.status().replay_pending == 2
    server.answer_all()
    broker.run_later()
    assert not catch_up.status().caught_up, "the end (offset 2) is not read yet"
    broker.deliver(marker_body(), 2)  # an entry like any other in a replay
    status = catch_up.status()
    assert (status.caught_up, status.history_offset, status.replay_pending) == (True, 2, 0)
    assert broker.stops >= 1, "the history is not read once caught up"


def test_caught_up_then_checkpoints_only_when_idle_and_fed(tmp_path: Path) -> None:
    catch_up, broker, _ = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=0)
    broker.deliver(marker_body(), 0)
    assert catch_up.phase is Phase.CAUGHT_UP
    sweep_nothing(catch_up, broker, last=0)
    readings = len(broker.readings)

    catch_up.checkpoint_if_due(unanswered=0)
    assert len(broker.readings) == readings, "nothing came live: no checkpoint needed"
    request = PullRequest.new(parse_reference("a:1"))
    catch_up.note_live(request)
    catch_up.checkpoint_if_due(unanswered=1)
    assert len(broker.readings) == readings, "a request is unanswered: not idle"
    catch_up.checkpoint_if_due(unanswered=0)
    checkpoint = broker.readings[-1]
    assert (catch_up.phase, checkpoint.start) == (Phase.CHECKPOINTING, "last")
    assert checkpoint.marker is None, "a checkpoint writes nothing into the history"
    assert catch_up.status().caught_up
    broker.deliver(request.encode(), 6)  # the first entry of the last chunk
    assert catch_up.phase is Phase.CAUGHT_UP
    assert Ledger(OffsetStore(tmp_path)).committed == Place(
        6, entry_identity(request.encode()), request.requested_at
    )
    broker.deliver(request_body("later:1"), 7)
    assert catch_up.status().history_offset == 6, "the reading ended at its first entry"


def sweep_nothing(catch_up: CatchUp, broker: FakeBroker, last: int) -> None:
    """Plays the connection's sweep when nothing came after the end: the place it reads up
    to is the one already done."""
    catch_up.checkpoint_if_due(unanswered=0)
    reading = broker.readings[-1]
    assert (catch_up.phase, reading.start, reading.marker) == (Phase.SWEEPING, "last", None)
    broker.deliver(request_body("last:1"), last)
    assert catch_up.phase is Phase.CAUGHT_UP


def test_a_restart_resumes_at_its_place_and_checks_the_entry_there(tmp_path: Path) -> None:
    body = request_body()
    OffsetStore(tmp_path).save(Place(5, entry_identity(body)))
    catch_up, broker, server = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=9)
    assert broker.readings[-1].start == 5
    broker.deliver(body, 5)  # the saved entry itself: done already
    assert server.submitted == []
    broker.deliver(request_body("new:1"), 6)
    assert len(server.submitted) == 1


@pytest.mark.parametrize("saved_offset", [9, 40])
def test_a_place_beyond_the_end_of_a_recreated_stream_starts_again_from_the_first(
    tmp_path: Path, saved_offset: int
) -> None:
    OffsetStore(tmp_path).save(Place(saved_offset, "old"))
    catch_up, broker, server = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=3)
    assert (catch_up.phase, broker.readings[-1].start) == (Phase.REPLAYING, "first")
    assert not (tmp_path / STATE_FILE).exists()
    for offset in range(3):
        broker.deliver(request_body(f"x{offset}:1"), offset)
    server.answer_all()
    broker.run_later()
    broker.deliver(marker_body(), 3)
    assert catch_up.status().caught_up


def test_a_place_holding_another_entry_means_a_recreated_stream(tmp_path: Path) -> None:
    OffsetStore(tmp_path).save(Place(2, entry_identity(request_body("was-here:1"))))
    catch_up, broker, server = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=8)
    assert broker.readings[-1].start == 2
    broker.deliver(request_body("someone-else:1"), 2)
    restarted = broker.readings[-1]
    assert (catch_up.phase, restarted.start) == (Phase.REPLAYING, "first")
    assert server.submitted == [], "nothing from the abandoned reading was replayed"


def test_answers_from_an_earlier_reading_do_not_count(tmp_path: Path) -> None:
    catch_up, broker, server = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=5)
    broker.deliver(request_body(), 0)
    catch_up.on_disconnect()
    catch_up.on_connect()  # a new connection: a new reading
    server.answer_all()  # the old entry's pull finishes now
    broker.run_later()
    assert catch_up.status().history_offset is None


def test_a_cancelled_replay_does_not_advance_the_place(tmp_path: Path) -> None:
    catch_up, broker, server = new_catch_up(tmp_path)
    catch_up.on_connect()
    find_end(catch_up, broker, end=5)
    broker.deliver(request_body(), 0)
    request, answer = server.submitted.pop()
    answer(
        NodeResult.failure(
            request.request_id, "n", str(request.image), ErrorKind.CANCELLED, "stopping", 0.1
        )
    )
    broker.run_later()
    assert catch_up.status().history_offset is None
    assert catch_up.status().replay_failed == 0


# -- entries that stop the worker ----------------------------------------------------------------


def worker_run(tmp_path: Path) -> tuple[CatchUp, FakeBroker, RecordingServer, WorkerMetrics]:
    """One run of a worker: its catch-up over the node's state directory, connected and
    replaying from its saved place (the stream ends at offset 50)."""
    broker, server, metrics = FakeBroker(), RecordingServer(), WorkerMetrics()
    catch_up = CatchUp(
        "n",
        Ledger(OffsetStore(tmp_path)),
        server,
        broker,
        3600,
        observer=metrics,
        attempts=ReplayAttempts(tmp_path),
    )
    catch_up.on_connect()
    find_end(catch_up, broker, end=50)
    return catch_up, broker, server, metrics


def submitted_images(server: RecordingServer) -> list[str]:
    return [str(request.image) for request, _ in server.submitted]


def skipped(metrics: WorkerMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "puller_worker_replay_skipped_total", {"reason": "stopped_the_worker"}
    )
    return value or 0.0


def test_an_entry_in_hand_each_time_the_worker_died_is_skipped_on_the_third_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    poison, after = request_body("poison:1"), request_body("after:1")
    for run in (1, 2):
        _, broker, server, metrics = worker_run(tmp_path)
        broker.deliver(poison, 0)
        assert submitted_images(server) == ["docker.io/library/poison:1"], f"run {run}"
        # ... and the worker dies with it in hand (nothing answered, nothing closed)
    catch_up, broker, server, metrics = worker_run(tmp_path)
    broker.deliver(poison, 0)
    assert server.submitted == []
    assert skipped(metrics) == 1
    assert "skipped a history entry" in capsys.readouterr().out
    assert catch_up.status().history_offset == 0, "skipped counts as done: the place moves on"
    broker.deliver(after, 1)
    assert submitted_images(server) == ["docker.io/library/after:1"]
    server.answer_all()
    broker.run_later()
    assert catch_up.status().history_offset == 1
    assert ReplayAttempts(tmp_path).suspects == 0


def test_a_suspect_is_worked_alone_so_that_its_neighbour_is_not_blamed(tmp_path: Path) -> None:
    poison, neighbour, later = request_body("poison:1"), request_body("q:1"), request_body("r:1")
    _, broker, server, _ = worker_run(tmp_path)
    broker.deliver(poison, 0)
    broker.deliver(neighbour, 1)
    assert len(server.submitted) == 2  # both in hand when the worker dies

    # Second run: both are suspects; the first is worked alone, the others wait.
    _, broker, server, _ = worker_run(tmp_path)
    broker.deliver(poison, 0)
    broker.deliver(neighbour, 1)
    broker.deliver(later, 2)
    assert submitted_images(server) == ["docker.io/library/poison:1"]
    # ... and it kills the worker again, alone.

    catch_up, broker, server, metrics = worker_run(tmp_path)
    broker.deliver(poison, 0)
    broker.deliver(neighbour, 1)
    broker.deliver(later, 2)
    assert skipped(metrics) == 1
    assert submitted_images(server) == ["docker.io/library/q:1"], "the neighbour runs alone"
    server.answer_all()
    broker.run_later()
    assert submitted_images(server) == ["docker.io/library/r:1"], "then the rest"
    server.answer_all()
    broker.run_later()
    assert catch_up.status().history_offset == 2


def test_entries_behind_a_suspect_wait_for_it_and_it_waits_for_those_before_it(
    tmp_path: Path,
) -> None:
    first, suspect, third = request_body("a:1"), request_body("s:1"), request_body("c:1")
    _, broker, server, _ = worker_run(tmp_path)
    broker.deliver(suspect, 1)  # in hand when the worker dies (a new reading starts later)
    catch_up, broker, server, _ = worker_run(tmp_path)
    broker.deliver(first, 0)
    broker.deliver(suspect, 1)
    broker.deliver(third, 2)
    assert submitted_images(server) == ["docker.io/library/a:1"]
    server.answer_all()
    broker.run_later()
    assert submitted_images(server) == ["docker.io/library/s:1"]
    server.answer_all()
    broker.run_later()
    assert submitted_images(server) == ["docker.io/library/c:1"]
    server.answer_all()
    broker.run_later()
    assert catch_up.status().history_offset == 2


def test_a_stop_the_worker_chose_does_not_count_against_the_entries_in_hand(
    tmp_path: Path,
) -> None:
    body = request_body("long:1")
    for _ in range(3):
        catch_up, broker, server, metrics = worker_run(tmp_path)
        broker.deliver(body, 0)
        assert submitted_images(server) == ["docker.io/library/long:1"]
        catch_up.close()  # SIGTERM: drained and stopped
    assert skipped(metrics) == 0
    assert ReplayAttempts(tmp_path).suspects == 0


def test_an_entry_done_is_crossed_off(tmp_path: Path) -> None:
    _, broker, server, _ = worker_run(tmp_path)
    broker.deliver(request_body("a:1"), 0)
    assert ReplayAttempts(tmp_path).suspects == 1  # written down before it was worked
    request, answer = server.submitted.pop()
    answer(NodeResult.failure(request.request_id, "n", "a:1", ErrorKind.NOT_FOUND, "no", 0.1))
    broker.run_later()
    assert ReplayAttempts(tmp_path).suspects == 0


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"entries": {}}',
        '{"entries": [{"offset": 1, "identity": "x", "starts": Infinity}]}',
        '{"entries": [{"offset": true, "identity": "x", "starts": 1}]}',
    ],
)
def test_a_damaged_list_of_entries_in_hand_suspects_nothing(tmp_path: Path, content: str) -> None:
    (tmp_path / ATTEMPTS_FILE).write_text(content)
    assert ReplayAttempts(tmp_path).suspects == 0


def test_a_replay_works_at_most_its_limit_at_once_whatever_the_stream_delivers(
    tmp_path: Path,
) -> None:
    broker, server = FakeBroker(), RecordingServer()
    catch_up = CatchUp("n", Ledger(OffsetStore(tmp_path)), server, broker, 3600, working_limit=1)
    catch_up.on_connect()
    find_end(catch_up, broker, end=3)
    for offset in range(3):  # a whole chunk at once, beyond the prefetch
        broker.deliver(request_body(f"i{offset}:1"), offset)
    for offset in range(3):
        assert submitted_images(server) == [f"docker.io/library/i{offset}:1"]
        assert catch_up.status().replay_pending == 3 - offset
        server.answer_all()
        broker.run_later()
    assert catch_up.status().history_offset == 2


# -- the end read over the stream protocol, the sweep, the gap rule -----------------------------


@pytest.mark.parametrize(
    ("saved", "first", "same", "lost"),
    [
        (10, 10, True, 0),  # the saved entry itself: nothing lost
        (10, 10, False, None),  # another entry there: the stream was recreated
        (10, 11, True, 0),  # the next entry
        (10, 12, True, 0),  # the next segment's first entry, after its own chunk
        (10, 13, True, 1),
        (44, 91, True, 45),  # whole segments dropped
        (10, 4, True, None),  # before the saved place: another stream
    ],
)
def test_the_gap_rule(saved: int, first: int, same: bool, lost: int | None) -> None:
    assert lost_entries(saved, first, same) == lost


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"puller_worker_{name}", labels) or 0.0


def test_the_end_read_over_the_stream_protocol_writes_nothing_and_the_sweep_serves_the_rest(
    tmp_path: Path,
) -> None:
    metrics = WorkerMetrics()
    catch_up, broker, server = new_catch_up(tmp_path, tail=True, observer=metrics)
    catch_up.on_connect()
    assert (catch_up.phase, broker.readings) == (Phase.FINDING_END, []), "read off the thread"
    broker.tail_read(1)
    assert (catch_up.phase, broker.readings[-1].start) == (Phase.REPLAYING, "first")
    broker.deliver(request_body("a:1"), 0)
    broker.deliver(request_body("b:1"), 1)
    server.answer_all()
    broker.run_later()
    assert catch_up.status().caught_up

    # Meanwhile: one request served live, one whose live copy never came (bound too late).
    live = PullRequest.new(parse_reference("live:1"))
    catch_up.note_live(live)
    catch_up.checkpoint_if_due(unanswered=0)  # the sweep: first, where the stream ends now
    assert catch_up.phase is Phase.SWEEPING and catch_up.status().caught_up
    missed = request_body("missed:1")
    broker.deliver(missed, 3)
    assert broker.readings[-1].start == 2, "from the committed place on"
    broker.deliver(live.encode(), 2)
    broker.deliver(missed, 3)
    assert submitted_images(server) == ["docker.io/library/missed:1"]
    server.answer_all()
    broker.run_later()
    assert (catch_up.status().phase, catch_up.status().history_offset) == ("caught up", 3)
    assert all(reading.marker is None for reading in broker.readings), "nothing written"
    assert sample(metrics, "history_tail_reads_total", outcome="tail") == 1
    assert sample(metrics, "history_sweeps_total") == 1
    assert sample(metrics, "history_deliveries_total") == 5  # 2 + the sweep's 1 + 2
    catch_up.checkpoint_if_due(unanswered=0)
    assert catch_up.status().phase == Phase.CHECKPOINTING.value, "one sweep, then checkpoints"


def test_a_node_that_missed_nothing_reads_one_entry(tmp_path: Path) -> None:
    body = request_body()
    OffsetStore(tmp_path).save(Place(5, entry_identity(body)))
    catch_up, broker, server = new_catch_up(tmp_path, tail=True)
    catch_up.on_connect()
    broker.tail_read(5)
    assert broker.readings[-1].start == 5
    broker.deliver(body, 5)
    assert catch_up.status().caught_up
    assert (server.submitted, catch_up.status().history_gap) == ([], HistoryGap.NONE)


def test_a_history_that_lost_the_nodes_range_is_reported_and_the_rest_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = request_body()
    OffsetStore(tmp_path).save(Place(5, entry_identity(body)))
    metrics = WorkerMetrics()
    catch_up, broker, server = new_catch_up(tmp_path, tail=True, observer=metrics)
    catch_up.on_connect()
    broker.tail_read(40)
    broker.deliver(request_body("left:1"), 40)  # 6..39 are gone
    assert catch_up.status().history_gap is HistoryGap.UNRECOVERED, "no desired state here"
    assert broker.readings[-1].start == 40, "read again from the first entry left"
    broker.deliver(request_body("left:1"), 40)
    assert submitted_images(server) == ["docker.io/library/left:1"], "what is left is replayed"
    server.answer_all()
    broker.run_later()
    status = catch_up.status()
    assert (status.caught_up, status.history_gap, status.history_lost) == (
        True,
        HistoryGap.UNRECOVERED,
        33,
    )
    assert sample(metrics, "history_lost_entries_total") == 33
    assert sample(metrics, "history_gaps_total", outcome="unrecovered") == 1
    assert sample(metrics, "history_gap_unrecovered") == 1
    assert "the history lost 33 entries this node had not replayed" in capsys.readouterr().out

    catch_up.on_disconnect()  # the next catch-up loses nothing: the gap is old news
    catch_up.on_connect()
    broker.tail_read(40)
    broker.deliver(request_body("left:1"), 40)
    assert catch_up.status().caught_up
    assert (catch_up.status().history_gap, sample(metrics, "history_gap_unrecovered")) == (
        HistoryGap.NONE,
        0,
    )


def test_an_empty_stream_after_a_saved_place_is_a_recreated_stream(tmp_path: Path) -> None:
    OffsetStore(tmp_path).save(Place(7, "old"))
    catch_up, broker, _ = new_catch_up(tmp_path, tail=True)
    catch_up.on_connect()
    broker.tail_read(None)
    status = catch_up.status()
    assert (status.caught_up, status.history_gap, broker.readings) == (
        True,
        HistoryGap.UNRECOVERED,
        [],
    )
    assert not (tmp_path / STATE_FILE).exists()


def test_an_end_read_for_an_earlier_connection_is_dropped(tmp_path: Path) -> None:
    catch_up, broker, _ = new_catch_up(tmp_path, tail=True)
    catch_up.on_connect()
    catch_up.on_disconnect()
    catch_up.on_connect()
    broker.tail_read(9)  # the first connection's read, handed over on the second
    assert (catch_up.phase, broker.readings) == (Phase.FINDING_END, [])
    broker.tail_read(3)
    assert (catch_up.phase, broker.readings[-1].start) == (Phase.REPLAYING, "first")


def test_without_the_stream_port_the_end_is_found_with_a_marker_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = WorkerMetrics()
    catch_up, broker, _ = new_catch_up(tmp_path, observer=metrics)
    catch_up.on_connect()
    find_end(catch_up, broker, end=0)
    assert catch_up.status().caught_up is False
    assert sample(metrics, "history_tail_reads_total", outcome="fallback") == 1
    assert "finding it with a marker instead" in capsys.readouterr().out
