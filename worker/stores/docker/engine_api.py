"""The Docker Engine's HTTP API, spoken over its socket with the standard library.

Why not the docker SDK: it has no public way to give one pull its own ``X-Registry-Auth``,
to read a pull's stream with a stall timeout, or to cut a pull by closing its connection
(closing the connection of a ``POST /images/create`` makes the engine cancel that pull). The
store's other calls are a few GETs and a DELETE, so they are made here too: one client.

``DOCKER_HOST`` is read as the docker SDK reads it: ``unix://PATH`` (unset or empty: the
local socket), ``tcp://HOST:PORT`` or ``http://HOST:PORT`` (plain HTTP), ``https://HOST:PORT``
(TLS, checked against the system's certificate authorities). Paths name no API version: the
engine answers in its own newest one.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_SOCKET = "/var/run/docker.sock"


class EngineError(Exception):
    """The engine answered with an error status; ``message`` is its own words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class EngineUnreachable(Exception):
    """No connection to the engine, or the request could not be sent to it."""


class EngineLost(Exception):
    """The request was sent, then the connection failed or went quiet before the answer
    ended; ``silent``: a read waited longer than its timeout."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.silent = isinstance(cause, TimeoutError)


@dataclass(frozen=True)
class Address:
    """Where the engine listens: a unix socket path, or a host and port (``tls``: HTTPS)."""

    path: str | None = None
    host: str = ""
    port: int = 0
    tls: bool = False


def parse_host(docker_host: str | None) -> Address:
    """``DOCKER_HOST`` as an address; raises :class:`EngineUnreachable` saying what is wrong."""
    value = (docker_host or "").strip()
    if not value or value == "unix://":
        return Address(path=DEFAULT_SOCKET)
    scheme, _, rest = value.partition("://")
    if scheme in ("unix", "http+unix"):
        return Address(path="/" + rest.lstrip("/"))
    if scheme in ("tcp", "http", "https") and rest:
        parts = urlsplit(f"//{rest}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.hostname and port and parts.path in ("", "/") and not parts.query:
            return Address(host=parts.hostname, port=port, tls=scheme == "https")
    raise EngineUnreachable(
        f"DOCKER_HOST={value!r} is not unix://PATH, tcp://HOST:PORT, http://HOST:PORT or "
        "https://HOST:PORT"
    )


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: ``connect`` is the one step that differs."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Stream:
    """One answer of the engine read as it comes: a pull's progress, the event feed.

    :meth:`cut`, from any thread, shuts its connection down: the thread reading it wakes at
    once, and the engine, seeing its client go, cancels a pull."""

    def __init__(self, connection: http.client.HTTPConnection) -> None:
        self.connection = connection
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._cut = False
        self.response: http.client.HTTPResponse | None = None

    def connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            cut = self._cut
        if cut:
            self.cut()

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    @property
    def was_cut(self) -> bool:
        with self._lock:
            return self._cut

    def messages(self) -> Iterator[dict[str, object]]:
        """Each JSON object of the answer (the engine writes one a line), until it ends or
        is cut; raises :class:`EngineLost` if the connection fails or stays quiet past the
        read timeout."""
        if self.response is None:
            return
        try:
            for line in self.response:
                text = line.strip()
                if not text:
                    continue
                try:
                    message = json.loads(text)
                except ValueError:
                    continue  # not a message of the engine's: nothing to act on
                if isinstance(message, dict):
                    yield message
        except (OSError, http.client.HTTPException) as error:
            if self.was_cut:
                return
            raise EngineLost(error) from None

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
        self.connection.close()


class EngineApi:
    """The engine at ``docker_host``; each call opens its own connection (any thread).

    ``timeout``: seconds to connect, and to wait for each read of a non-streaming answer."""

    def __init__(self, docker_host: str | None, timeout: float) -> None:
        self._docker_host = docker_host
        self._timeout = timeout

    def get(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> object:
        """The JSON answer of ``GET path``; raises :class:`EngineError` for an error status."""
        return self._call("GET", path, params, headers)

    def delete(self, path: str, params: Mapping[str, str] | None = None) -> object:
        return self._call("DELETE", path, params, None)

    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None,
        opened: Stream | None = None,
    ) -> Stream:
        """Sends the request and returns once the answer's headers came (``read_timeout``:
        the longest wait for them and for each later read; ``None``: no limit). ``opened``:
        a :class:`Stream` made by :meth:`new_stream`, which another thread may cut while this
        waits. Raises :class:`EngineError` for an error status (the stream closed)."""
        stream = opened or self.new_stream()
        try:
            connection = stream.connection
            self._send(connection, method, path, params, headers)
            if connection.sock is not None:
                stream.connected(connection.sock)
                connection.sock.settimeout(read_timeout)
            try:
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                raise EngineLost(error) from None
            stream.response = response
            if response.status >= 400:
                raise _error(response)
        except BaseException:
            stream.close()
            raise
        return stream

    def new_stream(self) -> Stream:
        """A stream not yet sent (see :meth:`stream`)."""
        return Stream(self._connection(self._timeout))

    @staticmethod
    def path(template: str, *names: str) -> str:
        """``template`` with each ``{}`` an image name, escaped as the engine's router reads
        it (``/``, ``:`` kept)."""
        return template.format(*(quote(name, safe="/:") for name in names))

    def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> object:
        connection = self._connection(self._timeout)
        response: http.client.HTTPResponse | None = None
        try:
            self._send(connection, method, path, params, headers)
            try:
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as error:
                raise EngineLost(error) from None
            if response.status >= 400:
                raise _error(response, body)
            if not body:
                return None
            try:
                return json.loads(body)
            except ValueError:
                raise EngineLost(ValueError("the engine's answer is not JSON")) from None
        finally:
            if response is not None:
                response.close()
            connection.close()

    def _send(
        self,
        connection: http.client.HTTPConnection,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        target = f"{path}?{urlencode(params)}" if params else path
        try:
            connection.request(method, target, headers=dict(headers or {}))
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise EngineUnreachable(f"{type(error).__name__}: {error}") from None

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        address = parse_host(self._docker_host)
        if address.path is not None:
            return _UnixConnection(address.path, timeout)
        if address.tls:
            context = ssl.create_default_context()
            return http.client.HTTPSConnection(
                address.host, address.port, timeout=timeout, context=context
            )
        return http.client.HTTPConnection(address.host, address.port, timeout=timeout)


def _error(response: http.client.HTTPResponse, body: bytes | None = None) -> EngineError:
    """The engine's error: its JSON ``message``, else the answer's text."""
    if body is None:
        try:
            body = response.read()
        except (OSError, http.client.HTTPException):
            body = b""
    text = body.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message = parsed.get("message") if isinstance(parsed, dict) else None
    return EngineError(response.status, str(message or text or response.reason))
