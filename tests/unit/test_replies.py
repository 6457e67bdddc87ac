"""The publisher's reply book: answers arrive on one thread, callers wait on others."""

from __future__ import annotations

import threading
import time

import pytest

from contract import ErrorKind, NodeProgress, NodeResult, Status
from publisher.replies import (
    ANSWER_OVERHEAD,
    STATUS_ONLY_MESSAGE,
    STATUS_ONLY_OVERHEAD,
    AnswersForgotten,
    ReplyBook,
)


def result(request_id: str, node: str, status: Status = Status.PULLED) -> bytes:
    return NodeResult(request_id, node, "img", status, 0.1).encode()


def progress(request_id: str, node: str, done: int) -> bytes:
    return NodeProgress(request_id, node, "img", done, 100).encode()


def test_a_waiter_returns_once_its_condition_holds_and_hears_every_event_in_order() -> None:
    book = ReplyBook()
    book.track("r", "img", watch=True)
    heard: list[str] = []

    def answer() -> None:
        for node in ("a", "b", "c"):
            time.sleep(0.02)
            book.receive("r", progress("r", node, 50))
            book.receive("r", result("r", node))

    sender = threading.Thread(target=answer)
    sender.start()
    results = book.wait(
        "r",
        lambda answered: len(answered) >= 3,
        time.monotonic() + 5,
        on_event=lambda event: heard.append(f"{type(event).__name__}:{event.node}"),
    )
    sender.join()
    assert sorted(results) == ["a", "b", "c"]
    assert heard == [
        "NodeProgress:a",
        "NodeResult:a",
        "NodeProgress:b",
        "NodeResult:b",
        "NodeProgress:c",
        "NodeResult:c",
    ]


def test_the_first_answer_of_a_node_counts_and_strangers_are_ignored() -> None:
    book = ReplyBook()
    book.track("r")
    book.receive("r", result("r", "a", Status.PULLED))
    book.receive("r", result("r", "a", Status.PRESENT))  # asked again after a reconnect
    book.receive("x", result("x", "a"))  # not ours
    book.receive("r", b"not json")
    assert book.lookup("x") is None
    found = book.lookup("r")
    assert found is not None
    first = found[1]["a"]
    assert isinstance(first, NodeResult) and first.status is Status.PULLED


