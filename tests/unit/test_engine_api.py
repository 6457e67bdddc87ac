"""The Engine API client (worker/stores/docker/engine_api.py) against a stand-in engine over
HTTP, HTTPS and a unix socket: where DOCKER_HOST points, the engine's errors, a stream cut
from another thread. The real engine: tests/integration/test_store_conformance.py."""

from __future__ import annotations

import http.server
import json
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from localcluster.tls import make_certificates
from worker.stores.docker.engine_api import (
    DEFAULT_SOCKET,
    Address,
    EngineApi,
    EngineError,
    EngineLost,
    EngineUnreachable,
    parse_host,
)


@pytest.mark.parametrize(
    ("docker_host", "address"),
    [
        (None, Address(path=DEFAULT_SOCKET)),
        ("", Address(path=DEFAULT_SOCKET)),
        ("unix://", Address(path=DEFAULT_SOCKET)),
        ("unix:///run/user/1000/docker.sock", Address(path="/run/user/1000/docker.sock")),
        ("unix://var/run/docker.sock", Address(path="/var/run/docker.sock")),
        ("http+unix:///x/docker.sock", Address(path="/x/docker.sock")),
        ("tcp://10.0.0.5:2375", Address(host="10.0.0.5", port=2375)),
        ("http://engine.local:2375", Address(host="engine.local", port=2375)),
        ("https://engine.local:2376", Address(host="engine.local", port=2376, tls=True)),
        ("tcp://[::1]:2375", Address(host="::1", port=2375)),
    ],
)
def test_docker_host_is_read_as_the_docker_sdk_reads_it(
    docker_host: str | None, address: Address
) -> None:
    assert parse_host(docker_host) == address


@pytest.mark.parametrize(
    "docker_host",
    ["tcp://engine.local", "ssh://me@engine.local", "npipe:////./pipe/docker", "tcp://:x", "x"],
)
def test_a_docker_host_it_cannot_use_says_which_forms_it_takes(docker_host: str) -> None:
    with pytest.raises(EngineUnreachable, match=r"unix://PATH, tcp://HOST:PORT"):
        parse_host(docker_host)


class _Engine(http.server.BaseHTTPRequestHandler):
    """``/version`` answers; ``/images/missing/json`` is a 404 in the engine's words;
    ``/slow`` streams one message, then nothing until the connection goes."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/version":
            self._json(200, {"Version": "20.10.24"})
        elif self.path.startswith("/images/missing"):
            self._json(404, {"message": "No such image: missing:1"})
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            line = b'{"status":"Downloading"}\r\n'
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            self.rfile.read(1)  # until the client goes
        else:
            self._json(500, {"message": "what?"})

    def _json(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TcpEngine(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def unix_engine(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "docker.sock"
    with serving(_UnixEngine(str(path), _Engine)):
        yield f"unix://{path}"


@pytest.fixture
def tcp_engine() -> Iterator[str]:
    server = _TcpEngine(("127.0.0.1", 0), _Engine)
    with serving(server):
        yield f"tcp://127.0.0.1:{server.server_address[1]}"


def test_it_asks_the_engine_on_its_unix_socket_and_over_tcp(
    unix_engine: str, tcp_engine: str
) -> None:
    for docker_host in (unix_engine, tcp_engine):
        assert EngineApi(docker_host, 5).get("/version") == {"Version": "20.10.24"}


def test_over_https_it_checks_the_engine_s_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certificates = make_certificates(tmp_path / "certs")
    server = _TcpEngine(("127.0.0.1", 0), _Engine)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    docker_host = f"https://127.0.0.1:{server.server_address[1]}"
    with serving(server):
        with pytest.raises(EngineUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
            EngineApi(docker_host, 5).get("/version")  # a CA this machine does not trust
        monkeypatch.setenv("SSL_CERT_FILE", str(certificates.ca_file))
        assert EngineApi(docker_host, 5).get("/version") == {"Version": "20.10.24"}


def test_the_engine_s_error_is_raised_in_its_own_words(unix_engine: str) -> None:
    with pytest.raises(EngineError) as refused:
        EngineApi(unix_engine, 5).get(EngineApi.path("/images/{}/json", "missing:1"))
    assert (refused.value.status, refused.value.message) == (404, "No such image: missing:1")


def test_an_engine_that_is_not_there_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(EngineUnreachable, match="FileNotFoundError"):
        EngineApi(f"unix://{tmp_path}/none.sock", 5).get("/version")


def test_a_stream_cut_from_another_thread_ends_at_once(unix_engine: str) -> None:
    api = EngineApi(unix_engine, 5)
    stream = api.stream("GET", "/slow", read_timeout=30)
    messages = stream.messages()
    assert next(messages) == {"status": "Downloading"}
    started = time.monotonic()
    threading.Timer(0.2, stream.cut).start()
    assert list(messages) == []  # ended by the cut, not by the read timeout
    assert time.monotonic() - started < 5
    assert stream.was_cut
    stream.close()


def test_a_stream_silent_past_its_read_timeout_is_lost(unix_engine: str) -> None:
    stream = EngineApi(unix_engine, 5).stream("GET", "/slow", read_timeout=0.3)
    messages = stream.messages()
    assert next(messages) == {"status": "Downloading"}
    with pytest.raises(EngineLost) as lost:
        next(messages)
    assert lost.value.silent
    stream.close()
