"""Eviction's policy with a fake store: what goes, what stays, in what order, and the
usage log and the high-water mode around it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from contract import ErrorKind, NodeResult, PullFailed, Status, parse_reference
from tests.fakes.store import MemoryStore
from worker.pruning.disk_watch import DiskUnreadable, DiskWatch, Housekeeping, engine_disk
from worker.pruning.pruner import (
    KeepListError,
    PruneOutcome,
    Pruner,
    PruneRule,
    choose,
    is_kept,
    last_used,
    parse_keep_list,
    prune,
    read_keep_file,
)
from worker.pruning.usage import UsageLog
from worker.settings import InvalidSetting, WorkerSettings
from worker.stores.contract import DiskUsage, ImageInUse, PrunableStore, StoredImage

DAY = 86400.0
NOW = 1_800_000_000.0
DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


def image(
    name: str | None,
    size: int = 100,
    created: float | None = None,
    tagged: float | None = None,
    digests: tuple[str, ...] = (),
    image_id: str | None = None,
) -> StoredImage:
    return StoredImage(
        image_id=image_id or f"sha256:{name or 'dangling'}",
        names=(name,) if name else (),
        repo_digests=digests,
        size_bytes=size,
        created=created,
        last_tagged=tagged,
    )


@pytest.fixture
def usage(tmp_path: Path) -> UsageLog:
    return UsageLog(tmp_path / "image-usage.json", clock=lambda: NOW)


# -- keep lists ---------------------------------------------------------------------------------


def test_a_keep_list_has_one_reference_a_line_with_comments_and_blank_lines() -> None:
    text = "# images the dojo needs\n\nredis\n  cyberdojo/runner:1.2  # pinned\n#x\n"
    assert parse_keep_list(text) == ("redis", "cyberdojo/runner:1.2")


def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("redis\n\nNot A Reference\n")
    with pytest.raises(KeepListError, match=r"keep\.txt, line 3: .*white space"):
        read_keep_file(keep)
    with pytest.raises(KeepListError, match="cannot be read"):
        read_keep_file(tmp_path / "missing.txt")


def test_a_rule_checks_its_keep_list() -> None:
    with pytest.raises(KeepListError, match="lowercase"):
        PruneRule(keep=("redis", "team/Runner"))


def test_keep_matching_normalises_as_docker_pull_does() -> None:
    redis = image("redis:latest")
    keep = [parse_reference("redis")]  # a bare name means :latest
    assert is_kept(redis, keep)
    assert is_kept(image("docker.io/library/redis:latest"), keep)
    assert not is_kept(image("redis:7"), keep)
    assert is_kept(image("redis:7"), [parse_reference("index.docker.io/library/redis:7")])
    assert not is_kept(image("127.0.0.1:5000/redis:latest"), keep)


def test_a_digest_reference_keeps_the_image_with_that_repository_digest() -> None:
    held = image("127.0.0.1:5000/a/b:1", digests=(f"127.0.0.1:5000/a/b@{DIGEST}",))
    assert is_kept(held, [parse_reference(f"127.0.0.1:5000/a/b@{DIGEST}")])
    assert is_kept(held, [parse_reference(f"127.0.0.1:5000/a/b:other@{DIGEST}")])
    assert not is_kept(held, [parse_reference(f"127.0.0.1:5000/a/b@{OTHER_DIGEST}")])
    assert not is_kept(held, [parse_reference(f"127.0.0.1:5000/a/c@{DIGEST}")])
    assert not is_kept(image(None), [parse_reference("redis")])


# -- last used and the choice -------------------------------------------------------------------


def test_last_used_is_the_latest_known_and_never_the_build_date(usage: UsageLog) -> None:
    old_build = image("a:1", created=NOW - 900 * DAY)
    assert last_used(old_build, usage, NOW) == NOW  # nothing known: not old
    usage.saw(["sha256:a:1"], NOW - 40 * DAY)
    assert last_used(old_build, usage, NOW) == NOW - 40 * DAY
    usage.record("sha256:a:1", NOW - 3 * DAY)
    assert last_used(old_build, usage, NOW) == NOW - 3 * DAY
    retagged = image("a:1", tagged=NOW - DAY)
    assert last_used(retagged, usage, NOW) == NOW - DAY


def test_in_use_and_listed_images_are_never_chosen(usage: UsageLog) -> None:
    images = [image("used:1"), image("kept:1"), image("free:1"), image(None)]
    usage.saw([i.image_id for i in images], NOW - 60 * DAY)
    rule = PruneRule(unused_for=30 * DAY, keep=("kept:1",))
    selection = choose(images, {"sha256:used:1"}, rule, usage, NOW)
    assert [c.image.image_id for c in selection.candidates] == ["sha256:dangling", "sha256:free:1"]
    assert (selection.kept_in_use, selection.kept_listed) == (1, 1)


def test_only_images_unused_long_enough_go_oldest_unused_first(usage: UsageLog) -> None:
    images = [image("a:1"), image("b:1"), image("c:1"), image("d:1")]
    usage.saw([i.image_id for i in images], NOW - 100 * DAY)
    for name, days in (("a:1", 31), ("b:1", 90), ("c:1", 29), ("d:1", 45)):
        usage.record(f"sha256:{name}", NOW - days * DAY)
    selection = choose(images, set(), PruneRule(unused_for=30 * DAY), usage, NOW)
    assert [c.image.names[0] for c in selection.candidates] == ["b:1", "d:1", "a:1"]
    recent = choose(images, set(), PruneRule(min_idle=30 * DAY), usage, NOW)
    assert "c:1" not in [c.image.names[0] for c in recent.candidates]
    everything = choose(images, set(), PruneRule(), usage, NOW)
    assert len(everything.candidates) == 4


def test_ties_go_to_the_older_build_then_the_larger_image(usage: UsageLog) -> None:
    images = [
        image("new:1", created=NOW - DAY, size=10),
        image("old-small:1", created=NOW - 9 * DAY, size=10),
        image("old-big:1", created=NOW - 9 * DAY, size=99),
    ]
    usage.saw([i.image_id for i in images], NOW - 40 * DAY)
    selection = choose(images, set(), PruneRule(), usage, NOW)
    assert [c.image.names[0] for c in selection.candidates] == [
        "old-big:1",
        "old-small:1",
        "new:1",
    ]


# -- a pass -------------------------------------------------------------------------------------


def store_with_ages(usage: UsageLog, ages: dict[str, float], size: int = 100) -> MemoryStore:
    store = MemoryStore([image(name, size=size) for name in ages])
    usage.saw([f"sha256:{name}" for name in ages], NOW - 365 * DAY)
    for name, days in ages.items():
        usage.record(f"sha256:{name}", NOW - days * DAY)
    return store


def test_a_dry_run_removes_nothing_and_says_what_it_would(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 40, "b:1": 50, "c:1": 1})
    outcome = prune(store, PruneRule(unused_for=30 * DAY, dry_run=True), usage, NOW)
    assert store.removed == []
    assert [r.names for r in outcome.removed] == [("b:1",), ("a:1",)]
    assert outcome.bytes_freed == 200 and outcome.dry_run
    assert outcome.removed[0].last_used == NOW - 50 * DAY


def test_a_pass_removes_oldest_first_and_forgets_what_it_removed(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 40, "b:1": 50, "c:1": 1})
    outcome = prune(store, PruneRule(unused_for=30 * DAY), usage, NOW)
    assert store.removed == ["sha256:b:1", "sha256:a:1"]
    assert outcome.bytes_freed == 200 and not outcome.dry_run and outcome.errors == ()
    assert usage.first_seen("sha256:a:1") is None
    saved = json.loads(usage.path.read_text())
    assert set(saved["images"]) == {"sha256:c:1"}


def test_a_budget_stops_the_pass_once_enough_is_freed(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 10, "b:1": 20, "c:1": 30, "d:1": 40})
    outcome = prune(store, PruneRule(bytes_to_free=150), usage, NOW)
    assert store.removed == ["sha256:d:1", "sha256:c:1"]
    assert outcome.bytes_freed == 200
    stopped = prune(store, PruneRule(), usage, NOW, enough=lambda freed: freed >= 100)
    assert [r.image_id for r in stopped.removed] == ["sha256:b:1"]


def test_an_image_a_container_takes_meanwhile_is_kept(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 40, "b:1": 50, "c:1": 60})
    store.in_use_later = {"sha256:c:1"}
    store.refuse["sha256:b:1"] = ImageInUse("conflict: image is being used by stopped container")
    outcome = prune(store, PruneRule(), usage, NOW)
    assert store.removed == ["sha256:a:1"]
    assert outcome.kept_in_use == 2 and outcome.errors == ()


def test_failed_removals_are_reported_and_an_engine_gone_ends_the_pass(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 40, "b:1": 50, "c:1": 60, "d:1": 70})
    store.refuse["sha256:d:1"] = PullFailed(ErrorKind.ENGINE_ERROR, "boom")
    store.refuse["sha256:b:1"] = PullFailed(ErrorKind.ENGINE_UNAVAILABLE, "gone")
    outcome = prune(store, PruneRule(), usage, NOW)
    assert store.removed == ["sha256:c:1"]
    assert outcome.errors == ("d:1: boom", "b:1: gone")


def test_a_store_that_cannot_list_raises(usage: UsageLog) -> None:
    away = MemoryStore()
    away.away.set()
    with pytest.raises(PullFailed, match="no engine"):
        prune(away, PruneRule(), usage, NOW)


def test_the_fake_is_a_prunable_store() -> None:
    assert isinstance(MemoryStore(), PrunableStore)


# -- the usage log ------------------------------------------------------------------------------


def result(status: Status, image_id: str | None) -> NodeResult:
    if status is Status.FAILED:
        return NodeResult.failure("r1", "n1", "a:1", ErrorKind.NOT_FOUND, "no", 0.1)
    return NodeResult("r1", "n1", "a:1", status, 0.1, image_id=image_id)


def test_the_usage_log_records_pulled_and_present_answers_and_keeps_them(tmp_path: Path) -> None:
    moments = iter([NOW, NOW + 5])
    log = UsageLog(tmp_path / "state" / "usage.json", clock=lambda: next(moments))
    log.answered(result(Status.PULLED, "sha256:x"), from_memory=False)
    log.answered(result(Status.FAILED, None), from_memory=False)
    log.answered(result(Status.PRESENT, "sha256:x"), from_memory=True)
    assert log.last_used("sha256:x") == NOW + 5
    log.flush()
    again = UsageLog(tmp_path / "state" / "usage.json")
    assert again.last_used("sha256:x") == NOW + 5 and again.first_seen("sha256:x") == NOW
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["usage.json"]


def test_a_corrupt_usage_log_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    for content in ("{not json", '{"images": []}', '{"images": {"x": {"seen": "soon"}}}'):
        path.write_text(content)
        log = UsageLog(path)
        assert log.first_seen("x") is None
        log.saw(["x"], NOW)
        log.flush()
        assert UsageLog(path).first_seen("x") == NOW


def test_saw_keeps_the_first_sighting_and_drops_images_gone(usage: UsageLog) -> None:
    usage.saw(["a", "b"], NOW - 10)
    usage.saw(["a", "c"], NOW)
    assert usage.first_seen("a") == NOW - 10
    assert usage.first_seen("b") is None
    assert usage.first_seen("c") == NOW


def test_a_moment_with_the_clock_a_year_ahead_does_not_keep_an_image_for_a_year(
    tmp_path: Path,
) -> None:
    clock = [NOW + 365 * DAY]  # a bad NTP step, soon corrected
    log = UsageLog(tmp_path / "usage.json", clock=lambda: clock[0])
    store = MemoryStore([image("a:1", tagged=NOW + 365 * DAY)])  # tagged in that moment too
    log.saw(["sha256:a:1"], NOW - 90 * DAY)
    log.answered(result(Status.PRESENT, "sha256:a:1"), from_memory=True)
    clock[0] = NOW
    assert prune(store, PruneRule(unused_for=30 * DAY), log, NOW).removed == ()  # used "now"
    log.flush()
    later = UsageLog(tmp_path / "usage.json")  # what a restarted worker reads
    assert later.last_used("sha256:a:1") == NOW
    outcome = prune(store, PruneRule(unused_for=30 * DAY), later, NOW + 31 * DAY)
    assert [r.image_id for r in outcome.removed] == ["sha256:a:1"]


def test_a_tag_time_from_the_future_is_left_out_and_a_use_from_the_future_is_now(
    usage: UsageLog,
) -> None:
    usage.saw(["sha256:a:1"], NOW - 10 * DAY)
    tagged_ahead = image("a:1", tagged=NOW + 365 * DAY)
    assert last_used(tagged_ahead, usage, NOW) == NOW - 10 * DAY
    usage.record("sha256:a:1", NOW + 365 * DAY)
    assert last_used(tagged_ahead, usage, NOW) == NOW


def test_infinity_and_nan_in_the_usage_log_are_ignored_and_the_rest_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "usage.json"
    path.write_text(
        '{"version": 1, "images": {'
        '"good": {"seen": 1000, "used": 2000},'
        '"used-forever": {"seen": 1000, "used": Infinity},'
        '"seen-nan": {"seen": NaN, "used": 2000},'
        '"huge": {"seen": 1e999, "used": null}}}'
    )
    log = UsageLog(path)
    assert (log.first_seen("good"), log.last_used("good")) == (1000, 2000)
    assert (log.first_seen("used-forever"), log.last_used("used-forever")) == (1000, None)
    assert log.first_seen("seen-nan") is None and log.last_used("seen-nan") is None
    assert log.first_seen("huge") is None
    assert "not finite numbers" in capsys.readouterr().out
    log.saw(["good", "used-forever", "seen-nan", "huge"], NOW)
    log.flush()
    written = path.read_text()
    assert "Infinity" not in written and "NaN" not in written
    assert json.loads(written)["images"]["huge"]["seen"] == NOW


# -- the high-water mode ------------------------------------------------------------------------


@dataclass
class FakeDisk:
    """A 1000-byte disk whose use is a base plus the store's images."""

    store: MemoryStore
    base: int = 0
    readable: bool = True
    reads: int = 0

    def __call__(self) -> DiskUsage:
        self.reads += 1
        if not self.readable:
            raise DiskUnreadable("cannot read the disk of /x: No such file or directory")
        used = self.base + sum(i.size_bytes for i in self.store.stored)
        return DiskUsage("/x", 1000, used, 1000 - used)


