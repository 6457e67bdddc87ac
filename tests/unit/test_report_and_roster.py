"""PullReport's verdicts, the roster built from presence announcements, the live view."""

from __future__ import annotations

import dataclasses
import io
import json

from contract import (
    ErrorKind,
    HistoryGap,
    NodeError,
    NodePresence,
    NodeProgress,
    NodeResult,
    NodeState,
    RosterMarker,
    Status,
    decode_presence_stream,
)
from publisher.cli import _catch_up_text
from publisher.live_view import LiveView
from publisher.report import PullReport
from publisher.roster import RosterBook


def result(node: str, status: Status) -> NodeResult:
    error = NodeError(ErrorKind.NOT_FOUND, "gone") if status is Status.FAILED else None
    return NodeResult("r", node, "img", status, 1.0, error=error)


def report(
    expected: int | None, *results: NodeResult, wanted: set[str] | None = None
) -> PullReport:
    return PullReport(
        "r", "img", tuple(results), expected, wanted=None if wanted is None else frozenset(wanted)
    )


def test_ok_only_when_every_expected_node_has_the_image() -> None:
    assert report(2, result("a", Status.PULLED), result("b", Status.PRESENT)).ok
    assert not report(3, result("a", Status.PULLED), result("b", Status.PRESENT)).ok
    assert not report(2, result("a", Status.PULLED), result("b", Status.FAILED)).ok
    assert not report(2, result("a", Status.PULLED), result("b", Status.NO_REPLY)).ok
    assert report(None, result("a", Status.PULLED)).ok
    assert not report(None).ok


def test_missing_counts_named_and_unnamed_silence() -> None:
    assert report(3, result("a", Status.PULLED)).missing == 2
    named = report(
        2,
        result("a", Status.PULLED),
        result("c", Status.PULLED),
        result("b", Status.NO_REPLY),
        wanted={"a", "b"},
    )
    assert named.missing == 1, "c answered but was not waited for"
    assert [r.node for r in named.no_reply] == ["b"]
    # waiting for a count: the roster's silent nodes are named, the count decides
    counted = report(2, result("a", Status.PULLED), result("b", Status.NO_REPLY))
    assert (counted.missing, [r.node for r in counted.no_reply]) == (1, ["b"])


def test_json_shape() -> None:
    shape = report(2, result("a", Status.PULLED), result("b", Status.FAILED)).to_json()
    assert set(shape) == {"request_id", "image", "expected", "ok", "missing", "nodes", "notes"}
    assert shape["nodes"][1]["error"] == {"kind": "not_found", "message": "gone"}
    assert set(shape["nodes"][0]) == {
        "node",
        "status",
        "seconds",
        "queued_seconds",
        "image_id",
        "digest",
        "error",
    }


def presence(node: str, sent_at: float, state: NodeState = NodeState.UP) -> NodePresence:
    return NodePresence(node, "0.1.0", "20.10", 100.0, sent_at, state)


def book_of(*announcements: NodePresence) -> RosterBook:
    """A book fed ``announcements`` in stream order, each seen when it was sent."""
    book = RosterBook()
    for announcement in announcements:
        book.add(announcement, seen=announcement.last_seen, horizon=0.0)
    return book


def test_the_roster_keeps_each_nodes_latest_announcement() -> None:
    book = book_of(
        presence("b", 1),
        presence("a", 2),
        presence("b", 3),
        presence("c", 4),
        presence("c", 5, NodeState.LEAVING),
    )
    assert [(i.node, i.last_seen) for i in book.roster(since=0.0)] == [("a", 2), ("b", 3)]


def test_a_node_that_comes_back_after_leaving_is_in_the_roster() -> None:
    book = book_of(presence("a", 1, NodeState.LEAVING), presence("a", 2))
    assert [i.node for i in book.roster(since=0.0)] == ["a"]


def test_the_presence_stream_holds_announcements_and_markers() -> None:
    assert decode_presence_stream(presence("a", 1).encode()) == presence("a", 1)
    assert decode_presence_stream(RosterMarker("m1").encode()) == RosterMarker("m1")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_view_redraws_one_row_per_node_in_place() -> None:
    screen = FakeTerminal()
    view = LiveView(screen, ["node-1", "node-2"], live=True)
    view.progress(NodeProgress("r", "node-1", "img", 5_000_000, 10_000_000))
    view.result(result("node-2", Status.PRESENT))
    view.close()
    frames = screen.getvalue().split("\x1b[2F")  # each redraw moves up over the 2 rows
    last = frames[-1]
    assert last.count("\n") == 2
    assert "node-1" in last
    assert "pulling" in last
    assert "5.0/10.0 MB" in last
    assert "############............" in last  # half the bar
    assert "present" in last


