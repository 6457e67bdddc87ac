"""The fault tests' TCP proxy itself: once closed, its port refuses connections, as a
registry that went away would (not accept and drop them, which clients word differently)."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.integration.tcp_proxy import TcpProxy


def test_a_closed_proxy_refuses_connections_even_while_its_accept_was_waiting() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        connection, _ = upstream.accept()
        connection.close()

    served = threading.Thread(target=serve_one, daemon=True)
    served.start()
    proxy = TcpProxy(upstream.getsockname())
    try:
        # A first connection, forwarded and answered, shows the accept thread waiting again.
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            assert client.recv(1) == b""
        served.join(5)
        proxy.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    finally:
        proxy.close()
        upstream.close()
