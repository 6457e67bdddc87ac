"""PullService with a fake image store and a fake connection: threading and answers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from contract import (
    ErrorKind,
    ImageReference,
    NodeProgress,
    NodeResult,
    PullFailed,
    PullRequest,
    Status,
    decode_reply,
    parse_reference,
)
from worker.broker import Delivery
from worker.engine import ImageInfo, PullProgress
from worker.service import PullService, RetryPolicy


@dataclass
class FakeStore:
    present: set[str] = field(default_factory=set)
    failures: dict[str, Exception] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)
    pulls: list[str] = field(default_factory=list)
    pull_threads: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.gate.set()

    progress_steps: list[PullProgress] = field(default_factory=list)

    def version(self) -> str:
        return "20.10.24"

    def cancel_pulls(self) -> None:
        self.gate.set()

    remembered: set[str] = field(default_factory=set)

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        if str(image) in self.remembered:
            return ImageInfo("sha256:remembered", None)
        return None

    def find_image(self, image: ImageReference) -> ImageInfo | None:
        if str(image) in self.present:
            return ImageInfo("sha256:present", None)
        return None

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        self.pulls.append(str(image))
        self.pull_threads.add(threading.current_thread().name)
        assert self.gate.wait(10)
        for step in self.progress_steps:
            if on_progress is not None:
                on_progress(step)
        if str(image) in self.failures:
            raise self.failures[str(image)]
        self.present.add(str(image))
        return ImageInfo("sha256:pulled", "sha256:digest")


class FakeConnection:
    """Stands in for the broker. Replies and acks must happen on the thread that drains it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.owner = threading.current_thread()
        self.replies: list[tuple[str, str | None, NodeResult]] = []
        self.progress: list[NodeProgress] = []
        self.acked: list[int] = []
        self.rejected: list[int] = []

    def call_soon(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        assert threading.current_thread() is self.owner, "replied off the connection thread"
        message = decode_reply(body)
        if isinstance(message, NodeProgress):
            self.progress.append(message)
        else:
            self.replies.append((reply_to, correlation_id, message))

    def ack(self, delivery: Delivery) -> None:
        assert threading.current_thread() is self.owner, "acked off the connection thread"
        self.acked.append(delivery.delivery_tag)

    def reject(self, delivery: Delivery) -> None:
        assert threading.current_thread() is self.owner
        self.rejected.append(delivery.delivery_tag)

    def drain_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "timed out waiting for the service"
            with self._lock:
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()
            time.sleep(0.005)


_tags = iter(range(1, 1_000_000))


def delivery_for(image: str, reply_to: str | None = "reply-q") -> Delivery:
    request = PullRequest.new(parse_reference(image))
    return Delivery(
        body=request.encode(),
        delivery_tag=next(_tags),
        reply_to=reply_to,
        correlation_id=request.request_id,
        content_type="application/json",
        connection_generation=1,
    )


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def connection() -> FakeConnection:
    return FakeConnection()


@pytest.fixture
def service(store: FakeStore) -> Iterator[PullService]:
    service = PullService("node-a", store, max_concurrent_pulls=2)
    yield service
    service.shutdown(wait=True)


def test_an_image_already_there_is_answered_present_without_pulling(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.present.add("docker.io/library/busybox:latest")
    delivery = delivery_for("busybox")
    service.on_delivery(delivery, connection)
    connection.drain_until(lambda: bool(connection.acked))
    [(reply_to, correlation_id, result)] = connection.replies
    assert (reply_to, correlation_id) == ("reply-q", delivery.correlation_id)
    assert result.status is Status.PRESENT
    assert result.node == "node-a"
    assert result.request_id == delivery.correlation_id
    assert store.pulls == []
    assert connection.acked == [delivery.delivery_tag]


def test_a_missing_image_is_pulled_off_the_connection_thread(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    service.on_delivery(delivery_for("busybox:1"), connection)
    connection.drain_until(lambda: bool(connection.acked))
    [(_, _, result)] = connection.replies
    assert result.status is Status.PULLED
    assert result.image_id == "sha256:pulled"
    assert store.pulls == ["docker.io/library/busybox:1"]
    assert threading.current_thread().name not in store.pull_threads
    assert service.unfinished == 0


def test_the_connection_thread_is_free_while_a_pull_runs(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.gate.clear()
    store.present.add("docker.io/library/there:latest")
    service.on_delivery(delivery_for("slow:1"), connection)
    service.on_delivery(delivery_for("there"), connection)  # returns at once: nothing blocks
    connection.drain_until(lambda: len(connection.replies) == 1)
    assert connection.replies[0][2].status is Status.PRESENT
    store.gate.set()
    connection.drain_until(lambda: len(connection.replies) == 2)
    assert connection.replies[1][2].status is Status.PULLED


def test_identical_requests_join_one_pull_and_each_gets_a_reply(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.gate.clear()
    deliveries = [delivery_for("same:1") for _ in range(3)]
    for delivery in deliveries:
        service.on_delivery(delivery, connection)
    time.sleep(0.2)
    store.gate.set()
    connection.drain_until(lambda: len(connection.acked) == 3)
    assert store.pulls == ["docker.io/library/same:1"]
    assert sorted(r.request_id for _, _, r in connection.replies) == sorted(
        d.correlation_id or "" for d in deliveries
    )
    assert {r.status for _, _, r in connection.replies} == {Status.PULLED}


def test_a_failed_pull_is_answered_with_its_kind_and_message(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.failures["docker.io/library/gone:1"] = PullFailed(ErrorKind.NOT_FOUND, "no such tag")
    service.on_delivery(delivery_for("gone:1"), connection)
    connection.drain_until(lambda: bool(connection.acked))
    [(_, _, result)] = connection.replies
    assert result.status is Status.FAILED
    assert result.error is not None
    assert (result.error.kind, result.error.message) == (ErrorKind.NOT_FOUND, "no such tag")


def test_an_unexpected_exception_becomes_an_internal_failure_not_a_crash(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.failures["docker.io/library/bug:1"] = RuntimeError("kaboom")
    service.on_delivery(delivery_for("bug:1"), connection)
    connection.drain_until(lambda: bool(connection.acked))
    result = connection.replies[0][2]
    assert result.error is not None
    assert result.error.kind is ErrorKind.INTERNAL
    assert "kaboom" in result.error.message
    service.on_delivery(delivery_for("fine:1"), connection)  # still serving
    connection.drain_until(lambda: len(connection.acked) == 2)
    assert connection.replies[1][2].status is Status.PULLED


@pytest.mark.parametrize(
    "body", [b"", b"garbage", b"{}", json.dumps({"version": 1, "type": "pull"}).encode()]
)
def test_a_broken_message_is_rejected_and_answered_with_the_reason(
    service: PullService, store: FakeStore, connection: FakeConnection, body: bytes
) -> None:
    delivery = Delivery(body, 99, "reply-q", "corr-1", None, 1)
    service.on_delivery(delivery, connection)
    assert connection.rejected == [99]
    assert connection.acked == []
    [(_, correlation_id, result)] = connection.replies
    assert correlation_id == "corr-1"
    assert result.request_id == "corr-1"
    assert result.error is not None
    assert result.error.kind is ErrorKind.INVALID_REQUEST
    assert store.pulls == []


def test_a_broken_message_with_no_reply_to_is_only_rejected(
    service: PullService, connection: FakeConnection
) -> None:
    service.on_delivery(Delivery(b"[]", 5, None, None, None, 1), connection)
    assert connection.rejected == [5]
    assert connection.replies == []


def test_a_request_without_reply_to_is_still_served_and_acked(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    service.on_delivery(delivery_for("quiet:1", reply_to=None), connection)
    connection.drain_until(lambda: bool(connection.acked))
    assert store.pulls == ["docker.io/library/quiet:1"]
    assert connection.replies == []


def test_progress_is_throttled_and_reaches_every_joined_request_before_the_result(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.gate.clear()
    store.progress_steps = [PullProgress(done, 1000) for done in range(0, 1001, 10)]
    first, second = delivery_for("big:1"), delivery_for("big:1")
    service.on_delivery(first, connection)
    service.on_delivery(second, connection)
    time.sleep(0.2)
    store.gate.set()
    connection.drain_until(lambda: len(connection.acked) == 2)
    by_request: dict[str, list[int]] = {}
    for message in connection.progress:
        by_request.setdefault(message.request_id, []).append(message.done)
    assert set(by_request) == {first.correlation_id, second.correlation_id}
    for dones in by_request.values():
        # 101 engine events in well under a second: throttled to the first and the last.
        assert dones[0] == 0
        assert dones[-1] == 1000
        assert len(dones) < 10
        assert dones == sorted(dones)


class FlakyStore(FakeStore):
    """Fails each pull of an image with the queued failures first, then succeeds."""

    def __init__(self, failures: list[PullFailed]) -> None:
        super().__init__()
        self.queued = failures

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        self.pulls.append(str(image))
        if self.queued:
            raise self.queued.pop(0)
        return ImageInfo("sha256:pulled", None)


def serve_one(store: FakeStore, policy: RetryPolicy) -> tuple[NodeResult, PullService]:
    connection = FakeConnection()
    service = PullService("node-a", store, 1, policy)
    try:
        service.on_delivery(delivery_for("flaky:1"), connection)
        connection.drain_until(lambda: bool(connection.acked))
    finally:
        service.shutdown(wait=True)
    return connection.replies[0][2], service


def test_transient_failures_are_retried_until_the_pull_succeeds() -> None:
    store = FlakyStore(
        [
            PullFailed(ErrorKind.REGISTRY_UNREACHABLE, "refused"),
            PullFailed(ErrorKind.STALLED, "silent"),
        ]
    )
    result, _ = serve_one(store, RetryPolicy(attempts=3, first_delay=0.01))
    assert result.status is Status.PULLED
    assert len(store.pulls) == 3


def test_permanent_failures_are_not_retried() -> None:
    store = FlakyStore([PullFailed(ErrorKind.NOT_FOUND, "no such tag")])
    result, _ = serve_one(store, RetryPolicy(attempts=3, first_delay=0.01))
    assert result.error is not None
    assert result.error.kind is ErrorKind.NOT_FOUND
    assert len(store.pulls) == 1


def test_retries_are_bounded_and_the_reply_says_so() -> None:
    store = FlakyStore([PullFailed(ErrorKind.REGISTRY_ERROR, "503")] * 5)
    result, _ = serve_one(store, RetryPolicy(attempts=3, first_delay=0.01))
    assert result.error is not None
    assert result.error.kind is ErrorKind.REGISTRY_ERROR
    assert "gave up after 3 attempts" in result.error.message
    assert len(store.pulls) == 3


def test_backoff_doubles_up_to_a_cap() -> None:
    policy = RetryPolicy(attempts=10, first_delay=1.0, max_delay=5.0)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_cancel_during_a_retry_wait_answers_cancelled() -> None:
    store = FlakyStore([PullFailed(ErrorKind.STALLED, "silent")] * 5)
    connection = FakeConnection()
    service = PullService("node-a", store, 1, RetryPolicy(attempts=5, first_delay=30))
    service.on_delivery(delivery_for("flaky:1"), connection)
    time.sleep(0.2)  # in its first 30 s wait
    service.cancel()
    connection.drain_until(lambda: bool(connection.acked), timeout=5)
    service.shutdown(wait=True)
    result = connection.replies[0][2]
    assert result.error is not None
    assert result.error.kind is ErrorKind.CANCELLED
    assert "shutting down" in result.error.message


def test_an_image_known_from_memory_is_answered_on_the_connection_thread_at_once(
    service: PullService, store: FakeStore, connection: FakeConnection
) -> None:
    store.remembered.add("docker.io/library/cached:1")
    delivery = delivery_for("cached:1")
    service.on_delivery(delivery, connection)  # no draining: answered before it returns
    assert connection.acked == [delivery.delivery_tag]
    [(_, _, result)] = connection.replies
    assert result.status is Status.PRESENT
    assert result.image_id == "sha256:remembered"
    assert store.pulls == []
    assert service.unfinished == 0