def test_the_plain_view_prints_progress_lines_only() -> None:
    out = io.StringIO()
    view = LiveView(out, ["node-1"], live=False)
    view.progress(NodeProgress("r", "node-1", "img", 1_000_000, 2_000_000))
    view.progress(NodeProgress("r", "node-1", "img", 1_500_000, 2_000_000))  # throttled
    view.result(result("node-1", Status.PULLED))
    view.close()
    assert out.getvalue() == "progress node-1 1.0/2.0 MB\n"


def test_progress_before_the_size_is_known_is_not_shown_and_small_sizes_read_well() -> None:
    out = io.StringIO()
    view = LiveView(out, ["node-1"], live=False)
    view.progress(NodeProgress("r", "node-1", "img", 0, 0))
    assert out.getvalue() == ""
    view.progress(NodeProgress("r", "node-1", "img", 180, 12_345))
    assert out.getvalue() == "progress node-1 0/12 kB\n"


def test_the_roster_json_is_the_presence_fields_by_name() -> None:
    shape = presence("a", 5).to_json()
    assert {
        "node",
        "version",
        "engine",
        "started_at",
        "last_seen",
        "caught_up",
        "replay_pending",
        "replay_failed",
    } <= set(shape)
    assert shape["last_seen"] == 5


def test_a_roster_book_keeps_each_nodes_latest_word_seen_since_when_asked() -> None:
    book = RosterBook()
    book.add(presence("a", 1), seen=10.0, horizon=0.0)
    book.add(presence("b", 2), seen=20.0, horizon=0.0)
    book.add(presence("b", 3, NodeState.LEAVING), seen=21.0, horizon=0.0)
    book.add(presence("c", 4), seen=22.0, horizon=0.0)
    assert [i.node for i in book.roster(since=0.0)] == ["a", "c"]
    assert [i.node for i in book.roster(since=15.0)] == ["c"]


def test_a_full_roster_book_forgets_old_nodes_then_turns_new_ones_away() -> None:
    book = RosterBook(max_nodes=2)
    book.add(presence("a", 1), seen=10.0, horizon=0.0)
    book.add(presence("b", 1), seen=20.0, horizon=0.0)
    book.add(presence("c", 1), seen=30.0, horizon=15.0)  # "a" is older than the horizon
    assert [i.node for i in book.roster(since=0.0)] == ["b", "c"]
    book.add(presence("d", 1), seen=31.0, horizon=15.0)  # nothing to forget
    book.add(presence("b", 2), seen=32.0, horizon=15.0)  # a node it has: always kept
    assert [(i.node, i.last_seen) for i in book.roster(since=0.0)] == [("b", 2), ("c", 1)]
    assert book.turned_away == 1


def test_a_roster_book_names_who_sent_the_most() -> None:
    book = RosterBook()
    assert book.busiest() is None
    for user in ["workers", "flooder", "flooder", None]:
        book.count(user)
    assert book.busiest() == ("flooder", 2)


def test_a_history_gap_goes_out_in_presence_and_puller_nodes_shows_it() -> None:
    sent = dataclasses.replace(
        presence("a", 5),
        caught_up=True,
        history_gap=HistoryGap.UNRECOVERED,
        history_lost=3456,
    )
    read = NodePresence.decode(sent.encode())
    assert (read.history_gap, read.history_lost) == (HistoryGap.UNRECOVERED, 3456)
    assert "LOST 3,456 history entries while away, not recovered" in _catch_up_text(read)
    for gap, said in [
        (HistoryGap.RECONCILING, "reconciling with"),
        (HistoryGap.RECOVERED, "recovered from"),
    ]:
        shown = _catch_up_text(dataclasses.replace(read, history_gap=gap))
        assert f"lost 3,456 history entries while away, {said} the desired state" in shown
    assert "LOST" not in _catch_up_text(presence("a", 5))


def test_presence_from_an_older_or_newer_worker_reads_the_gap_fields_as_none() -> None:
    fields = json.loads(presence("a", 5).encode())
    older = {k: v for k, v in fields.items() if k not in ("history_gap", "history_lost")}
    read = NodePresence.decode(json.dumps(older).encode())
    assert (read.history_gap, read.history_lost) == (HistoryGap.NONE, 0)
    newer = NodePresence.decode(json.dumps({**fields, "history_gap": "resharding"}).encode())
    assert newer.history_gap is HistoryGap.NONE
