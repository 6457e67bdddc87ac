"""``ctr events`` as the image index's feed (:class:`CtrImageEvents`), over a stand-in
``ctr`` (``fake_ctr.py``); the real one is in tests/integration/test_containerd.py."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.stores.containerd import events as containerd
from worker.stores.containerd.events import PROBE_PREFIX, CtrImageEvents

FAKE_CTR = Path(__file__).with_name("fake_ctr.py")


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(containerd, "PROBE_INTERVAL", 0.1)
    monkeypatch.setattr(containerd, "SUBSCRIBE_WAIT", 10.0)
    return tmp_path


@pytest.fixture
def feed(state: Path) -> Iterator[CtrImageEvents]:
    events = CtrImageEvents([sys.executable, str(FAKE_CTR), str(state)], "k8s.io")
    yield events
    events.interrupt()


def next_within(events: Iterator[object], seconds: float = 10.0) -> object:
    """The feed's next item, or a failure after ``seconds`` (not a test that hangs)."""
    got: list[object] = []
    taker = threading.Thread(target=lambda: got.append(next(events)), daemon=True)
    taker.start()
    taker.join(seconds)
    assert got, f"nothing came from the feed within {seconds} s"
    return got[0]


def created(state: Path) -> list[str]:
    log = state / "log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[2] for line in lines if line.split()[1] == "create"]


def removed(state: Path) -> list[str]:
    lines = (state / "log").read_text().splitlines()
    return [line.split()[2] for line in lines if line.split()[1] == "remove"]


def test_probes_again_until_one_is_seen_so_a_slow_subscription_is_not_missed(
    state: Path, feed: CtrImageEvents
) -> None:
    (state / "subscribe_delay").write_text("0.8")
    events = feed.follow()
    try:
        assert next_within(events) == "/namespaces/create"
        probes = created(state)
        assert len(probes) >= 2, probes  # the first ones came before the subscription
        assert all(name.startswith(PROBE_PREFIX) for name in probes)
    finally:
        events.close()
    deadline = time.monotonic() + 5
    while set(removed(state)) < set(created(state)):
        assert time.monotonic() < deadline, "a probe's namespace was left behind"
        time.sleep(0.05)


def test_after_subscribing_anything_but_a_namespace_created_counts_as_an_image_event(
    state: Path, feed: CtrImageEvents
) -> None:
    events = feed.follow()
    try:
        assert next_within(events) == "/namespaces/create"
        (state / "lines").write_text(
            "2026-12-02 14:00:01.1 +0000 UTC default /namespaces/create "
            '{"name":"someone-else"}\n'
            "2026-12-02 14:00:01.2 +0000 UTC k8s.io /images/delete "
            '{"name":"docker.io/library/busybox:1"}\n'
            "a line this reader cannot read\n"
        )
        assert next_within(events) == "/images/delete"
        assert next_within(events) == ""  # unreadable: counted, so memory is emptied
    finally:
        events.close()


def test_leftover_probe_namespaces_are_removed(state: Path, feed: CtrImageEvents) -> None:
    (state / "namespaces").write_text(f"k8s.io\n{PROBE_PREFIX}left\ndefault\n")
    events = feed.follow()
    try:
        next_within(events)
    finally:
        events.close()
    assert f"{PROBE_PREFIX}left" in removed(state)
    assert "k8s.io" not in removed(state) and "default" not in removed(state)


def test_interrupting_ends_the_follow_quietly_and_kills_every_ctr(
    state: Path, feed: CtrImageEvents
) -> None:
    (state / "subscribe_delay").write_text("60")  # never subscribes: probing all along
    outcome: list[object] = []

    def follow() -> None:
        try:
            outcome.extend(feed.follow())
        except Exception as error:
            outcome.append(error)

    follower = threading.Thread(target=follow)
    follower.start()
    deadline = time.monotonic() + 5
    while len(created(state)) < 2:
        assert time.monotonic() < deadline, "no probing"
        time.sleep(0.02)
    feed.interrupt()
    follower.join(5)
    assert not follower.is_alive()
    assert outcome == []
    assert list(feed.follow()) == []  # one started after the interrupt ends at once


def test_a_ctr_that_ends_says_why(state: Path) -> None:
    broken = CtrImageEvents([sys.executable, str(FAKE_CTR), str(state), "nonsense"], "k8s.io")
    with pytest.raises(RuntimeError, match="ctr events ended: fake ctr cannot"):
        list(broken.follow())
