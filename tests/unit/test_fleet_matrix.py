"""The fleet page's matrix and board, with fakes: the cells' states, drift against the
majority, the roster's states, and the board's cache (many polls, one survey)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any, cast

import pytest

from contract import (
    ErrorKind,
    ImageReference,
    NodeError,
    NodePresence,
    NodeProgress,
    NodeResult,
    NodeState,
    Pulling,
    Status,
    parse_reference,
)
from gateway.fleet_board import ActionRefused, FleetBoard
from gateway.fleet_matrix import fleet_matrix, majority_version, node_state
from publisher import Publisher
from publisher.client import Survey
from publisher.report import StatusReport
from publisher.roster import Roster, RosterBook
from tests.waiting import eventually

IMAGE = "docker.io/library/a:1"
OTHER = "docker.io/library/b:1"


def presence(node: str, **fields: Any) -> NodePresence:
    return NodePresence(node, "1.0", "20.10", started_at=1.0, last_seen=100.0, **fields)


def row(node: str, status: Status, digest: str | None = None, image: str = IMAGE) -> NodeResult:
    error = NodeError(ErrorKind.NOT_FOUND, "no such tag") if status is Status.FAILED else None
    return NodeResult("r1", node, image, status, 0.1, digest=digest, error=error)


def report(*rows: NodeResult, image: str = IMAGE) -> StatusReport:
    return StatusReport("r1", image, tuple(rows))


def survey(nodes: Iterable[str], *reports: StatusReport) -> Survey:
    return Survey(Roster([presence(n) for n in nodes]), reports)


def test_every_state_has_its_cell() -> None:
    found = fleet_matrix(
        survey(
            ["n1", "n2", "n3", "n4", "n5"],
            report(
                row("n1", Status.PRESENT, "sha256:a"),
                row("n2", Status.ABSENT),
                row("n3", Status.FAILED),
                row("n4", Status.NO_REPLY),
                row("n5", Status.ABSENT),
            ),
        ),
        pulling={(IMAGE, "n5"): Pulling(25, 100)},
        failures={},
    )
    assert found["images"] == [IMAGE]
    assert [n["name"] for n in found["nodes"]] == ["n1", "n2", "n3", "n4", "n5"]
    assert [r[0] for r in found["cells"]] == [
        "p",
        "a",
        ["f", "not_found", "no such tag"],
        "n",
        ["u", 25],
    ]


def test_drift_marks_the_nodes_off_the_majority_only() -> None:
    rows = report(
        row("n1", Status.PRESENT, "sha256:a"),
        row("n2", Status.PRESENT, "sha256:a"),
        row("n3", Status.PRESENT, "sha256:b"),
    )
    assert majority_version(rows) == "sha256:a"
    found = fleet_matrix(survey(["n1", "n2", "n3"], rows), {}, {})
    assert [r[0] for r in found["cells"]] == ["p", "p", ["d", "sha256:b"]]


def test_a_tie_has_no_majority_and_every_version_is_drift() -> None:
    rows = report(row("n1", Status.PRESENT, "sha256:a"), row("n2", Status.PRESENT, "sha256:b"))
    assert majority_version(rows) is None
    found = fleet_matrix(survey(["n1", "n2"], rows), {}, {})
    assert [r[0][0] for r in found["cells"]] == ["d", "d"]


def test_one_version_is_no_drift_however_many_lack_the_image() -> None:
    rows = report(row("n1", Status.PRESENT, "sha256:a"), row("n2", Status.ABSENT))
    found = fleet_matrix(survey(["n1", "n2"], rows), {}, {})
    assert [r[0] for r in found["cells"]] == ["p", "a"]


def test_present_wins_over_a_pull_in_flight_and_a_failure_shows_where_absent() -> None:
    rows = report(row("n1", Status.PRESENT, "sha256:a"), row("n2", Status.ABSENT))
    found = fleet_matrix(
        survey(["n1", "n2"], rows),
        pulling={(IMAGE, "n1"): Pulling(1, 2)},
        failures={(IMAGE, "n2"): ("stalled", "no byte for 60s")},
    )
    assert [r[0] for r in found["cells"]] == ["p", ["f", "stalled", "no byte for 60s"]]


def test_a_node_pulling_for_someone_else_shows_its_progress_not_waiting() -> None:
    def pulling(node: str, done: int, total: int) -> NodeResult:
        return NodeResult("r1", node, IMAGE, Status.ABSENT, 0.1, pulling=Pulling(done, total))

    rows = report(
        pulling("n1", 40, 100),
        pulling("n2", 0, 0),  # the engine has not said the size yet
        row("n3", Status.ABSENT),
    )
    found = fleet_matrix(survey(["n1", "n2", "n3"], rows), {}, {})
    assert [r[0] for r in found["cells"]] == [["u", 40], ["u", None], "a"]
    asked = fleet_matrix(survey(["n1", "n2", "n3"], rows), {}, {}, asked={IMAGE: 3.2})
    assert [r[0] for r in asked["cells"]] == [["u", 40], ["u", None], ["w", 3]]


def test_the_roster_says_up_catching_up_leaving_and_unknown() -> None:
    roster = Roster(
        [
            presence("a"),
            presence("b", caught_up=False),
            presence("c", replay_pending=3),
            presence("d", state=NodeState.LEAVING),
        ]
    )
    assert [node_state(info) for info in roster.nodes] == [
        "up",
        "catching up",
        "catching up",
        "leaving",
    ]
    found = fleet_matrix(Survey(roster, (report(row("late", Status.ABSENT)),)), {}, {})
    states = {n["name"]: n["state"] for n in found["nodes"]}
    assert states == {
        "a": "up",
        "b": "catching up",
        "c": "catching up",
        "d": "leaving",
        "late": "unknown",
    }


def test_rows_are_bounded_and_the_rest_counted() -> None:
    found = fleet_matrix(survey([f"n{i:03}" for i in range(30)]), {}, {}, max_nodes=10)
    assert len(found["nodes"]) == 10
    assert found["hidden_nodes"] == 20


def test_at_100_by_100_the_document_stays_small() -> None:
    nodes = [f"node-{i:03}" for i in range(100)]
    images = [f"docker.io/cyberdojofoundation/image_{i:03}:0123456" for i in range(100)]
    reports = [
        report(*(row(n, Status.PRESENT, "sha256:" + "a" * 64, i) for n in nodes), image=i)
        for i in images
    ]
    body = json.dumps(fleet_matrix(survey(nodes, *reports), {}, {}), separators=(",", ":"))
    assert len(body) < 64_000


class FakePublisher:
    """Answers surveys from a table; counts them; waits on ``gate`` when one is given."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.surveys: list[list[str]] = []
        self.gate = gate
        self.warmed: list[list[str]] = []
        self.history: list[tuple[str, float]] = []
        self.problem: str | None = None
        self.present: set[str] = set()

    def asked_lately(self, window: float) -> tuple[list[tuple[str, float]], str | None]:
        return self.history, self.problem

    def survey(self, images: Iterable[str], *, timeout: float) -> Survey:
        if self.gate is not None:
            self.gate.wait(5)
        asked = list(images)
        self.surveys.append(asked)
        rows = {
            image: row("n1", Status.PRESENT, "sha256:a", image)
            if image in self.present
            else row("n1", Status.ABSENT, image=image)
            for image in asked
        }
        return survey(["n1"], *(report(rows[i], image=i) for i in asked))

    def warm(self, images: list[ImageReference], **_options: Any) -> None:
        self.warmed.append([str(i) for i in images])
        on_event = _options["on_event"]
        on_event(NodeProgress("r", "n1", str(images[0]), 10, 40))

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board_with(fake: FakePublisher, clock: Clock, actions: bool = False) -> FleetBoard:
    return FleetBoard(lambda: cast(Publisher, fake), actions=actions, clock=clock)


