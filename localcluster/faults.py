"""Faults for tests and benchmarks, made of real sockets and processes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import threading

PRESENCE_FLOOD = textwrap.dedent(
    """
    import sys, time, pika
    url, seconds = sys.argv[1], float(sys.argv[2])
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    body = b"not a presence announcement " * 8
    sent, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        for _ in range(200):
            channel.basic_publish("puller.presence", "", body)
        sent += 200
        connection.process_data_events(0)
        print(sent, flush=True)
    connection.close()
    """
)


def flood_presence(amqp_url: str, seconds: float) -> subprocess.Popen[str]:
    """Another process publishing junk to ``puller.presence`` as fast as one pika connection
    can, for ``seconds``; it prints how many it has sent after every 200 (its ``stdout``)."""
    return subprocess.Popen(
        [sys.executable, "-c", PRESENCE_FLOOD, amqp_url, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )


class BlackHole:
    """A registry that accepts connections and never answers: every connection is held
    open, nothing is read or written, until :meth:`close`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="black-hole", daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._held:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._held.append(client)
