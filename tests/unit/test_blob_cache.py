"""The blob cache's parts that need no network: the request-target grammar, the command
line's sizes and addresses, the memory of recent authorisations, and the store's room,
pins and eviction (on a real directory)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from blob_cache.main import byte_size, listen_address
from blob_cache.metrics import CacheMetrics, Outcome
from blob_cache.routes import Alive, Blob, Manifest, Metrics, Ping, Refused, parse_target
from blob_cache.store import NoRoom, Store
from blob_cache.upstream import AuthMemory, Upstream, upstream_base

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/v2/", Ping()),
        ("/alive", Alive()),
        ("/metrics", Metrics()),
        (f"/v2/library/busybox/blobs/{DIGEST}", Blob("library/busybox", DIGEST)),
        (f"/v2/a/b-c/d__e/f.g/blobs/{DIGEST}", Blob("a/b-c/d__e/f.g", DIGEST)),
        ("/v2/cyber-dojo/python/manifests/3.12_a", Manifest("cyber-dojo/python", "3.12_a")),
        (f"/v2/x/manifests/{DIGEST}", Manifest("x", DIGEST)),
        (f"/v2/x/manifests/{DIGEST}?ns=docker.io", Manifest("x", DIGEST)),
        # A name may hold "blobs" or "manifests" as components: the last two decide.
        (f"/v2/blobs/manifests/blobs/{DIGEST}", Blob("blobs/manifests", DIGEST)),
    ],
)
def test_registry_read_paths_are_routed_by_their_parts(target: str, route: object) -> None:
    assert parse_target(target) == route


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("@127.0.0.1:5000/anything", 400),
        ("http://127.0.0.1:5000/v2/", 400),
        ("*", 400),
        ("", 400),
        (f"/v2/x/blobs/{DIGEST}#/blobs/{DIGEST}", 400),
        (f"/v2/x%2Fy/blobs/{DIGEST}", 400),
        (f"/v2/x/blobs/{DIGEST}@evil", 400),
        (f"/v2/x;y/blobs/{DIGEST}", 400),
        (f"/v2/x\\y/blobs/{DIGEST}", 400),
        (f"/v2/x y/blobs/{DIGEST}", 400),
        (f"/v2/x/../y/blobs/{DIGEST}", 400),
        (f"/v2//x/blobs/{DIGEST}", 400),
        (f"/v2/X/blobs/{DIGEST}", 400),
        ("/v2/x/blobs/sha256:abc", 400),
        ("/v2/x/blobs/md5:" + "a" * 32, 400),
        ("/v2/x/blobs/SHA256:" + "a" * 64, 400),
        ("/v2/x/manifests/-tag", 400),
        (f"/v2/x/blobs/{DIGEST}?a=b?c", 400),
        (f"/v2/x/blobs/{DIGEST}?a=%41", 400),
        ("/v2", 404),
        ("/v2/_catalog", 404),
        ("/v2/x/tags/list", 404),
        ("/v2/x/blobs/uploads/", 404),
        ("/", 404),
        ("/metrics/x", 404),
        ("/v2/" + "a/" * 130 + f"blobs/{DIGEST}", 400),  # a name over 255 characters
    ],
)
def test_anything_else_is_refused(target: str, status: int) -> None:
    refused = parse_target(target)
    assert isinstance(refused, Refused), refused
    assert refused.status == status


def test_upstream_urls_are_built_from_the_parsed_parts_only() -> None:
    upstream = Upstream("http://registry.example:5000/")
    assert upstream.url(Ping()) == "http://registry.example:5000/v2/"
    assert (
        upstream.url(Blob("a/b", DIGEST)) == f"http://registry.example:5000/v2/a/b/blobs/{DIGEST}"
    )
    assert upstream.url(Manifest("a", "1")) == "http://registry.example:5000/v2/a/manifests/1"


@pytest.mark.parametrize(
    "url",
    [
        "registry:5000",
        "ftp://registry",
        "http://",
        "http://user:pass@registry",
        "http://registry/v2",
        "http://registry?x=1",
        "http://registry#x",
        "http://registry:port",
    ],
)
def test_an_upstream_that_is_not_scheme_host_port_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"expected|no user|no path|port"):
        upstream_base(url)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000000", 1_000_000),
        ("10G", 10 * 10**9),
        ("10GB", 10 * 10**9),
        ("512Mi", 512 * 2**20),
        ("1ti", 2**40),
        ("15m", 15 * 10**6),
    ],
)
def test_sizes_take_decimal_and_binary_suffixes(text: str, size: int) -> None:
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "10X", "-1", "1.5G"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        byte_size(text)


def test_listen_addresses() -> None:
    assert listen_address("0.0.0.0:5001") == ("0.0.0.0", 5001)
    assert listen_address("[::]:5001") == ("::", 5001)
    for bad in ("5001", ":5001", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            listen_address(bad)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_authorisation_is_recalled_for_the_same_credential_name_and_digest_for_a_while() -> None:
    clock = _Clock()
    memory = AuthMemory(seconds=60, entries=2, clock=clock)
    memory.remember("Bearer a", "repo", DIGEST)
    assert memory.recalls("Bearer a", "repo", DIGEST)
    assert not memory.recalls("Bearer b", "repo", DIGEST)
    assert not memory.recalls(None, "repo", DIGEST)
    assert not memory.recalls("Bearer a", "other", DIGEST)
    clock.now += 61
    assert not memory.recalls("Bearer a", "repo", DIGEST)
    # Bounded: the oldest entry goes first; a refusal forgets at once.
    for name in ("one", "two", "three"):
        memory.remember(None, name, DIGEST)
    assert [memory.recalls(None, n, DIGEST) for n in ("one", "two", "three")] == [0, 1, 1]
    memory.forget(None, "two", DIGEST)
    assert not memory.recalls(None, "two", DIGEST)


def _keep(store: Store, name: str, size: int) -> str:
    digest = "sha256:" + name * 64
    partial = store.new_partial()
    with partial.open("xb") as file:
        token = store.reserve(size, file)
        file.write(b"x" * size)
    store.keep(token, partial, digest, size)
    return digest


def test_the_store_evicts_the_least_recently_used_blob_not_in_use(tmp_path: Path) -> None:
    metrics = CacheMetrics()
    store = Store(tmp_path, max_bytes=3000, metrics=metrics)
    a, b = _keep(store, "a", 1000), _keep(store, "b", 1000)
    ended: list[Outcome] = []
    served = store.open_kept(a, lambda _n: None)  # a is being served (and now the newest)
    assert served is not None
    served.on_end = ended.append
    assert store.could_fit(2000)
    assert not store.could_fit(2001)  # only b can go
    c = _keep(store, "c", 2000)  # b goes
    assert store.kept(b) is None
    assert {store.kept(a), store.kept(c)} == {1000, 2000}
    with pytest.raises(NoRoom, match="in use"):
        store.reserve(2001, io.BytesIO())  # c could go, a may not: not enough
    assert store.kept(c) == 2000  # so nothing went
    assert served.read() == b"x" * 1000
    served.close()
    assert ended == [Outcome.KEPT]
    _keep(store, "d", 1000)  # now a goes, the least recently used
    assert store.kept(a) is None
    assert not store.path(a).exists()
    assert metrics.registry.get_sample_value("puller_blob_cache_evictions_total") == 2
    with pytest.raises(NoRoom, match="larger than --max-bytes"):
        store.reserve(3001, io.BytesIO())


def test_the_store_finds_what_it_kept_after_a_restart_oldest_use_first(tmp_path: Path) -> None:
    store = Store(tmp_path, max_bytes=3000, metrics=CacheMetrics())
    a, b = _keep(store, "a", 1000), _keep(store, "b", 1000)
    os.utime(store.path(a), (1000, 1000))  # a was used long ago, b less long ago
    os.utime(store.path(b), (2000, 2000))
    leftover = store.new_partial()
    leftover.write_bytes(b"half a blob")
    kept = store.open_kept(a, lambda _n: None)  # a is the newest now
    assert kept is not None
    kept.close()
    (tmp_path / "blobs" / "stray").write_bytes(b"?")
    again = Store(tmp_path, max_bytes=1500, metrics=CacheMetrics())
    assert again.kept(b) is None  # over the new limit: the older one went
    assert again.kept(a) == 1000
    assert not leftover.exists()
    assert (tmp_path / "blobs" / "stray").exists()
