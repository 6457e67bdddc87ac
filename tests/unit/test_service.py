"""PullService with a fake image store: threads, answers, slots, retries, memory."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contract import (
    CheckRequest,
    ErrorKind,
    ImageReference,
    Lane,
    NodeProgress,
    NodeResult,
    PullFailed,
    Pulling,
    PullRequest,
    Status,
    parse_reference,
)
from contract.policy import ImagePolicy, allowed_prefixes
from tests.fakes.store import MemoryStore as FakeStore
from tests.waiting import eventually
from worker.admission import Admission, RequestLimiter
from worker.pulls.observers import Observers, PullObserver
from worker.pulls.owed import (
    MAX_FILE_BYTES,
    OWED_FILE,
    OwedPull,
    read_owed_file,
    write_owed_file,
)
from worker.pulls.registry_health import NotFoundMemory, RegistryBreaker
from worker.pulls.retry import RetryPolicy
from worker.pulls.service import PullService
from worker.stores.contract import ImageInfo, PullProgress


class Answers:
    """Collects results and progress from whatever thread the service calls back on."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.results: list[NodeResult] = []
        self.threads: list[str] = []
        self.progress: list[NodeProgress] = []

    def answer(self, result: NodeResult) -> None:
        with self.changed:
            self.results.append(result)
            self.threads.append(threading.current_thread().name)
            self.changed.notify_all()

    def on_progress(self, message: NodeProgress) -> None:
        with self.changed:
            self.progress.append(message)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[NodeResult]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.results) >= count, timeout), (
                f"{len(self.results)} of {count} answers"
            )
            return list(self.results)


def request_for(image: str) -> PullRequest:
    return PullRequest.new(parse_reference(image))


@pytest.fixture
def store() -> FakeStore:
    return FakeStore(pulled=ImageInfo("sha256:pulled", "sha256:digest"))


@pytest.fixture
def answers() -> Answers:
    return Answers()


