"""The catch-up ledger and its state file, and the health answers, without services."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from contract import PullRequest, parse_reference
from worker.broker import Delivery, HistoryConsumer
from worker.catch_up import (
    STATE_FILE,
    CannotKeepState,
    CatchUp,
    CatchUpStatus,
    Ledger,
    OffsetStore,
    ReplayChannel,
)
from worker.health import HealthServer, Liveness


def test_the_saved_offset_advances_only_over_entries_done_in_order(tmp_path: Path) -> None:
    ledger = Ledger(OffsetStore(tmp_path))
    assert ledger.start_offset() == "first"
    for offset in (10, 11, 12):
        ledger.delivered(offset)
    ledger.done(12)
    ledger.done(11)
    assert ledger.committed is None, "10 is not done: a restart must replay it"
    ledger.done(10)
    assert ledger.committed == 12
    assert ledger.in_hand == 0
    assert Ledger(OffsetStore(tmp_path)).start_offset() == 13


def test_a_restart_forgets_what_was_in_hand_but_not_what_was_saved(tmp_path: Path) -> None:
    ledger = Ledger(OffsetStore(tmp_path))
    ledger.delivered(0)
    ledger.done(0)
    ledger.delivered(1)
    ledger.restart()
    assert (ledger.in_hand, ledger.start_offset()) == (0, 1)


@pytest.mark.parametrize("content", ["not json", '{"offset": -1}', '{"offset": true}', "[]"])
def test_a_damaged_state_file_means_replaying_the_window(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert Ledger(OffsetStore(tmp_path)).start_offset() == "first"


def test_a_state_dir_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CannotKeepState, match="PULLER_STATE_DIR"):
        OffsetStore(tmp_path / "a-file" / "state")


def health(status: CatchUpStatus) -> HealthServer:
    server = HealthServer(0, Liveness(), lambda: status)
    server.stop()  # answer() needs no running server
    return server


def status(connected: bool, caught_up: bool) -> CatchUpStatus:
    return CatchUpStatus(connected, caught_up, pending=2, failed=0, committed_offset=5)


def test_ready_only_when_connected_and_caught_up() -> None:
    code, body = health(status(True, True)).answer("/ready")
    assert (code, body["ready"], body["reason"]) == (200, True, "connected and caught up")
    code, body = health(status(True, False)).answer("/ready")
    assert (code, body["ready"]) == (503, False)
    assert "catching up" in str(body["reason"]) and "2 in hand" in str(body["reason"])
    code, body = health(status(False, False)).answer("/ready")
    assert (code, body["reason"]) == (503, "not connected to RabbitMQ")


def test_alive_while_the_loop_turns_and_unknown_paths_say_so() -> None:
    server = health(status(False, False))
    assert server.answer("/alive")[0] == 200
    code, body = server.answer("/metrics")
    assert code == 404 and "/ready" in str(body["error"])


class FakeBroker:
    """Records what catch-up asks of the broker; no AMQP."""

    def __init__(self) -> None:
        self.readings: list[HistoryConsumer] = []
        self.acked: list[int | None] = []
        self.stops = 0

    def call_soon(self, callback: Callable[[], None]) -> None:
        callback()

    def ack(self, delivery: Delivery) -> None:
        self.acked.append(delivery.history_offset)

    def consume_history(self, history: HistoryConsumer) -> None:
        self.readings.append(history)

    def stop_history(self) -> None:
        self.stops += 1


class RefusingServer:
    def accept(self, request: PullRequest, delivery: Delivery, channel: ReplayChannel) -> None:
        raise AssertionError(f"nothing should be replayed here, got {request}")


def entry(body: bytes, offset: int) -> Delivery:
    return Delivery(body, offset + 1, None, None, None, 1, history_offset=offset)


def test_caught_up_at_its_marker_then_checkpoints_only_when_idle_and_fed(tmp_path: Path) -> None:
    broker = FakeBroker()
    catch_up = CatchUp(
        "n", Ledger(OffsetStore(tmp_path)), RefusingServer(), broker, 3600, checkpoint_interval=0
    )
    reading = catch_up.on_connect()
    assert reading.start == "first"
    assert not catch_up.status().caught_up
    reading.on_entry(entry(reading.marker, 0))
    assert catch_up.status().caught_up
    assert broker.stops == 1, "the history is not read once caught up"

    catch_up.checkpoint_if_due(unanswered=0)
    assert len(broker.readings) == 0, "nothing came live: no checkpoint needed"
    request = PullRequest.new(parse_reference("a:1"))
    catch_up.note_live(request)
    catch_up.checkpoint_if_due(unanswered=1)
    assert len(broker.readings) == 0, "a request is unanswered: not idle"
    catch_up.checkpoint_if_due(unanswered=0)
    (checkpoint,) = broker.readings
    assert checkpoint.start == "last"
    checkpoint.on_entry(entry(request.encode(), 6))  # served live: not replayed
    checkpoint.on_entry(entry(checkpoint.marker, 7))
    assert broker.stops == 2
    assert broker.acked == [0, 6, 7]
    assert Ledger(OffsetStore(tmp_path)).start_offset() == 8
