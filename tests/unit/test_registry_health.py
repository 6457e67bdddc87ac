"""What the worker remembers about registries and missing images stays bounded."""

from __future__ import annotations

import gc
import weakref

from contract import ErrorKind, PullFailed, parse_reference
from worker.pulls.registry_health import MAX_REGISTRIES, NotFoundMemory, RegistryBreaker


def missing(index: int) -> str:
    return f"registry.example/missing/image-{index}:1"


def test_the_not_found_memory_keeps_no_exception_and_so_no_traceback() -> None:
    memory = NotFoundMemory(10, clock=lambda: 0.0)

    def fail() -> None:
        held_by_the_frame = bytearray(1_000_000)  # what a pull's frames hold (a response, a pool)
        raise PullFailed(ErrorKind.NOT_FOUND, f"manifest unknown ({len(held_by_the_frame)})")

    try:
        fail()
    except PullFailed as failure:
        memory.remember(parse_reference(missing(1)), failure)
        remembered = weakref.ref(failure)
    gc.collect()
    assert remembered() is None, "the memory keeps the failure, its traceback and frames alive"
    recalled = memory.recall(parse_reference(missing(1)))
    assert recalled is not None and recalled.kind is ErrorKind.NOT_FOUND
    assert recalled.message == "manifest unknown (1000000)"


def test_a_flood_of_distinct_missing_images_stays_within_the_byte_bound() -> None:
    memory = NotFoundMemory(3600, clock=lambda: 0.0, max_bytes=100_000)
    long_message = "manifest unknown " + "x" * 5000
    for index in range(20_000):
        memory.remember(
            parse_reference(missing(index)), PullFailed(ErrorKind.NOT_FOUND, long_message)
        )
    count, held = memory.held
    assert held <= 100_000
    assert 0 < count < 20_000
    # The newest are kept, the oldest went first; the message is cut.
    newest = memory.recall(parse_reference(missing(19_999)))
    assert newest is not None and len(newest.message) == NotFoundMemory.MESSAGE_LIMIT
    assert memory.recall(parse_reference(missing(0))) is None


def test_expired_entries_are_swept_without_being_asked_for() -> None:
    now = [0.0]
    memory = NotFoundMemory(10, clock=lambda: now[0])
    failure = PullFailed(ErrorKind.NOT_FOUND, "manifest unknown")
    for index in range(1000):
        memory.remember(parse_reference(missing(index)), failure)
    assert memory.held[0] == 1000
    now[0] = 11.0
    memory.remember(parse_reference(missing(1000)), failure)  # one new entry sweeps the rest
    assert memory.held[0] == 1


def test_remembering_an_image_again_counts_its_bytes_once() -> None:
    memory = NotFoundMemory(10, clock=lambda: 0.0)
    failure = PullFailed(ErrorKind.NOT_FOUND, "manifest unknown")
    memory.remember(parse_reference(missing(1)), failure)
    once = memory.held
    for _ in range(10):
        memory.remember(parse_reference(missing(1)), failure)
    assert memory.held == once
    memory.forget(parse_reference(missing(1)))
    assert memory.held == (0, 0)


def test_other_failures_are_not_remembered() -> None:
    memory = NotFoundMemory(10, clock=lambda: 0.0)
    memory.remember(parse_reference(missing(1)), PullFailed(ErrorKind.REGISTRY_ERROR, "500"))
    assert memory.held == (0, 0)


def test_the_breaker_keeps_a_bounded_number_of_registries() -> None:
    breaker = RegistryBreaker(cooldown=30, clock=lambda: 0.0)
    failure = PullFailed(ErrorKind.REGISTRY_UNREACHABLE, "no such host")
    for index in range(MAX_REGISTRIES + 500):
        image = parse_reference(f"host-{index}.example/a:1")
        breaker.attempt_failed(image, failure, gave_up=True)
    down = breaker.down()
    assert len(down) == MAX_REGISTRIES
    assert f"host-{MAX_REGISTRIES + 499}.example" in down  # the latest are kept
    assert "host-0.example" not in down
