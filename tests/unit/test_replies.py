"""The publisher's reply book: answers arrive on one thread, callers wait on others."""

from __future__ import annotations

import threading
import time

from contract import NodeProgress, NodeResult, Status
from publisher.replies import ReplyBook


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
