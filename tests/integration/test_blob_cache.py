"""puller's pull-through blob cache (``puller-blob-cache``) on real parts: the cache's own
process, a real ``docker-registry`` upstream, raw sockets for the attacks, a TCP proxy that
corrupts or records what crosses it, a small tmpfs for a full disk. No Docker Engine: the
pulls through the cache by real engines are in test_pull_through_cache.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from localcluster.processes import wait_until
from localcluster.registry import Registry
from localcluster.uplink import BlobCacheProcess
from serving.program import raise_open_file_limit
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

MakeCache = Callable[..., BlobCacheProcess]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    upstream = Registry(tmp_path_factory.mktemp("upstream"))
    upstream.start()
    yield upstream
    upstream.remove()


@pytest.fixture
def make_cache(tmp_path: Path) -> Iterator[MakeCache]:
    """Starts caches (``upstream`` URL, more flags); stops them after the test."""
    started: list[BlobCacheProcess] = []

    def make(upstream: str, *flags: str, data_dir: Path | None = None) -> BlobCacheProcess:
        cache = BlobCacheProcess(
            tmp_path / f"cache-{len(started)}", upstream, extra_args=flags, data_dir=data_dir
        )
        started.append(cache)
        cache.start()
        return cache

    yield make
    for cache in started:
        cache.remove()


def _gets(url: str, clients: int) -> list[bytes | None]:
    """What each of ``clients`` GETs of ``url`` at once got (see :func:`_whole`)."""
    bodies: list[bytes | None] = []
    threads = [threading.Thread(target=lambda: bodies.append(_whole(url))) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return bodies


def _blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Sends ``request`` as is and reads the answer to its end (the cache closes it, or the
    answer is complete per its Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                return answer
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        while length is None or len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        return head + b"\r\n\r\n" + body


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _metric(cache: BlobCacheProcess, name: str, **labels: str) -> float:
    text = requests.get(f"{cache.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no {name}{labels} in /metrics")


def _whole(url: str, headers: dict[str, str] | None = None) -> bytes | None:
    """The body of a GET that completed (200, every byte its length announced); ``None`` if
    the answer was an error or the connection was cut before its end."""
    try:
        response = requests.get(url, headers=headers, timeout=30)
    except requests.RequestException:
        return None
    return response.content if response.status_code == 200 else None


class _OtherService(http.server.ThreadingHTTPServer):
    """A service beside the cache that no client of the cache may reach through it."""

    daemon_threads = True

    def __init__(self) -> None:
        self.hits = 0
        super().__init__(("127.0.0.1", 0), _OtherHandler)


class _OtherHandler(http.server.BaseHTTPRequestHandler):
    server: _OtherService

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits += 1
        body = b"the other service's secret"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_target_that_is_not_a_registry_path_reaches_no_other_host(
    registry: Registry, make_cache: MakeCache
) -> None:
    other = _OtherService()
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    cache = make_cache(registry.url)
    digest = "sha256:" + "a" * 64
    try:
        for target in (
            f"@127.0.0.1:{port}/anything",
            f"http://127.0.0.1:{port}/v2/",
            f"//127.0.0.1:{port}/v2/",
            f"/v2/@127.0.0.1:{port}/x/blobs/{digest}",
            f"/v2/x/blobs/{digest}#@127.0.0.1:{port}/",
            f"/v2/x%2F..%2F..%2F@127.0.0.1:{port}/blobs/{digest}",
            f"/v2/x/../../@127.0.0.1:{port}/blobs/{digest}",
            "/v2/_catalog",
        ):
            answer = _raw(cache.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert _status(answer) in (400, 404), (target, answer[:200])
            assert b"secret" not in answer, target
        assert other.hits == 0
        # What is served still is: the registry API's version check, through to the upstream.
        assert requests.get(f"{cache.url}/v2/", timeout=10).status_code == 200
    finally:
        other.shutdown()
        other.server_close()


def test_a_client_trying_https_first_is_turned_away_at_once(
    registry: Registry, make_cache: MakeCache
) -> None:
    # A Docker Engine tries HTTPS before plain HTTP, and gives the handshake 10 s.
    cache = make_cache(registry.url)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", cache.port), timeout=5) as sock,
        pytest.raises((ssl.SSLError, ConnectionError)),  # not a TimeoutError
    ):
        context.wrap_socket(sock).close()


SMUGGLED = b"GET /v2/smuggled/x/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n"
"""A second request behind a malformed one: served, it would be a request a proxy in front
never saw (request smuggling)."""

MALFORMED = {
    "Content-Length with chunked": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding in HTTP/1.0": b"GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "obs-fold hiding Transfer-Encoding": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n"
    b" Transfer-Encoding: chunked\r\n\r\n",
    "Content_Length": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent_Length: %d\r\n\r\n" % len(SMUGGLED),
    "bare LF line ends": b"GET /v2/ HTTP/1.1\nHost: x\n\n",
}


@pytest.fixture(scope="module")
def strict_cache(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BlobCacheProcess]:
    """One cache for the tests of what a malformed or slow request gets (a head must arrive
    within 1 s)."""
    cache = BlobCacheProcess(
        tmp_path_factory.mktemp("strict-cache"), registry.url, extra_args=("--request-timeout", "1")
    )
    cache.start()
    yield cache
    cache.remove()


def _until_closed(port: int, request: bytes) -> tuple[bytes, bool]:
    """What the cache answers ``request`` with, and whether it then closed the connection
    (``False``: it kept it open for 5 s more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except TimeoutError:
            return received, False
        return received, True


def _answers(raw: bytes) -> list[tuple[int, bytes, bytes]]:
    """The HTTP answers in ``raw`` in order (each with a Content-Length): status, head,
    body."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lengths = [
            line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ]
        length = int(lengths[0].split(b":", 1)[1]) if lengths else len(rest)
        found.append((_status(head), head, rest[:length]))
        raw = rest[length:]
    return found


@pytest.mark.parametrize("name", MALFORMED)
def test_a_request_framed_two_ways_gets_one_400_and_nothing_behind_it_is_served(
    strict_cache: BlobCacheProcess, name: str
) -> None:
    received, closed = _until_closed(strict_cache.port, MALFORMED[name] + SMUGGLED)
    [(status, head, body)] = _answers(received)
    assert status == 400, received[:300]
    assert closed, "the connection was kept open for more requests"
    assert b"\r\nConnection: close" in head
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_a_client_that_trickles_its_request_gets_408_at_the_deadline(
    strict_cache: BlobCacheProcess,
) -> None:
    """A header line every 0.1 s is never silent for the idle timeout (30 s); the deadline
    from the request's first byte (1 s here) ends it."""
    with socket.create_connection(("127.0.0.1", strict_cache.port), timeout=10) as slow:
        slow.sendall(b"GET /v2/ HTTP/1.1\r\n")
        started = time.monotonic()
        slow.settimeout(0.1)  # the pace: a line, then 0.1 s listening for the answer
        received = b""
        while not received and time.monotonic() - started < 10:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except OSError:  # closed after its answer, which is left to read
                break
            with contextlib.suppress(TimeoutError):
                received = slow.recv(65536)
        slow.settimeout(10)
        with contextlib.suppress(ConnectionResetError):  # closed with a line of ours unread
            while data := slow.recv(65536):
                received += data
    [(status, head, body)] = _answers(received)
    assert status == 408, received[:300]
    assert b"\r\nConnection: close" in head
    assert "within 1 s" in json.loads(body)["errors"][0]["message"]


def test_a_fragment_cannot_swap_the_blob_the_upstream_allowed_for_another(
    registry: Registry, make_cache: MakeCache
) -> None:
    public, public_digest = _blob(50_000)
    private, private_digest = _blob(60_000)
    registry.push_blob("public/x", public)
    registry.push_blob("private/y", private)
    cache = make_cache(registry.url)
    # A node allowed to see the private blob pulls it: now it is kept.
    assert _whole(f"{cache.url}/v2/private/y/blobs/{private_digest}") == private
    # The public repository does not hold it: the upstream says so, and so does the cache.
    assert (
        requests.get(f"{cache.url}/v2/public/x/blobs/{private_digest}", timeout=10).status_code
        == 404
    )
    answer = _raw(
        cache.port,
        f"GET /v2/public/x/blobs/{public_digest}#/blobs/{private_digest} HTTP/1.1\r\n"
        "Host: x\r\n\r\n".encode(),
    )
    assert _status(answer) == 400, answer[:200]
    assert private not in answer


def test_a_blob_that_fails_its_digest_never_reaches_a_client_whole(
    registry: Registry, make_cache: MakeCache
) -> None:
    blob, digest = _blob(2_000_000)
    registry.push_blob("corrupt/x", blob)
    proxy = TcpProxy(("127.0.0.1", registry.port))
    proxy.corrupt_at(1_500_000)  # deep in a blob's body; HEAD answers are far shorter
    cache = make_cache(f"http://{proxy.address}")
    url = f"{cache.url}/v2/corrupt/x/blobs/{digest}"
    try:
        for _ in range(8):  # each round a new fetch: a failed blob is not kept
            assert _gets(url, 3) == [None] * 3
        assert _metric(cache, "puller_blob_cache_digest_mismatches_total") >= 8
        assert not list((cache.root / "data" / "blobs").iterdir())
        # Once the upstream sends it right, it is served (and kept).
        proxy.corrupt_at(None)
        assert _whole(url) == blob
    finally:
        proxy.close()


def test_a_head_answers_from_the_upstreams_head_and_fetches_nothing(
    registry: Registry, make_cache: MakeCache
) -> None:
    blob, digest = _blob(1_000_000)
    registry.push_blob("head/x", blob)
    proxy = TcpProxy(("127.0.0.1", registry.port))
    cache = make_cache(f"http://{proxy.address}")
    try:
        answer = requests.head(f"{cache.url}/v2/head/x/blobs/{digest}", timeout=10)
        assert answer.status_code == 200
        assert answer.headers["Content-Length"] == str(len(blob))
        assert answer.headers["Docker-Content-Digest"] == digest
        assert b"HEAD /v2/head/x/blobs/" in proxy.upstream_data
        assert b"GET /v2/head/x/blobs/" not in proxy.upstream_data
    finally:
        proxy.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a disk that fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_blob_the_disk_cannot_hold_is_passed_through_whole_not_cut(
    registry: Registry, make_cache: MakeCache, small_disk: Path
) -> None:
    big, big_digest = _blob(5_000_000)
    small, small_digest = _blob(500_000)
    registry.push_blob("disk/x", big)
    registry.push_blob("disk/x", small)
    cache = make_cache(registry.url, data_dir=small_disk / "cache")
    assert _gets(f"{cache.url}/v2/disk/x/blobs/{big_digest}", 3) == [big] * 3
    assert _metric(cache, "puller_blob_cache_requests_total", outcome="passed_through") == 3
    assert not list((small_disk / "cache" / "partial").iterdir())
    # One that fits is kept as usual.
    assert _whole(f"{cache.url}/v2/disk/x/blobs/{small_digest}") == small
    assert _metric(cache, "puller_blob_cache_kept_bytes") == len(small)
    # Another program fills the disk: a blob that fitted before is passed through now.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 1_900_000)
    medium, medium_digest = _blob(1_000_000)
    registry.push_blob("disk/x", medium)
    assert _whole(f"{cache.url}/v2/disk/x/blobs/{medium_digest}") == medium
    assert _metric(cache, "puller_blob_cache_requests_total", outcome="passed_through") == 4


class _NoLengthUpstream(http.server.ThreadingHTTPServer):
    """A registry-like upstream that answers blobs without ``Content-Length`` (the body ends
    when it closes the connection); ``wrong`` serves other bytes under a blob's digest."""

    daemon_threads = True

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        super().__init__(("127.0.0.1", 0), _NoLengthHandler)


class _NoLengthHandler(http.server.BaseHTTPRequestHandler):
    server: _NoLengthUpstream
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        blob = self.server.blobs.get(self.path.rsplit("/", 1)[-1])
        self.send_response(200 if blob is not None else 404)
        self.end_headers()
        if blob is not None and not head:
            self.wfile.write(blob)


def test_an_upstream_that_sends_no_length_is_streamed_and_checked(make_cache: MakeCache) -> None:
    blob, digest = _blob(1_000_000)
    bad_digest = _blob(10)[1]
    upstream = _NoLengthUpstream({digest: blob, bad_digest: blob})
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        cache = make_cache(f"http://127.0.0.1:{upstream.server_address[1]}")
        assert _whole(f"{cache.url}/v2/nolength/x/blobs/{digest}") == blob
        assert _whole(f"{cache.url}/v2/nolength/x/blobs/{digest}") == blob  # kept now
        # Chunked to the client, without its last chunk when the digest does not match.
        assert _whole(f"{cache.url}/v2/nolength/x/blobs/{bad_digest}") is None
    finally:
        upstream.shutdown()
        upstream.server_close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Reads what is left; true at the end of the stream (a timeout raises)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_idle_and_half_sent_connections_are_closed_after_the_idle_timeout(
    registry: Registry, make_cache: MakeCache
) -> None:
    """Whether served and left open, or never finished, a connection that does nothing is
    closed after ``--idle-timeout``. (Which one is closed first at the limit of connections:
    the next test; it cannot be asserted here, where the idle timeout may strike first on a
    busy machine.)"""
    cache = make_cache(registry.url, "--idle-timeout", "3", "--max-connections", "4")
    started = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", cache.port), timeout=20) for _ in range(4)]
    try:
        for sock in idle[:3]:  # three served, then left open
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        idle[3].sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # half a request, never finished
        for sock in idle:
            assert _closed_by_peer(sock)  # each within the socket's 20 s, not never
        assert time.monotonic() - started < 20
        with socket.create_connection(("127.0.0.1", cache.port), timeout=20) as fifth:
            fifth.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert fifth.recv(65536).startswith(b"HTTP/1.1 200")  # and the cache still serves
    finally:
        for sock in idle:
            sock.close()


def test_at_its_limit_the_cache_closes_the_oldest_idle_connection_for_a_new_one(
    registry: Registry, make_cache: MakeCache
) -> None:
    """A new client (the kubelet's probe, a node's engine) is not left waiting behind
    connections that do nothing, however long the idle timeout."""
    cache = make_cache(registry.url, "--max-connections", "3")
    kept = [http.client.HTTPConnection("127.0.0.1", cache.port, timeout=10) for _ in range(3)]
    try:
        for connection in kept:  # each served, then left open: oldest first
            connection.request("GET", "/alive")
            assert connection.getresponse().read()
        answer = _raw(cache.port, b"GET /alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(answer) == 200
        oldest = kept[0].sock
        assert oldest is not None
        assert oldest.recv(1024) == b"", "the oldest connection was not closed"
        for connection in kept[1:]:  # still open: another request on each
            connection.request("GET", "/alive")
            assert connection.getresponse().status == 200
    finally:
        for connection in kept:
            connection.close()


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_past_1024_open_files_the_cache_still_serves(
    registry: Registry, make_cache: MakeCache
) -> None:
    """Each client reading a kept blob holds a socket and the blob's file: 600 clients that
    stop reading hold over 1,024 descriptors, where ``select()`` stops."""
    limit = raise_open_file_limit()
    assert limit > 1400, f"this process may open {limit} files only"
    blob, digest = _blob(16_000_000)
    registry.push_blob("many/x", blob)
    cache = make_cache(registry.url, "--max-connections", "700")
    assert cache.process is not None
    assert _whole(f"{cache.url}/v2/many/x/blobs/{digest}") == blob  # kept now
    readers: list[socket.socket] = []
    try:
        for _ in range(600):
            reader = socket.socket()
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.connect(("127.0.0.1", cache.port))
            reader.sendall(f"GET /v2/many/x/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            readers.append(reader)
        pid = cache.process.pid
        wait_until(lambda: _open_files(pid) > 1200, "the cache to hold over 1,200 files", 30)
        assert requests.get(f"{cache.url}/alive", timeout=10).status_code == 200
        assert _whole(f"{cache.url}/v2/many/x/blobs/{digest}") == blob
    finally:
        for reader in readers:
            reader.close()


_ESTABLISHED = "01"


def _tcp_state(local_port: int, remote_port: int) -> str | None:
    """The kernel's state of the loopback TCP socket ``local_port`` -> ``remote_port``
    (``/proc/net/tcp``: ``01`` established, ``04`` FIN-WAIT-1...), ``None`` once it is gone
    (a connection the kernel gave up on for ``TCP_USER_TIMEOUT`` is dropped at once)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, state = line.split()[:4]
        if (
            int(local.split(":")[1], 16) == local_port
            and int(remote.split(":")[1], 16) == remote_port
        ):
            return state
    return None


def _reads_nothing(port: int, digest: str) -> socket.socket:
    """A client that asks for a blob and never reads the answer."""
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", port))
    reader.sendall(f"GET /v2/slow/x/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return reader


def _await_dropped(cache_port: int, reader: socket.socket) -> None:
    client_port = reader.getsockname()[1]
    wait_until(
        lambda: _tcp_state(cache_port, client_port) != _ESTABLISHED,
        "the cache to drop the connection of a client that reads nothing",
        30,
    )


def test_a_client_that_stops_reading_a_blob_is_cut(
    registry: Registry, make_cache: MakeCache
) -> None:
    kept, kept_digest = _blob(16_000_000)
    fetched, fetched_digest = _blob(16_000_000)
    registry.push_blob("slow/x", kept)
    registry.push_blob("slow/x", fetched)
    proxy = TcpProxy(("127.0.0.1", registry.port))
    cache = make_cache(f"http://{proxy.address}", "--idle-timeout", "2")
    assert _whole(f"{cache.url}/v2/slow/x/blobs/{kept_digest}") == kept
    proxy.throttle(2_000_000)  # the other blob is still being fetched while it is not read
    readers = [_reads_nothing(cache.port, kept_digest), _reads_nothing(cache.port, fetched_digest)]
    try:
        for reader in readers:
            _await_dropped(cache.port, reader)
        wait_until(
            lambda: _metric(cache, "puller_blob_cache_requests_total", outcome="cut") == 2,
            "both streams counted as cut",
            10,
        )
        # The cache serves on meanwhile.
        assert _whole(f"{cache.url}/v2/slow/x/blobs/{kept_digest}") == kept
    finally:
        for reader in readers:
            reader.close()
        proxy.close()


def test_kept_blobs_are_served_while_the_upstream_is_down_to_clients_it_allowed_lately(
    tmp_path: Path, make_cache: MakeCache
) -> None:
    upstream = Registry(tmp_path / "upstream")
    upstream.start()
    try:
        blob, digest = _blob(300_000)
        upstream.push_blob("down/x", blob)
        cache = make_cache(upstream.url)
        url = f"{cache.url}/v2/down/x/blobs/{digest}"
        node = {"Authorization": "Basic bm9kZTpwYXNzd29yZA=="}
        assert _whole(url, node) == blob
    finally:
        upstream.stop()
    assert _whole(url, node) == blob
    for stranger in ({}, {"Authorization": "Basic c3RyYW5nZXI6cGFzc3dvcmQ="}):
        answer = requests.get(url, headers=stranger, timeout=10)
        assert answer.status_code == 502, stranger
        assert blob not in answer.content
    # Not a blob it never fetched, nor another repository's name for it.
    assert (
        requests.get(url.replace("down/x", "down/y"), headers=node, timeout=10).status_code == 502
    )


def test_blobs_are_evicted_least_recently_used_first_but_never_while_served(
    registry: Registry, make_cache: MakeCache
) -> None:
    blobs = {name: _blob(6_000_000) for name in "abcd"}
    for data, _ in blobs.values():
        registry.push_blob("evict/x", data)
    cache = make_cache(registry.url, "--max-bytes", "15M")

    def url(name: str) -> str:
        return f"{cache.url}/v2/evict/x/blobs/{blobs[name][1]}"

    def kept() -> set[str]:
        names = {path.name for path in (cache.root / "data" / "blobs").iterdir()}
        return {n for n, (_, digest) in blobs.items() if digest.replace(":", "-") in names}

    assert _whole(url("a")) == blobs["a"][0]
    assert _whole(url("b")) == blobs["b"][0]
    # A slow client starts reading a, and b is used again: a is the least recently used.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(30)
    slow.connect(("127.0.0.1", cache.port))
    request = f"GET /v2/evict/x/blobs/{blobs['a'][1]} HTTP/1.1\r\nHost: x\r\n"
    slow.sendall(f"{request}Connection: close\r\n\r\n".encode())
    received = slow.recv(4096)
    assert received.startswith(b"HTTP/1.1 200"), received
    assert _whole(url("b")) == blobs["b"][0]
    # c needs room: a is being served, so b goes.
    assert _whole(url("c")) == blobs["c"][0]
    assert kept() == {"a", "c"}
    while data := slow.recv(1 << 20):
        received += data
    slow.close()
    assert received.partition(b"\r\n\r\n")[2] == blobs["a"][0]
    # a is no longer served: now it goes first.
    assert _whole(url("d")) == blobs["d"][0]
    assert kept() == {"c", "d"}
    assert _metric(cache, "puller_blob_cache_evictions_total") == 2
    assert _metric(cache, "puller_blob_cache_kept_bytes") == 12_000_000


def test_alive_and_metrics_answer_on_the_same_port(
    registry: Registry, make_cache: MakeCache
) -> None:
    blob, digest = _blob(100_000)
    registry.push_blob("metrics/x", blob)
    cache = make_cache(registry.url)
    alive = requests.get(f"{cache.url}/alive", timeout=10)
    assert alive.status_code == 200
    assert alive.json()["status"] == "serving"
    assert _whole(f"{cache.url}/v2/metrics/x/blobs/{digest}") == blob
    assert _whole(f"{cache.url}/v2/metrics/x/blobs/{digest}") == blob
    assert _metric(cache, "puller_blob_cache_requests_total", outcome="fetched") == 1
    assert _metric(cache, "puller_blob_cache_requests_total", outcome="kept") == 1
    assert _metric(cache, "puller_blob_cache_served_bytes_total") == 2 * len(blob)
    assert _metric(cache, "puller_blob_cache_upstream_fetches_total", result="kept") == 1
    assert _metric(cache, "puller_blob_cache_upstream_bytes_total") == len(blob)
    assert _metric(cache, "puller_blob_cache_kept_bytes") == len(blob)
    assert _metric(cache, "puller_blob_cache_evictions_total") == 0
    assert json.loads(alive.content)["kept_bytes"] == 0