def test_many_polls_within_the_max_age_cost_one_survey() -> None:
    fake, clock = FakePublisher(), Clock()
    board = board_with(fake, clock)
    board.asked(IMAGE)
    first = board.snapshot()
    assert json.loads(first)["images"] == [IMAGE]
    for _ in range(50):
        assert board.snapshot() == first
    assert len(fake.surveys) == 1
    clock.now += 2.0
    board.snapshot()  # stale: answered from the last survey, the next one started
    eventually(lambda: len(fake.surveys) == 2)


def test_a_poll_never_waits_for_a_survey_once_one_exists() -> None:
    gate = threading.Event()
    fake, clock = FakePublisher(gate), Clock()
    board = board_with(fake, clock)
    gate.set()
    first = board.snapshot()
    gate.clear()
    clock.now += 5
    assert board.snapshot() == first  # the survey it started is held at the gate
    assert board.snapshot() == first
    gate.set()
    eventually(lambda: len(fake.surveys) == 2)


def test_named_images_come_first_and_expire() -> None:
    fake, clock = FakePublisher(), Clock()
    board = board_with(fake, clock)
    board.asked(OTHER)
    board.name([parse_reference(IMAGE)])
    assert json.loads(board.snapshot())["images"] == [IMAGE, OTHER]
    clock.now += 61
    board.snapshot()
    eventually(lambda: len(fake.surveys) == 2)
    assert fake.surveys[-1] == [OTHER]


