"""A TCP proxy on 127.0.0.1 for fault tests: it can go silent mid-transfer, throttle, or
corrupt a byte; it keeps what clients sent upstream."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 64 * 1024


class TcpProxy:
    """Forwards connections on ``127.0.0.1:port`` to ``target``.

    ``go_silent_after(n)``: once ``n`` more bytes went downstream (over all connections),
    nothing more is forwarded downstream until ``resume()``; connections stay open, as a
    registry that hangs mid-layer would leave them. ``throttle(rate)``: at most ``rate``
    bytes a second downstream per connection. ``corrupt_at(n)``: the ``n``-th byte each
    connection sends downstream (counting from 0, headers included) is changed.
    ``upstream_data``: every byte clients sent upstream, all connections together.
    ``cut()``: every connection is dropped, and new ones are closed at once until ``mend()``.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._budget: int | None = None
        self._rate: float | None = None
        self._corrupt_at: int | None = None
        self.upstream_data = bytearray()
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        self._cut = threading.Event()
        self.downstream_bytes = 0
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def go_silent_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def resume(self) -> None:
        with self._lock:
            self._budget = None
        self._forwarding.set()

    def corrupt_at(self, offset: int | None) -> None:
        self._corrupt_at = offset

    def throttle(self, bytes_per_second: float | None) -> None:
        self._rate = bytes_per_second

    @property
    def silent(self) -> bool:
        return not self._forwarding.is_set()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps, which close them
            self._sockets = []

    def mend(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self._forwarding.set()
        with contextlib.suppress(OSError):
            # Closing alone does not stop a listener that the accept thread is blocked on:
            # the kernel keeps it listening, and the next client is accepted and dropped (a
            # Go client then says "server closed idle connection", not "connection refused").
            # Shutting it down wakes the accept and refuses every connection from here on.
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps, which close them
        deadline = time.monotonic() + 5
        while any(s.fileno() != -1 for s in self._sockets) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        seen = 0
        try:
            while not self._closed.is_set():
                data = source.recv(CHUNK)
                if not data:
                    break
                at = self._corrupt_at
                if downstream and at is not None and seen <= at < seen + len(data):
                    data = (
                        data[: at - seen] + bytes([data[at - seen] ^ 0xFF]) + data[at - seen + 1 :]
                    )
                seen += len(data)
                if not downstream:
                    with self._lock:
                        self.upstream_data += data
                allowed = self._allow(data, sink) if downstream else data
                if allowed is None:
                    break
                sink.sendall(allowed)
        except OSError:
            pass
        finally:
            # Each pump closes the socket it reads; the other pump closes the other one.
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            source.close()

    def _allow(self, data: bytes, sink: socket.socket) -> bytes | None:
        """Spends the silence budget and the rate; holds the data while silent."""
        with self._lock:
            if self._budget is not None:
                allowed = max(0, min(len(data), self._budget))
                self._budget -= allowed
                if self._budget <= 0:
                    self._forwarding.clear()
                if allowed < len(data):
                    sink.sendall(data[:allowed])
                    data = data[allowed:]
                    self.downstream_bytes += allowed
                else:
                    self.downstream_bytes += len(data)
                    return data
            else:
                self.downstream_bytes += len(data)
        while not self._forwarding.wait(0.2):
            if self._closed.is_set():
                return None
        if self._rate:
            time.sleep(len(data) / self._rate)
        return data