def test_a_waiter_that_is_not_done_waits_until_the_deadline() -> None:
    book = ReplyBook()
    book.track("r")
    book.receive("r", result("r", "a"))
    started = time.monotonic()
    results = book.wait("r", lambda answered: len(answered) >= 2, time.monotonic() + 0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert list(results) == ["a"]


def test_only_the_last_requests_are_remembered() -> None:
    book = ReplyBook(remembered=3)
    for n in range(5):
        book.track(f"r{n}")
    assert book.lookup("r0") is None
    assert book.lookup("r4") is not None


def failure(request_id: str, node: str) -> bytes:
    return NodeResult.failure(
        request_id, node, "img", ErrorKind.NOT_FOUND, "manifest unknown " * 20, 0.1
    ).encode()


def whole_cost(body: bytes) -> int:
    return len(body) + ANSWER_OVERHEAD


def test_kept_bytes_are_each_answers_encoded_size_and_a_fixed_overhead() -> None:
    book = ReplyBook()
    book.track("r")
    bodies = [result("r", f"node-{n}") for n in range(3)]
    for body in bodies:
        book.receive("r", body)
    book.receive("r", bodies[0])  # a node asked again: the first answer counts, once
    assert book.memory().kept_bytes == sum(map(whole_cost, bodies))


def test_past_the_budget_the_oldest_requests_nobody_waits_on_are_forgotten_first() -> None:
    per_request = 2 * whole_cost(result("r0", "a"))
    book = ReplyBook(budget=3 * per_request)
    for n in range(5):
        book.track(f"r{n}")
        book.receive(f"r{n}", result(f"r{n}", "a"))
        book.receive(f"r{n}", result(f"r{n}", "b"))
        assert book.memory().kept_bytes <= 3 * per_request
    memory = book.memory()
    assert (memory.requests, memory.forgotten_requests) == (3, 2)
    assert [book.forgot(f"r{n}") for n in range(5)] == [True, True, False, False, False]
    assert book.lookup("r0") is None and book.lookup("r2") is not None
    assert not book.forgot("never-asked")


def test_a_forgotten_request_is_said_to_a_caller_not_answered_empty() -> None:
    book = ReplyBook(budget=whole_cost(result("r0", "a")))
    book.track("r0")
    book.receive("r0", result("r0", "a"))
    book.track("r1")
    book.receive("r1", result("r1", "a"))
    with pytest.raises(AnswersForgotten, match=r"'r0' were forgotten.*PULLER_ANSWER_MEMORY_MB"):
        book.wait("r0", lambda _: True, time.monotonic())


def test_a_waited_on_request_is_never_forgotten_its_answers_past_the_budget_keep_their_status() -> (
    None
):
    budget = 4 * whole_cost(failure("w", "node-0"))
    book = ReplyBook(budget=budget)
    book.track("old")
    book.receive("old", result("old", "x"))
    book.track("w", "img", hold=True)
    for n in range(100):
        book.receive("w", failure("w", f"node-{n}") if n % 2 else result("w", f"node-{n}"))
    book.receive("w", result("w", "node-99"))  # again: the first answer (failed) counts
    memory = book.memory()
    assert book.forgot("old") and not book.forgot("w")
    assert memory.status_only_answers == book.status_only("w") > 90
    status_only = (STATUS_ONLY_OVERHEAD + len("node-00")) * memory.status_only_answers
    assert memory.kept_bytes <= budget + status_only
    answers = book.wait("w", lambda answered: len(answered) == 100, time.monotonic() + 5)
    assert len(answers) == 100
    last = answers["node-99"]
    assert isinstance(last, NodeResult) and last.status is Status.FAILED
    assert last.error is not None and last.error.kind is ErrorKind.NOT_FOUND
    assert last.error.message == STATUS_ONLY_MESSAGE
    assert [answers[f"node-{n}"].status for n in (0, 1, 98)] == [  # type: ignore[union-attr]
        Status.PULLED,
        Status.FAILED,
        Status.PULLED,
    ]
    book.release("w")
    book.track("next")
    book.receive("next", result("next", "a"))
    assert book.forgot("w")  # once nobody waits, it goes first
    assert book.memory().kept_bytes == whole_cost(result("next", "a"))


def test_progress_that_does_not_fit_is_dropped_and_makes_room_for_answers() -> None:
    budget = 3 * whole_cost(progress("r", "a", 1))
    book = ReplyBook(budget=budget)
    book.track("r", "img", watch=True)
    for done in range(10):
        book.receive("r", progress("r", "a", done))
    assert book.memory().dropped_progress == 7
    book.receive("r", result("r", "a"))  # the 3 progress reports waiting make room for it
    heard: list[str] = []
    book.wait("r", lambda _: True, time.monotonic(), lambda e: heard.append(type(e).__name__))
    assert heard == ["NodeResult"]
    memory = book.memory()
    assert (memory.dropped_progress, memory.status_only_answers) == (10, 0)
    assert memory.kept_bytes == whole_cost(result("r", "a"))
    book.unwatch("r")
    book.receive("r", progress("r", "a", 99))  # nobody watches: not kept at all
    assert book.memory().kept_bytes == whole_cost(result("r", "a"))


def test_the_count_of_requests_forgets_only_requests_nobody_waits_on() -> None:
    book = ReplyBook(remembered=2)
    book.track("held", hold=True)
    for n in range(3):
        book.track(f"r{n}")
    assert book.lookup("held") is not None
    assert [book.forgot(f"r{n}") for n in range(3)] == [True, True, False]


def test_a_request_nobody_waits_on_forgets_older_ones_first_and_itself_only_when_alone() -> None:
    cost = whole_cost(result("old", "node-0"))
    book = ReplyBook(budget=10 * cost)
    book.track("old")
    book.receive("old", result("old", "node-0"))
    book.track("new")
    for n in range(10):
        book.receive("new", result("new", f"node-{n}"))
    assert book.forgot("old") and book.lookup("new") is not None
    for n in range(10, 200):  # its status only, while that fits; then it is forgotten
        book.receive("new", result("new", f"node-{n}"))
    assert book.forgot("new")
    assert book.memory().kept_bytes == 0