def test_images_asked_anywhere_join_by_when_and_a_node_without_one_is_waiting() -> None:
    fake, clock = FakePublisher(), Clock()
    board = board_with(fake, clock)
    board.asked(OTHER)  # through this gateway, just now
    fake.history = [(IMAGE, time.time() - 30), ("docker.io/library/old:1", time.time() - 7200)]
    document = json.loads(board.snapshot())
    assert document["images"] == [OTHER, IMAGE, "docker.io/library/old:1"]
    assert document["cells"][0][:2] == [["w", 0], ["w", 30]]
    assert document["cells"][0][2] == "a"  # asked too long ago to be waited for


def test_an_image_every_node_has_is_checked_less_often_and_shown_all_along() -> None:
    fake, clock = FakePublisher(), Clock()
    fake.present = {IMAGE}
    board = board_with(fake, clock)
    board.name([parse_reference(IMAGE), parse_reference(OTHER)])
    board.snapshot()
    for seconds in (2, 4, 6, 8, 10):
        clock.now = 1000.0 + seconds
        # polls until one starts the survey (the last one may be finishing): one per step
        wanted = 1 + seconds // 2

        def surveyed(n: int = wanted) -> bool:
            return bool(board.snapshot()) and len(fake.surveys) == n

        eventually(surveyed)
    # IMAGE (settled) at the first survey and 10 s later; OTHER (absent) at every one
    assert [IMAGE in asked for asked in fake.surveys] == [True, False, False, False, False, True]
    assert all(OTHER in asked for asked in fake.surveys)
    assert json.loads(board.snapshot())["cells"] == [["p", "a"]]


def test_a_history_that_cannot_be_read_is_said() -> None:
    fake, clock = FakePublisher(), Clock()
    fake.problem = "the history stream cannot be read: ACCESS_REFUSED"
    notes = json.loads(board_with(fake, clock).snapshot())["notes"]
    assert len(notes) == 1
    assert "ACCESS_REFUSED" in notes[0] and "puller.history.stream" in notes[0]


def test_actions_are_refused_when_off_and_bounded_when_on() -> None:
    fake, clock = FakePublisher(), Clock()
    image = parse_reference(IMAGE)
    with pytest.raises(ActionRefused) as refused:
        board_with(fake, clock).act("warm", [image])
    assert refused.value.status == 403
    board = board_with(fake, clock, actions=True)
    for action, images, status in [
        ("delete", [image], 400),
        ("warm", [], 400),
        ("refresh", [image, image], 400),
    ]:
        with pytest.raises(ActionRefused) as refused:
            board.act(action, images)
        assert refused.value.status == status
    assert board.act("warm", [image]) == (202, {"action": "warm", "images": [IMAGE]})
    eventually(lambda: fake.warmed == [[IMAGE]])
    clock.now += 5  # the action's progress is shown by the next survey
    eventually(lambda: json.loads(board.snapshot())["cells"] == [[["u", 25]]])


def test_the_book_keeps_leaving_nodes_for_the_page_but_not_for_the_roster() -> None:
    book = RosterBook()
    book.add(presence("a"), seen=100.0, horizon=0.0)
    book.add(presence("b", state=NodeState.LEAVING), seen=100.0, horizon=0.0)
    book.add(presence("c"), seen=10.0, horizon=0.0)  # too long ago
    assert [n.node for n in book.roster(since=50.0)] == ["a"]
    assert [(n.node, node_state(n)) for n in book.announcements(since=50.0)] == [
        ("a", "up"),
        ("b", "leaving"),
    ]