def test_over_the_high_mark_it_prunes_oldest_first_until_under_the_low_mark(
    usage: UsageLog, tmp_path: Path
) -> None:
    store = store_with_ages(usage, {"a:1": 1, "b:1": 2, "c:1": 3, "d:1": 4, "e:1": 5})
    store.in_use = {"sha256:e:1"}
    keep = tmp_path / "keep"
    keep.write_text("d:1\n")
    disk = FakeDisk(store, base=400)  # 900 of 1000 used: 90 %
    outcomes: list[PruneOutcome] = []
    pruner = Pruner(store, usage, clock=lambda: NOW, on_outcome=outcomes.append)
    watch = DiskWatch(pruner, disk, high_water=85, low_water=75, keep_file=keep, min_idle=0)
    outcome = watch.check()
    assert outcome is not None and outcomes == [outcome]
    assert store.removed == ["sha256:c:1", "sha256:b:1"]  # 900 -> 700: under 75 %
    assert (outcome.kept_in_use, outcome.kept_listed) == (1, 1)
    assert watch.check() is None and len(outcomes) == 1  # under the mark: nothing to do


def test_the_high_water_mode_spares_recently_used_images(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 0, "b:1": 2})
    usage.record("sha256:a:1", NOW - 60)
    disk = FakeDisk(store, base=900)
    watch = DiskWatch(Pruner(store, usage, clock=lambda: NOW), disk, high_water=50)
    assert watch.low_water == 40
    outcome = watch.check()
    assert outcome is not None and store.removed == ["sha256:b:1"]


