"""State files are replaced whole: the old content or the new, never a part, and nothing
left behind by a failed write."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from worker.catch_up.ledger import OffsetStore
from worker.state_files import NotFinite, is_finite_number, parse_state, write_whole


def test_the_content_is_replaced_and_only_the_owner_may_read_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deferred-pulls.json"  # the directory is made

    write_whole(path, "first")
    write_whole(path, "second, longer")

    assert path.read_text() == "second, longer"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["deferred-pulls.json"]


def test_a_write_that_fails_leaves_the_old_content_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "offset.json"
    write_whole(path, "old")

    real_fsync, this_thread = os.fsync, threading.get_ident()

    def disk_full(handle: int) -> None:
        if threading.get_ident() != this_thread:  # another test's leftover thread
            real_fsync(handle)
            return
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_whole(path, "new")

    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["offset.json"]


def test_the_directory_is_flushed_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[str] = []
    real_fsync = os.fsync
    this_thread = threading.get_ident()

    def fsync(handle: int) -> None:
        if threading.get_ident() == this_thread:  # not another test's leftover thread
            flushed.append(os.readlink(f"/proc/self/fd/{handle}"))
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", fsync)
    write_whole(tmp_path / "usage.json", "{}")

    assert flushed[-1] == str(tmp_path)  # after the file's own flush
    assert flushed[0].startswith(str(tmp_path / ".usage.json."))


def test_a_planted_symlink_is_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    path = tmp_path / "state.json"
    # Whatever name a writer might use for its new file, none is followed.
    for name in (f".{path.name}.new", f".{path.name}.{os.getpid()}.new", "state.tmp"):
        (tmp_path / name).symlink_to(target)

    write_whole(path, "content")

    assert target.read_text() == "untouched"
    assert path.read_text() == "content"
    assert not path.is_symlink()


def test_non_finite_numbers_are_read_as_such_and_the_rest_as_json() -> None:
    state = parse_state('{"a": Infinity, "b": -Infinity, "c": NaN, "d": 1e999, "e": 1.5, "f": 2}')
    assert [repr(state[key]) for key in "abcd"] == ["Infinity", "-Infinity", "NaN", "1e999"]
    assert all(isinstance(state[key], NotFinite) for key in "abcd")
    assert (state["e"], state["f"]) == (1.5, 2)
    assert [is_finite_number(state[key]) for key in "abcdef"] == [False] * 4 + [True] * 2
    assert not is_finite_number(True)


def test_an_offset_that_is_infinity_is_refused(tmp_path: Path) -> None:
    store = OffsetStore(tmp_path)
    for offset in ("Infinity", "NaN", "1e999"):
        store.path.write_text(f'{{"offset": {offset}, "identity": "x"}}')
        assert store.load() is None
    store.path.write_text('{"offset": 7, "identity": "x"}')
    assert store.load() is not None
