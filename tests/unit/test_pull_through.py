"""The pull-through cache setting, the worker's view of a cache's health, the blob cache's
single fetch, and the shared-rate uplink: no Docker Engine needed."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from localcluster.uplink import BlobCacheProcess, TokenBucket, Uplink
from worker.settings import InvalidSetting, WorkerSettings
from worker.stores.pull_through import CacheOutcome, CacheUnusable, PullThrough, cache_routes


def test_routes_parse_pairs_and_spell_docker_hub_as_image_names_do() -> None:
    routes = cache_routes(
        " registry-1.example:5000=cache.local:5001 , registry-1.docker.io=cache.local:5002,"
    )
    assert routes == (
        ("registry-1.example:5000", "cache.local:5001"),
        ("docker.io", "cache.local:5002"),
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cache.local:5001", "is not UPSTREAM=CACHE"),
        ("a.example=", "is not UPSTREAM=CACHE"),
        ("http://a.example=cache:5000", "no scheme"),
        ("a.example=cache:5000/path", "no path"),
        ("a.example=c1:5000,a.example=c2:5000", "more than one cache"),
        ("docker.io=index.docker.io", "its own cache"),
        (" , ", "expected UPSTREAM=CACHE"),
    ],
)
def test_bad_routes_are_refused_at_start_naming_the_variable(text: str, says: str) -> None:
    with pytest.raises(InvalidSetting, match="PULLER_PULL_THROUGH_CACHES") as raised:
        WorkerSettings.from_env({"PULLER_PULL_THROUGH_CACHES": text})
    assert says in str(raised.value)


def test_the_setting_reaches_the_worker_settings() -> None:
    settings = WorkerSettings.from_env({"PULLER_PULL_THROUGH_CACHES": "a.example=b.local:1"})
    assert settings.pull_through_caches == (("a.example", "b.local:1"),)
    assert WorkerSettings.from_env({}).pull_through_caches == ()


def test_a_cache_that_does_not_answer_is_skipped_for_a_while() -> None:
    outcomes: list[str] = []
    # Nothing listens on port 9 of loopback here: refused at once.
    pull_through = PullThrough((("up.example", "127.0.0.1:9"),), outcomes.append, down_for=60)
    assert pull_through.cache_for("up.example") == "127.0.0.1:9"
    assert pull_through.cache_for("other.example") is None
    with pytest.raises(CacheUnusable, match="does not answer"):
        pull_through.check("127.0.0.1:9")
    with pytest.raises(CacheUnusable, match="a moment ago"):
        pull_through.check("127.0.0.1:9")
    pull_through.outcome(CacheOutcome.FALLBACK)
    assert outcomes == ["fallback"]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Answers(http.server.ThreadingHTTPServer):
    """A cache's ``/v2/`` that answers (whatever the pulls through it then do)."""

    daemon_threads = True

    def __init__(self, status: int = 200) -> None:
        self.status = status
        super().__init__(("127.0.0.1", 0), _AnswersHandler)


class _AnswersHandler(http.server.BaseHTTPRequestHandler):
    server: _Answers

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _skip(pull_through: PullThrough, cache: str) -> str:
    """How long ``cache`` is skipped for, as the check says."""
    with pytest.raises(CacheUnusable, match="a moment ago") as raised:
        pull_through.check(cache)
    return str(raised.value).rsplit("for ", 1)[1].rstrip(")")