def test_the_high_water_mode_does_nothing_it_cannot_see(usage: UsageLog, tmp_path: Path) -> None:
    store = store_with_ages(usage, {"a:1": 9})
    disk = FakeDisk(store, base=900, readable=False)
    bad_keep = tmp_path / "keep"
    bad_keep.write_text("Bad Line\n")
    pruner = Pruner(store, usage, clock=lambda: NOW)
    assert DiskWatch(pruner, disk, high_water=50).check() is None
    disk.readable = True
    assert DiskWatch(pruner, disk, high_water=50, keep_file=bad_keep).check() is None
    assert store.removed == []


def test_the_engines_data_root_must_be_visible(tmp_path: Path) -> None:
    with pytest.raises(DiskUnreadable, match="set PULLER_DOCKER_DATA_ROOT"):
        engine_disk(MemoryStore(), None)
    assert engine_disk(MemoryStore(), tmp_path).total > 0
    with pytest.raises(DiskUnreadable, match="PULLER_DOCKER_DATA_ROOT: "):
        engine_disk(MemoryStore(), tmp_path / "missing")


def test_housekeeping_notes_images_checks_the_disk_and_stops(usage: UsageLog) -> None:
    store = store_with_ages(usage, {"a:1": 9})
    store.stored.append(image("new:1"))
    disk = FakeDisk(store, base=0)
    pruner = Pruner(store, usage, clock=lambda: NOW)
    keeper = Housekeeping(usage, pruner, DiskWatch(pruner, disk, high_water=90), interval=0.05)
    keeper.start()
    try:
        deadline = time.monotonic() + 5
        while disk.reads < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        keeper.stop()
    assert disk.reads >= 2
    assert usage.first_seen("sha256:new:1") == NOW
    assert json.loads(usage.path.read_text())["images"]["sha256:new:1"]["seen"] == NOW


# -- settings -----------------------------------------------------------------------------------


def test_the_disk_marks_are_checked_at_start(tmp_path: Path) -> None:
    settings = WorkerSettings.from_env(
        {"PULLER_DISK_HIGH_WATER": "85", "PULLER_DISK_CHECK_INTERVAL": "30"}
    )
    assert settings.disk_high_water == 85 and settings.disk_low_water is None
    assert settings.disk_check_interval == 30 and settings.prune_min_idle == 3600
    for env, message in (
        ({"PULLER_DISK_HIGH_WATER": "100"}, "at most 99"),
        ({"PULLER_DISK_LOW_WATER": "50"}, "needs PULLER_DISK_HIGH_WATER"),
        ({"PULLER_DISK_HIGH_WATER": "80", "PULLER_DISK_LOW_WATER": "80"}, "must be under"),
        ({"PULLER_PRUNE_KEEP_FILE": str(tmp_path / "none")}, "cannot be read"),
    ):
        with pytest.raises(InvalidSetting, match=message):
            WorkerSettings.from_env(env)
