"""A prune and requests for the images it removes, every interleaving forced in turn: a
node never answers ``present`` or ``pulled`` for an image it then removes (a pull service
and a pruner sharing one guard, over a stand-in store whose steps the test holds)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract import (
    CheckRequest,
    PullRequest,
    Status,
    parse_reference,
)
from tests.fakes.store import MemoryStore
from tests.unit.test_service import Answers
from tests.waiting import eventually
from worker.pruning.pruner import PruneOutcome, Pruner, PruneRule
from worker.pruning.usage import UsageLog
from worker.pulls.image_guard import ImageGuard, Ticket
from worker.pulls.retry import RetryPolicy
from worker.pulls.service import PullService
from worker.stores.contract import ImageInfo, PrunableStore, StoredImage

DAY = 86400.0
NOW = 1_800_000_000.0
OLD = "registry.example/old:1"


@dataclass
class Node:
    store: MemoryStore
    guard: ImageGuard
    service: PullService
    pruner: Pruner
    usage: UsageLog
    answers: Answers

    def ask(self, name: str) -> None:
        self.service.submit(PullRequest.new(parse_reference(name)), self.answers.answer)

    def check(self, name: str) -> None:
        self.service.check(CheckRequest.new(parse_reference(name)), self.answers.answer)

    def prune_in_background(self) -> Callable[[], PruneOutcome]:
        """Starts a pass (images unused 30 days go); returns a call that waits for it."""
        outcomes: list[PruneOutcome] = []
        thread = threading.Thread(
            target=lambda: outcomes.append(self.pruner.prune(PruneRule(unused_for=30 * DAY)))
        )
        thread.start()

        def outcome() -> PruneOutcome:
            thread.join(10)
            return outcomes[0]

        return outcome

    def holds(self, name: str) -> bool:
        return name in self.store.names


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    store = MemoryStore(events_lag=True)  # its memory stale until forget_index()
    store.hold(OLD, "sha256:old", remembered=True)
    usage = UsageLog(tmp_path / "usage.json", clock=lambda: NOW)
    usage.saw(["sha256:old"], NOW - 40 * DAY)  # unused for 40 days: the pass takes it
    guard = ImageGuard(on_use=usage.used_now)
    service = PullService("node-a", store, 2, retry=RetryPolicy(attempts=1), guard=guard)
    pruner = Pruner(store, usage, clock=lambda: NOW, removals=guard)
    yield Node(store, guard, service, pruner, usage, Answers())
    store.removal_gate.set()
    service.shutdown(wait=True)


def test_the_racy_store_is_a_prunable_store() -> None:
    assert isinstance(MemoryStore(), PrunableStore)


def test_asked_for_between_the_choice_and_the_removal_it_stays(node: Node) -> None:
    # The pass has chosen the image (from its snapshot of the usage log); a request is
    # answered from memory just before the removal would begin: it does not begin.
    def ask_now(_freed: int) -> bool:
        node.ask(OLD)
        return False  # not enough freed: go on removing

    outcome = node.pruner.prune(PruneRule(unused_for=30 * DAY), enough=ask_now)
    [answer] = node.answers.wait_for(1)
    assert answer.status is Status.PRESENT
    assert (outcome.removed, outcome.kept_asked) == ((), 1)
    assert node.holds(OLD)


def test_asked_for_while_it_is_being_removed_it_is_pulled_again(node: Node) -> None:
    node.store.removal_gate.clear()
    done = node.prune_in_background()
    assert node.store.removing.wait(10)
    node.ask(OLD)  # the memory says present; the claim is refused; the engine still has it
    eventually(lambda: node.guard.waiting == 1)  # the pull waits for the removal
    assert node.answers.results == []
    node.store.removal_gate.set()
    [answer] = node.answers.wait_for(1)
    assert len(done().removed) == 1
    assert answer.status is Status.PULLED
    assert node.holds(OLD)
    assert node.store.events[-2:] == ["removed sha256:old", f"pulled {OLD}"]


def test_a_look_at_the_engine_before_a_removal_is_not_answered_after_it(node: Node) -> None:
    # The engine says the image is there; the whole removal happens before the answer.
    node.store.forget_index()

    def remove_now() -> None:
        node.prune_in_background()()

    node.store.after_find = remove_now
    node.ask(OLD)
    [answer] = node.answers.wait_for(1)
    assert answer.status is Status.PULLED
    assert node.holds(OLD)


def test_the_memory_of_an_image_removed_just_now_is_not_trusted(node: Node) -> None:
    # The store's index has not heard of the removal yet (it says the image is there).
    assert len(node.prune_in_background()().removed) == 1
    assert node.store.index == {OLD: "sha256:old"}  # stale
    node.ask(OLD)
    [answer] = node.answers.wait_for(1)
    assert answer.status is Status.PULLED
    assert node.holds(OLD)


def test_a_removal_does_not_begin_while_a_pull_holds_the_name(node: Node) -> None:
    node.store.forget_index()
    node.store.drop(OLD)  # the node lacks it: the request pulls it
    outcomes: list[PruneOutcome] = []

    def prune_now() -> None:
        # The pulled image is on the engine, unused for 40 days as far as the log knows.
        node.store.hold(OLD, "sha256:old")
        outcomes.append(node.pruner.prune(PruneRule(unused_for=30 * DAY)))

    node.store.pull_gives[OLD] = "sha256:old"
    node.store.during_pull = prune_now
    node.ask(OLD)
    [answer] = node.answers.wait_for(1)
    assert answer.status is Status.PULLED
    assert (outcomes[0].removed, outcomes[0].kept_asked) == ((), 1)
    assert node.holds(OLD)


def test_a_pull_that_gives_an_image_being_removed_under_another_name_pulls_again(
    node: Node,
) -> None:
    other = "registry.example/same-content:2"
    node.store.pull_gives[other] = "sha256:old"  # the same image, another name
    node.store.removal_gate.clear()
    done = node.prune_in_background()
    assert node.store.removing.wait(10)
    node.store.during_pull = node.store.removal_gate.set  # the removal ends mid-pull
    node.ask(other)
    [answer] = node.answers.wait_for(1)
    assert len(done().removed) == 1
    assert answer.status is Status.PULLED
    assert node.holds(other)
    assert node.store.events[-1] == f"pulled {other}"
    assert [e for e in node.store.events if e.startswith("pulled")] == [f"pulled {other}"] * 2


def test_a_check_while_the_image_is_being_removed_says_absent(node: Node) -> None:
    node.store.removal_gate.clear()
    done = node.prune_in_background()
    assert node.store.removing.wait(10)
    node.check(OLD)
    eventually(lambda: node.guard.waiting == 1)
    node.store.removal_gate.set()
    [answer] = node.answers.wait_for(1)
    assert answer.status is Status.ABSENT
    assert len(done().removed) == 1


def test_an_image_answered_before_the_pass_began_counts_as_used_now(node: Node) -> None:
    node.ask(OLD)
    assert node.answers.wait_for(1)[0].status is Status.PRESENT
    assert node.usage.last_used("sha256:old") == NOW
    outcome = node.pruner.prune(PruneRule(unused_for=30 * DAY))
    assert outcome.removed == () and outcome.kept_asked == 0  # not even a candidate
    assert node.holds(OLD)


def test_an_image_nobody_asks_for_is_still_removed(node: Node) -> None:
    outcome = node.pruner.prune(PruneRule(unused_for=30 * DAY))
    assert [r.image_id for r in outcome.removed] == ["sha256:old"]
    assert not node.holds(OLD)


def test_the_guard_holds_nothing_once_things_are_over() -> None:
    clock = [0.0]
    guard = ImageGuard(clock=lambda: clock[0])
    image = StoredImage("sha256:x", ("registry.example/x:1",), (), 1, None, None)
    for _ in range(1000):
        snapshot = guard.pass_started()
        ticket = guard.open(parse_reference("registry.example/y:1"))
        assert guard.claim(ticket, ImageInfo("sha256:y", None), pulled=True)
        assert guard.begin_removal(snapshot, image)
        guard.end_removal("sha256:x", removed=True)
        guard.close(ticket)
        guard.pass_ended(snapshot)
    clock[0] = 3600.0
    guard.close(Ticket(0, None))  # any close sweeps
    assert guard.held == (0, 0, 0, 0)