def test_each_failure_in_a_row_doubles_the_skip_until_a_pull_through_the_cache_succeeds() -> None:
    answers = _Answers()
    threading.Thread(target=answers.serve_forever, daemon=True).start()
    cache = f"127.0.0.1:{answers.server_address[1]}"
    clock = _Clock()
    pull_through = PullThrough((("up.example", cache),), down_for=30, max_down_for=100, clock=clock)
    try:
        skips = []
        for stalled in (False, True, False, False):
            pull_through.check(cache)  # it answers its /v2/...
            if stalled:
                pull_through.mark_down(cache)  # ...the engine saw the pull through it stall
            pull_through.outcome(CacheOutcome.FALLBACK)  # ...and the pull went direct
            skips.append(_skip(pull_through, cache))
            clock.now += 101
        assert skips == ["30s", "60s", "100s", "100s"]  # a stall is one failure, not two
        pull_through.check(cache)
        pull_through.outcome(CacheOutcome.CACHE)  # a pull through it worked: start again
        pull_through.check(cache)
        pull_through.outcome(CacheOutcome.FALLBACK)
        assert _skip(pull_through, cache) == "30s"
    finally:
        answers.shutdown()
        answers.server_close()


def test_a_cache_whose_v2_answers_a_server_error_is_skipped() -> None:
    answers = _Answers(status=500)
    threading.Thread(target=answers.serve_forever, daemon=True).start()
    cache = f"127.0.0.1:{answers.server_address[1]}"
    pull_through = PullThrough((("up.example", cache),))
    try:
        with pytest.raises(CacheUnusable, match="answered its /v2/ with 500"):
            pull_through.check(cache)
        assert _skip(pull_through, cache) == "30s"
    finally:
        answers.shutdown()
        answers.server_close()


class _Upstream(http.server.ThreadingHTTPServer):
    """A registry stand-in holding one blob; counts the blob GETs and answers them slowly,
    so that several clients overlap."""

    daemon_threads = True

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.gets = 0
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)


class _UpstreamHandler(http.server.BaseHTTPRequestHandler):
    server: _Upstream

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        if self.path != f"/v2/repo/blobs/{self.server.digest}":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.blob)))
        self.end_headers()
        if head:
            return
        self.server.gets += 1
        for start in range(0, len(self.server.blob), 100_000):
            self.wfile.write(self.server.blob[start : start + 100_000])
            time.sleep(0.02)


@pytest.fixture
def upstream() -> Iterator[_Upstream]:
    server = _Upstream(bytes(range(256)) * 4000)  # about 1 MB, sent in 0.2 s
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_blob_cache_fetches_a_blob_once_for_clients_asking_at_once(
    upstream: _Upstream, tmp_path: Path
) -> None:
    cache = BlobCacheProcess(tmp_path, f"http://127.0.0.1:{upstream.server_address[1]}")
    cache.start()
    url = f"{cache.url}/v2/repo/blobs/{upstream.digest}"
    bodies: list[bytes] = []

    def get() -> None:
        bodies.append(requests.get(url, timeout=30).content)

    try:
        clients = [threading.Thread(target=get) for _ in range(4)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        get()  # once kept: from the cache's directory
        missing = requests.get(url.replace(upstream.digest, "sha256:" + "0" * 64), timeout=30)
    finally:
        cache.remove()
    assert bodies == [upstream.blob] * 5
    assert upstream.gets == 1
    assert missing.status_code == 404


def test_the_uplink_shares_one_rate_between_connections_and_counts_both_ways(
    upstream: _Upstream,
) -> None:
    size = len(upstream.blob)
    with Uplink(("127.0.0.1", upstream.server_address[1]), rate=4 * size) as link:
        url = f"{link.url}/v2/repo/blobs/{upstream.digest}"
        started = time.monotonic()
        clients = [
            threading.Thread(target=requests.get, args=(url,), kwargs={"timeout": 30})
            for _ in range(4)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        seconds = time.monotonic() - started
        assert link.bytes_down >= 4 * size
        assert link.bytes_up > 0
        assert link.bytes_total == link.bytes_down + link.bytes_up
    # Four blobs at four blobs a second, all together: about a second, not a quarter.
    assert seconds > 0.7


def test_a_token_bucket_never_goes_faster_than_its_rate() -> None:
    bucket = TokenBucket(rate=1_000_000, burst=10_000)
    started = time.monotonic()
    for _ in range(50):
        bucket.take(10_000)
    assert time.monotonic() - started >= 0.45