def make_service(store: FakeStore, slots: int = 2, **kwargs: object) -> PullService:
    return PullService("node-a", store, slots, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def service(store: FakeStore) -> Iterator[PullService]:
    service = make_service(store)
    yield service
    service.shutdown(wait=True)


def submit(service: PullService, answers: Answers, image: str) -> PullRequest:
    request = request_for(image)
    service.submit(request, answers.answer, answers.on_progress)
    return request


def test_an_image_already_there_is_answered_present_without_pulling(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.hold("docker.io/library/busybox:latest")
    request = submit(service, answers, "busybox")
    [result] = answers.wait_for(1)
    assert (result.status, result.node, result.request_id) == (
        Status.PRESENT,
        "node-a",
        request.request_id,
    )
    assert store.pulls == []
    assert service.unfinished == 0


def test_a_missing_image_is_pulled_off_the_calling_thread(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    submit(service, answers, "busybox:1")
    [result] = answers.wait_for(1)
    assert result.status is Status.PULLED
    assert (result.image_id, result.digest) == ("sha256:pulled", "sha256:digest")
    assert store.pulls == ["docker.io/library/busybox:1"]
    assert threading.current_thread().name not in store.pull_threads
    assert service.unfinished == 0


def test_an_image_known_from_memory_is_answered_on_the_calling_thread_at_once(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.hold("docker.io/library/cached:1", "sha256:remembered", remembered=True)
    submit(service, answers, "cached:1")  # answered before submit returns
    assert [r.status for r in answers.results] == [Status.PRESENT]
    assert answers.threads == [threading.current_thread().name]
    assert answers.results[0].image_id == "sha256:remembered"
    assert store.pulls == []
    assert service.unfinished == 0


def test_the_caller_is_free_while_a_pull_runs(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.gates["docker.io/library/slow:1"] = threading.Event()
    store.hold("docker.io/library/there:latest")
    submit(service, answers, "slow:1")
    submit(service, answers, "there")
    assert answers.wait_for(1)[0].status is Status.PRESENT
    store.gates["docker.io/library/slow:1"].set()
    assert answers.wait_for(2)[1].status is Status.PULLED


def test_identical_requests_join_one_pull_and_each_gets_an_answer(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.gates["docker.io/library/same:1"] = threading.Event()
    requests = [submit(service, answers, "same:1") for _ in range(3)]
    eventually(lambda: store.running == 1)
    time.sleep(0.2)  # the other two join it (nothing to watch for: they just wait)
    store.gates["docker.io/library/same:1"].set()
    results = answers.wait_for(3)
    assert store.pulls == ["docker.io/library/same:1"]
    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in requests)
    assert {r.status for r in results} == {Status.PULLED}


def test_a_failed_pull_is_answered_with_its_kind_and_message(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.failures["docker.io/library/gone:1"] = [PullFailed(ErrorKind.NOT_FOUND, "no such tag")]
    submit(service, answers, "gone:1")
    [result] = answers.wait_for(1)
    assert result.status is Status.FAILED
    assert result.error is not None
    assert (result.error.kind, result.error.message) == (ErrorKind.NOT_FOUND, "no such tag")


def test_an_unexpected_exception_becomes_an_internal_failure_not_a_crash(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.failures["docker.io/library/bug:1"] = [RuntimeError("kaboom")]
    submit(service, answers, "bug:1")
    result = answers.wait_for(1)[0]
    assert result.error is not None
    assert result.error.kind is ErrorKind.INTERNAL
    assert "kaboom" in result.error.message
    submit(service, answers, "fine:1")  # still serving
    assert answers.wait_for(2)[1].status is Status.PULLED


def test_a_callback_that_raises_does_not_stop_the_service(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    def broken(_result: NodeResult) -> None:
        raise RuntimeError("the broker is gone")

    service.submit(request_for("a:1"), broken)
    submit(service, answers, "b:1")
    assert answers.wait_for(1)[0].status is Status.PULLED
    deadline = time.monotonic() + 5
    while service.unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.unfinished == 0


def test_progress_is_throttled_starts_once_the_size_is_known_and_reaches_every_joined_request(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.gates["docker.io/library/big:1"] = threading.Event()
    store.progress_steps = [PullProgress(0, 0)] + [
        PullProgress(done, 1000) for done in range(0, 1001, 10)
    ]
    first, second = submit(service, answers, "big:1"), submit(service, answers, "big:1")
    eventually(lambda: store.running == 1)
    time.sleep(0.2)  # the second joins the first's pull
    store.gates["docker.io/library/big:1"].set()
    answers.wait_for(2)
    by_request: dict[str, list[int]] = {}
    for message in answers.progress:
        assert message.total == 1000, "progress with no known size was sent"
        by_request.setdefault(message.request_id, []).append(message.done)
    assert set(by_request) == {first.request_id, second.request_id}
    for dones in by_request.values():
        # 101 engine events in well under a second: throttled to the first and the last.
        assert dones[0] == 0
        assert dones[-1] == 1000
        assert len(dones) < 10


def test_a_request_that_did_not_ask_for_progress_gets_none_while_one_that_did_gets_it(
    service: PullService, store: FakeStore, answers: Answers
) -> None:
    store.progress_steps = [PullProgress(done, 1000) for done in range(0, 1001, 100)]
    quiet = PullRequest.new(parse_reference("quiet:1"), progress=False)
    asked = PullRequest.new(parse_reference("asked:1"))
    for request in (quiet, asked):
        service.submit(request, answers.answer, answers.on_progress)
    assert {r.status for r in answers.wait_for(2)} == {Status.PULLED}
    assert {m.request_id for m in answers.progress} == {asked.request_id}
    assert [m.done for m in answers.progress][-1] == 1000


class HeldStore(FakeStore):
    """Reports some progress, then holds every pull until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__(pulled=ImageInfo("sha256:pulled", "sha256:digest"))
        self.reported = threading.Event()
        self.go = threading.Event()

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        if on_progress is not None:
            on_progress(PullProgress(300, 1000))
        self.reported.set()
        assert self.go.wait(10)
        return super().pull(image, on_progress)


def test_a_check_while_the_image_is_pulled_for_someone_else_says_how_far_it_is() -> None:
    store, pulls, checks = HeldStore(), Answers(), Answers()
    service = make_service(store)
    try:
        submit(service, pulls, "big:1")
        assert store.reported.wait(10)
        for image in ("big:1", "other:1"):
            service.check(CheckRequest.new(parse_reference(image)), checks.answer)
        during = {r.image: r for r in checks.wait_for(2)}
        assert during["docker.io/library/big:1"].status is Status.ABSENT
        assert during["docker.io/library/big:1"].pulling == Pulling(300, 1000)
        assert during["docker.io/library/other:1"].status is Status.ABSENT
        assert during["docker.io/library/other:1"].pulling is None
        store.go.set()
        assert pulls.wait_for(1)[0].status is Status.PULLED
        service.check(CheckRequest.new(parse_reference("big:1")), checks.answer)
        after = checks.wait_for(3)[2]
        assert (after.status, after.pulling) == (Status.PRESENT, None)
    finally:
        store.go.set()
        service.shutdown(wait=True)


def serve_one(
    store: FakeStore, policy: RetryPolicy, image: str = "flaky:1", **kwargs: object
) -> NodeResult:
    answers = Answers()
    service = make_service(store, 1, retry=policy, **kwargs)
    try:
        submit(service, answers, image)
        return answers.wait_for(1)[0]
    finally:
        service.shutdown(wait=True)


def test_transient_failures_are_retried_until_the_pull_succeeds(store: FakeStore) -> None:
    store.failures["docker.io/library/flaky:1"] = [
        PullFailed(ErrorKind.REGISTRY_UNREACHABLE, "refused"),
        PullFailed(ErrorKind.STALLED, "silent"),
    ]
    result = serve_one(store, RetryPolicy(attempts=3, first_delay=0.01))
    assert result.status is Status.PULLED
    assert len(store.pulls) == 3


def test_permanent_failures_are_not_retried(store: FakeStore) -> None:
    store.failures["docker.io/library/flaky:1"] = [PullFailed(ErrorKind.NOT_FOUND, "no tag")]
    result = serve_one(store, RetryPolicy(attempts=3, first_delay=0.01))
    assert result.error is not None
    assert result.error.kind is ErrorKind.NOT_FOUND
    assert len(store.pulls) == 1


def test_retries_are_bounded_and_the_answer_says_so(store: FakeStore) -> None:
    store.failures["docker.io/library/flaky:1"] = [PullFailed(ErrorKind.REGISTRY_ERROR, "503")] * 5
    result = serve_one(store, RetryPolicy(attempts=3, first_delay=0.01))
    assert result.error is not None
    assert result.error.kind is ErrorKind.REGISTRY_ERROR
    assert "gave up after 3 attempts" in result.error.message
    assert len(store.pulls) == 3


def test_backoff_doubles_up_to_a_cap() -> None:
    policy = RetryPolicy(attempts=10, first_delay=1.0, max_delay=5.0)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_retry_waits_are_jittered_between_the_first_delay_and_the_cap() -> None:
    # Nodes that met the same failing registry (a 429, a 503) must not retry in lockstep.
    schedules = []
    for seed in range(5):
        policy = RetryPolicy(attempts=10, first_delay=1.0, uniform=random.Random(seed).uniform)
        waits, last = [], None
        for _ in range(8):
            last = policy.wait(last)
            waits.append(last)
        assert all(1.0 <= wait <= 15.0 for wait in waits), waits
        schedules.append(waits)
    assert len({tuple(s) for s in schedules}) == 5, "the nodes' schedules are all different"
    assert len({s[0] for s in schedules}) == 5, "even the first retry is spread"


def test_each_retry_draws_from_the_first_delay_to_three_times_the_last_wait(
    store: FakeStore, answers: Answers
) -> None:
    store.failures["docker.io/library/flaky:1"] = [PullFailed(ErrorKind.REGISTRY_ERROR, "429")] * 2
    draws: list[tuple[float, float]] = []

    def highest(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    retry = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05, uniform=highest)
    service = make_service(store, 1, retry=retry)
    try:
        submit(service, answers, "flaky:1")
        assert answers.wait_for(1)[0].status is Status.PULLED
    finally:
        service.shutdown(wait=True)
    assert [(low, round(high, 6)) for low, high in draws] == [(0.01, 0.03), (0.01, 0.09)]
    assert len(store.pulls) == 3


def test_a_pull_waiting_to_retry_gives_its_slot_to_another_image(
    store: FakeStore, answers: Answers
) -> None:
    store.failures["docker.io/library/flaky:1"] = [PullFailed(ErrorKind.REGISTRY_ERROR, "503")]
    service = make_service(store, 1, retry=RetryPolicy(attempts=2, first_delay=1.0))
    try:
        submit(service, answers, "flaky:1")
        eventually(lambda: store.pulls == ["docker.io/library/flaky:1"] and store.running == 0)
        # its first attempt failed; it waits 1 s to retry
        submit(service, answers, "other:1")
        first = answers.wait_for(1, timeout=0.8)[0]
        assert (first.image, first.status) == ("docker.io/library/other:1", Status.PULLED)
        assert answers.wait_for(2)[1].status is Status.PULLED
    finally:
        service.shutdown(wait=True)


def test_cancel_answers_running_queued_and_retrying_pulls_cancelled(
    store: FakeStore, answers: Answers
) -> None:
    store.gates["docker.io/library/running:1"] = threading.Event()
    store.failures["docker.io/library/retrying:1"] = [PullFailed(ErrorKind.STALLED, "silent")] * 5
    service = make_service(store, 1, retry=RetryPolicy(attempts=5, first_delay=30))
    try:
        submit(service, answers, "retrying:1")
        eventually(lambda: store.pulls == ["docker.io/library/retrying:1"] and not store.running)
        # in its first 30 s wait
        submit(service, answers, "running:1")
        submit(service, answers, "queued:1")
        eventually(lambda: store.running == 1 and service.unfinished == 3)
        service.cancel()
        results = answers.wait_for(3, timeout=5)
    finally:
        service.shutdown(wait=True)
    for result in results:
        assert result.error is not None, result
        assert result.error.kind is ErrorKind.CANCELLED
    assert "docker.io/library/queued:1" not in store.pulls


def test_at_most_the_slots_run_at_once_within_one_registry(
    store: FakeStore, answers: Answers
) -> None:
    gate = threading.Event()
    images = [f"r.example/app/{n}:1" for n in range(6)]
    for image in images:
        store.gates[image] = gate
    service = make_service(store, 2)
    try:
        for image in images:
            submit(service, answers, image)
        eventually(lambda: store.running == 2)
        time.sleep(0.2)  # room for a third to start, were the slots not respected
        assert store.running == 2
        gate.set()
        answers.wait_for(6)
    finally:
        service.shutdown(wait=True)
    assert store.most_running == 2


def test_a_registry_that_holds_every_slot_does_not_starve_another(
    store: FakeStore, answers: Answers
) -> None:
    stuck = threading.Event()
    for n in range(4):
        store.gates[f"black.hole/app/{n}:1"] = stuck
    service = make_service(store, 2)
    try:
        for n in range(4):
            submit(service, answers, f"black.hole/app/{n}:1")
        eventually(lambda: store.running == 2)
        submit(service, answers, "healthy.example/app:1")
        [result] = answers.wait_for(1, timeout=2)
        assert (result.image, result.status) == ("healthy.example/app:1", Status.PULLED)
        stuck.set()
        answers.wait_for(5)
    finally:
        service.shutdown(wait=True)


def test_time_waiting_for_a_slot_is_reported_apart(store: FakeStore, answers: Answers) -> None:
    gate = threading.Event()
    store.gates["r.example/first:1"] = gate
    service = make_service(store, 1)
    try:
        submit(service, answers, "r.example/first:1")
        eventually(lambda: store.running == 1)
        submit(service, answers, "r.example/second:1")
        time.sleep(0.5)  # the time the second waits for a slot: what is measured
        gate.set()
        results = {r.image: r for r in answers.wait_for(2)}
    finally:
        service.shutdown(wait=True)
    second = results["r.example/second:1"]
    assert second.queued_seconds >= 0.4
    assert second.seconds >= second.queued_seconds
    assert results["r.example/first:1"].queued_seconds < 0.1


def test_a_registry_known_down_fails_fast_and_is_tried_again_after_the_cooldown(
    store: FakeStore, answers: Answers
) -> None:
    down = PullFailed(ErrorKind.REGISTRY_UNREACHABLE, "dial tcp: connection refused")
    store.failures["down.example/a:1"] = [down, down]
    now = [1000.0]
    breaker = RegistryBreaker(cooldown=30, clock=lambda: now[0])
    service = make_service(
        store, 2, retry=RetryPolicy(attempts=2, first_delay=0.01), breaker=breaker
    )
    try:
        submit(service, answers, "down.example/a:1")
        first = answers.wait_for(1)[0]
        assert first.error is not None and "gave up after 2 attempts" in first.error.message
        submit(service, answers, "down.example/b:1")  # another image, same registry
        second = answers.wait_for(2)[1]
        assert second.error is not None
        assert second.error.kind is ErrorKind.REGISTRY_UNREACHABLE
        assert "known to be down" in second.error.message
        assert "down.example/b:1" not in store.pulls, "a known-down registry was tried"
        assert breaker.down() == ["down.example"]
        now[0] += 31
        submit(service, answers, "down.example/b:1")
        assert answers.wait_for(3)[2].status is Status.PULLED
        assert breaker.down() == []
    finally:
        service.shutdown(wait=True)


def test_a_stall_after_some_bytes_does_not_mark_the_registry_down(store: FakeStore) -> None:
    store.progress_steps = [PullProgress(500, 1000)]
    store.failures["slow.example/a:1"] = [PullFailed(ErrorKind.STALLED, "silent mid-layer")]
    breaker = RegistryBreaker(cooldown=30)
    result = serve_one(store, RetryPolicy(attempts=1), image="slow.example/a:1", breaker=breaker)
    assert result.error is not None and result.error.kind is ErrorKind.STALLED
    assert breaker.down() == []


def test_not_found_is_repeated_from_memory_for_a_while(store: FakeStore, answers: Answers) -> None:
    store.failures["docker.io/library/typo:1"] = [PullFailed(ErrorKind.NOT_FOUND, "manifest")]
    now = [0.0]
    service = make_service(store, 2, not_found=NotFoundMemory(10, clock=lambda: now[0]))
    try:
        submit(service, answers, "typo:1")
        answers.wait_for(1)
        for _ in range(100):
            submit(service, answers, "typo:1")  # answered on this thread, from memory
        assert len(answers.results) == 101
        assert {r.error.kind for r in answers.results if r.error} == {ErrorKind.NOT_FOUND}
        assert "from memory" in str(answers.results[-1].error)
        assert store.pulls == ["docker.io/library/typo:1"]
        now[0] = 11.0
        submit(service, answers, "typo:1")  # pushed since: pulled now
        assert answers.wait_for(102)[-1].status is Status.PULLED
    finally:
        service.shutdown(wait=True)


def test_a_request_counts_as_unfinished_until_its_answer_is_handed_over(
    service: PullService, store: FakeStore
) -> None:
    # A worker that stops drains until nothing is unfinished and the broker has sent what
    # it was handed: the request must not look finished before its answer is handed over.
    seen: list[int] = []
    done = threading.Event()

    def answer(_result: NodeResult) -> None:
        seen.append(service.unfinished)
        done.set()

    service.submit(request_for("counted:1"), answer)
    assert done.wait(10)
    assert seen == [1]
    eventually(lambda: service.unfinished == 0)


def test_a_refused_request_answers_forbidden_and_never_reaches_the_engine(
    store: FakeStore, answers: Answers
) -> None:
    # refused even if present
    store.hold("docker.io/library/busybox:latest", "sha256:remembered", remembered=True)
    service = make_service(
        store,
        admission=Admission(ImagePolicy(allowed_prefixes("docker.io/cyberdojofoundation"))),
    )
    try:
        service.submit(request_for("busybox"), answers.answer, asked_by="sessions")
        service.submit(request_for("cyberdojofoundation/gcc_assert"), answers.answer)
        results = answers.wait_for(2)
    finally:
        service.shutdown(wait=True)
    allowed, refused = sorted(results, key=lambda r: r.image)
    assert refused.error is not None and refused.error.kind is ErrorKind.FORBIDDEN
    assert allowed.status is Status.PULLED
    assert store.pulls == ["docker.io/cyberdojofoundation/gcc_assert:latest"]
    assert service.unfinished == 0


def test_the_cap_counts_only_live_requests_that_start_a_pull(
    store: FakeStore, answers: Answers
) -> None:
    store.hold("docker.io/library/known:latest", "sha256:remembered", remembered=True)
    store.hold("docker.io/library/there:latest")
    service = make_service(store, limiter=RequestLimiter(1))
    try:
        service.submit(request_for("known"), answers.answer)  # from memory: not counted
        service.submit(request_for("there"), answers.answer)  # the engine has it: neither
        service.submit(request_for("first"), answers.answer)
        answers.wait_for(3)
        service.submit(request_for("second"), answers.answer)  # over the cap
        service.submit(request_for("third"), answers.answer, live=False)  # a replay
        results = {r.image.split("/")[-1]: r for r in answers.wait_for(5)}
    finally:
        service.shutdown(wait=True)
    assert results["known:latest"].status is Status.PRESENT
    assert results["there:latest"].status is Status.PRESENT
    assert results["first:latest"].status is Status.PULLED
    assert results["third:latest"].status is Status.PULLED
    limited = results["second:latest"].error
    assert limited is not None and limited.kind is ErrorKind.RATE_LIMITED
    assert "second" not in " ".join(store.pulls)


def test_an_image_that_failed_while_the_engine_was_away_is_pulled_once_it_answers(
    store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.05)
    away = PullFailed(ErrorKind.ENGINE_UNAVAILABLE, "cannot reach the engine")
    store.failures["docker.io/library/flaky:1"] = [away, away]
    answers = Answers()
    service = make_service(store, 1, retry=RetryPolicy(attempts=2, first_delay=0.01))
    try:
        submit(service, answers, "flaky:1")
        result = answers.wait_for(1)[0]
        assert result.error is not None and result.error.kind is ErrorKind.ENGINE_UNAVAILABLE
        assert "pulls it by itself once its engine answers again" in result.error.message
        eventually(lambda: "docker.io/library/flaky:1" in store.present)
        assert len(store.pulls) == 3  # two attempts answered, then one when the engine was back
        eventually(lambda: service.owed_waiting == 0 and service.unfinished == 0)
        assert len(answers.results) == 1  # the later pull answers no one
    finally:
        service.shutdown(wait=True)


def test_with_allowed_publishers_the_later_pull_goes_out_as_its_first_asker(
    store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pull made once the engine is back is checked as the request it stands for: by
    the publisher that asked (with PULLER_ALLOWED_PUBLISHERS, a pull nobody asked for would
    be refused)."""
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.05)
    away = PullFailed(ErrorKind.ENGINE_UNAVAILABLE, "cannot reach the engine")
    store.failures["docker.io/library/flaky:1"] = [away]
    answers = Answers()
    service = make_service(
        store,
        1,
        retry=RetryPolicy(attempts=1),
        admission=Admission(ImagePolicy(()), frozenset({"sessions"})),
    )
    try:
        service.submit(request_for("flaky:1"), answers.answer, asked_by="sessions")
        result = answers.wait_for(1)[0]
        assert result.error is not None and result.error.kind is ErrorKind.ENGINE_UNAVAILABLE
        eventually(lambda: "docker.io/library/flaky:1" in store.present)
        eventually(lambda: service.owed_waiting == 0 and service.unfinished == 0)
    finally:
        service.shutdown(wait=True)


def test_pulls_owed_while_the_engine_is_away_survive_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker stops while its engine is still away; the next one makes the pulls, each
    checked again as the publisher that asked."""
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.05)
    path = tmp_path / OWED_FILE
    store = FakeStore()
    store.away.set()
    answers = Answers()
    first = make_service(store, 1, retry=RetryPolicy(attempts=1), owed_file=path)
    try:
        first.submit(request_for("flaky:1"), answers.answer, asked_by="sessions")
        first.submit(PullRequest.new(parse_reference("warm:1"), lane=Lane.WARM), answers.answer)
        answers.wait_for(2)
        eventually(lambda: len(read_owed_file(path)) == 2)
        eventually(lambda: store.pulls.count("away docker.io/library/flaky:1") == 1)
    finally:
        first.shutdown(wait=True)
    kept = {str(image): (o.lane, o.asked_by) for image, o in read_owed_file(path).items()}
    assert kept == {
        "docker.io/library/flaky:1": (Lane.SESSION, "sessions"),
        "docker.io/library/warm:1": (Lane.WARM, None),
    }

    store.away.clear()
    second = make_service(
        store, 1, owed_file=path, admission=Admission(publishers=frozenset({"sessions"}))
    )
    try:
        assert second.resume_owed() == 2
        eventually(lambda: "docker.io/library/flaky:1" in store.present)
        eventually(lambda: not path.exists())  # nothing owed any more
        eventually(lambda: second.owed_waiting == 0 and second.unfinished == 0)
        # Asked by nobody, which these rules do not allow: refused now, and not owed.
        assert "docker.io/library/warm:1" not in store.present
    finally:
        second.shutdown(wait=True)


def test_a_pull_made_again_that_meets_the_engine_away_again_stays_owed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.05)
    path = tmp_path / OWED_FILE
    store = FakeStore(hold_at=3)
    away = PullFailed(ErrorKind.ENGINE_UNAVAILABLE, "restarting")
    store.failures["docker.io/library/flaky:1"] = [away, away]  # the engine answers, pulls fail
    service = make_service(store, 1, retry=RetryPolicy(attempts=1), owed_file=path)
    try:
        service.submit(request_for("flaky:1"), Answers().answer)
        assert store.held.wait(10)  # the first failed, the one made again failed: a third runs
        kept = {str(image): owed.tries for image, owed in read_owed_file(path).items()}
        assert kept == {"docker.io/library/flaky:1": 2}  # made again twice, counted on disk
        store.release.set()
        eventually(lambda: "docker.io/library/flaky:1" in store.present)
        eventually(lambda: not path.exists())
    finally:
        store.release.set()
        service.shutdown(wait=True)


def test_an_owed_pull_that_keeps_meeting_the_store_away_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store answers questions but every pull of this image finds it away (a pull that
    takes the store down): made again OWED_MAX_TRIES times, then given up, on disk too."""
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.02)
    monkeypatch.setattr("worker.pulls.owed.OWED_MAX_TRIES", 3)
    path = tmp_path / OWED_FILE
    store = FakeStore()
    away = PullFailed(ErrorKind.ENGINE_UNAVAILABLE, "the engine went away mid-pull")
    store.failures["docker.io/library/poison:1"] = [away] * 50
    service = make_service(store, 1, retry=RetryPolicy(attempts=1), owed_file=path)
    try:
        service.submit(request_for("poison:1"), Answers().answer)
        eventually(
            lambda: service.owed_waiting == 0 and service.unfinished == 0 and not path.exists()
        )
        time.sleep(0.2)  # no more remaking: nothing to wait for
        assert store.pulls.count("docker.io/library/poison:1") == 1 + 3
    finally:
        service.shutdown(wait=True)


def test_owed_pulls_older_than_a_day_are_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.02)
    path = tmp_path / OWED_FILE
    now = time.time()
    write_owed_file(
        path,
        {
            parse_reference("old:1"): OwedPull(Lane.SESSION, None, now - 2 * 24 * 3600),
            parse_reference("new:1"): OwedPull(Lane.SESSION, None, now - 60),
        },
    )
    store = FakeStore()
    service = make_service(store, 1, owed_file=path)
    try:
        assert service.resume_owed() == 2
        eventually(lambda: service.unfinished == 0 and not path.exists())
        assert store.pulls == ["docker.io/library/new:1"]
    finally:
        service.shutdown(wait=True)


def test_a_pull_made_again_and_cut_by_the_worker_stopping_stays_owed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.05)
    path = tmp_path / OWED_FILE
    write_owed_file(path, {parse_reference("slow:1"): OwedPull(Lane.SESSION, None, time.time())})
    store = FakeStore()
    store.gates["docker.io/library/slow:1"] = threading.Event()
    service = make_service(store, 1, owed_file=path)
    try:
        assert service.resume_owed() == 1
        eventually(lambda: store.running == 1)  # made again, and held
        service.cancel()
        eventually(lambda: service.unfinished == 0)
    finally:
        service.shutdown(wait=True)
    assert [str(i) for i in read_owed_file(path)] == ["docker.io/library/slow:1"]


def test_an_owed_pull_with_infinity_is_skipped_and_one_from_the_future_is_owed_from_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / OWED_FILE
    path.write_text(
        '{"pulls": ['
        '{"image": "infinite:1", "lane": "session", "since": Infinity},'
        '{"image": "tries:1", "lane": "session", "since": 5, "tries": NaN},'
        '{"image": "ahead:1", "lane": "warm", "since": 1e12, "tries": 1},'
        '{"image": "fine:1", "lane": "session", "since": 5}]}'
    )
    before = time.time()
    kept = read_owed_file(path)
    assert sorted(str(image) for image in kept) == [
        "docker.io/library/ahead:1",
        "docker.io/library/fine:1",
    ]
    ahead = kept[parse_reference("ahead:1")]
    assert before <= ahead.since <= time.time() and ahead.tries == 1
    assert kept[parse_reference("fine:1")].since == 5
    out = capsys.readouterr().out
    assert out.count("skipped an unreadable owed pull") == 2
    assert "'since' is Infinity" in out and "'tries' is NaN" in out


def test_the_owed_pulls_file_is_read_entry_by_entry(tmp_path: Path) -> None:
    path = tmp_path / OWED_FILE
    for content in ("{not json", '{"pulls": 3}', "[" * 100_000, '{"pulls": []}'):
        path.write_text(content)
        assert read_owed_file(path) == {}
    path.write_text(
        '{"pulls": [{"image": "not an image!"}, {"image": "a:1", "lane": "bulk"}, 7,'
        ' {"image": "b:1", "lane": "warm", "asked_by": "ops", "since": 5, "tries": 2}]}'
    )
    kept = {str(image): owed for image, owed in read_owed_file(path).items()}
    assert kept["docker.io/library/a:1"].lane is Lane.SESSION  # a lane it does not know
    assert kept["docker.io/library/b:1"] == OwedPull(Lane.WARM, "ops", 5.0, 2)
    assert len(kept) == 2
    path.write_text(" " * (MAX_FILE_BYTES + 1))
    assert read_owed_file(path) == {}
    assert read_owed_file(tmp_path / "absent.json") == {}


def test_the_owed_pulls_file_is_written_whole_and_only_by_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "state" / OWED_FILE
    owed = {parse_reference("a:1"): OwedPull(Lane.WARM, "ops", 12.5, 1)}
    write_owed_file(path, owed)
    assert read_owed_file(path) == owed
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [OWED_FILE]  # no leftovers
    write_owed_file(path, {})
    assert not path.exists()


def test_a_worker_upgraded_in_place_makes_the_pulls_its_predecessor_owed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker upgraded in place finds its predecessor's file, under the name and in the
    form that version wrote, and makes what it owed (each as the publisher that asked)."""
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.02)
    state = tmp_path / "state"
    state.mkdir()
    legacy = state / "deferred-pulls.json"
    legacy.write_text(
        json.dumps(
            {
                "pulls": [
                    {
                        "image": "docker.io/library/flaky:1",
                        "lane": "session",
                        "asked_by": "sessions",
                        "since": time.time() - 60,
                        "tries": 1,
                    },
                    {
                        "image": "docker.io/library/warm:1",
                        "lane": "warm",
                        "asked_by": "sessions",
                        "since": time.time() - 60,
                        "tries": 0,
                    },
                ]
            }
        )
    )
    store = FakeStore()
    service = make_service(
        store,
        1,
        owed_file=state / OWED_FILE,
        admission=Admission(publishers=frozenset({"sessions"})),
    )
    try:
        assert service.resume_owed() == 2
        eventually(
            lambda: {"docker.io/library/flaky:1", "docker.io/library/warm:1"} <= store.present
        )
        eventually(lambda: not legacy.exists() and service.unfinished == 0)
    finally:
        service.shutdown(wait=True)


class AnswerCounter(PullObserver):
    """Implements one hook; the others are the base's, which do nothing."""

    def __init__(self) -> None:
        self.statuses: list[Status] = []

    def answered(self, result: NodeResult, from_memory: bool) -> None:
        self.statuses.append(result.status)


def test_an_observer_implements_only_the_hooks_it_needs(store: FakeStore) -> None:
    counter = AnswerCounter()
    answers = Answers()
    store.hold("docker.io/library/there:1")
    service = make_service(store, 1, observer=Observers(PullObserver(), counter))
    try:
        submit(service, answers, "there:1")
        submit(service, answers, "missing:1")
        answers.wait_for(2)
        eventually(lambda: service.unfinished == 0)
    finally:
        service.shutdown(wait=True)
    assert sorted(s.value for s in counter.statuses) == ["present", "pulled"]


def test_a_session_pull_interrupts_running_warm_pulls_which_go_on_afterwards() -> None:
    store = FakeStore()
    warm, later, session = (f"docker.io/library/{n}:1" for n in ("warm", "later", "session"))
    store.gates[warm] = threading.Event()
    answers = Answers()
    service = make_service(store, 1)
    try:
        for image in (warm, later):
            service.submit(PullRequest.new(parse_reference(image), lane=Lane.WARM), answers.answer)
        eventually(lambda: store.started == [warm])  # the first warm pull runs, the other waits
        service.submit(request_for(session), answers.answer)
        results = answers.wait_for(3)
        assert store.interrupted == [warm]
        # The session's pull starts at once, beside the cut; the cut pull goes on first.
        assert set(store.pulls[:2]) == {f"cut {warm}", session}
        assert store.pulls[2:] == [warm, later]
        assert {r.image: r.status for r in results} == dict.fromkeys(
            (warm, later, session), Status.PULLED
        )
        assert len(results) == 3  # the interrupted pull answered once, when it was done
    finally:
        service.shutdown(wait=True)


def test_an_engine_error_gets_one_more_try_a_few_seconds_later_and_no_more(
    store: FakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.pulls.owed.ENGINE_WATCH_INTERVAL", 0.05)
    odd = PullFailed(ErrorKind.ENGINE_ERROR, "error creating something: words never seen")
    store.failures["docker.io/library/flaky:1"] = [odd, odd, odd]
    answers = Answers()
    service = make_service(store, 1, retry=RetryPolicy(attempts=1, first_delay=0.01))
    try:
        submit(service, answers, "flaky:1")
        result = answers.wait_for(1)[0]
        assert result.error is not None and "tries once more" in result.error.message
        eventually(lambda: len(store.pulls) == 2 and service.unfinished == 0)
        time.sleep(0.3)  # absence of a third try: nothing to wait for
        assert len(store.pulls) == 2
        assert service.owed_waiting == 0
    finally:
        service.shutdown(wait=True)
