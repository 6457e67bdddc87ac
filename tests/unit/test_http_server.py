"""The shared HTTP server, on a real socket: what a careless or hostile client costs it."""

from __future__ import annotations

import http.client
import socket
import time

from serving.http import HttpServer, Request, Response, json_response


def echo(request: Request) -> Response:
    return json_response(200, {"method": request.method, "path": request.path})


def test_a_client_that_stops_mid_request_is_dropped_and_costs_no_thread_for_ever() -> None:
    server = HttpServer(0, echo, host="127.0.0.1", idle_timeout=0.5)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # and no more
            slow.settimeout(5)
            started = time.monotonic()
            assert slow.recv(1024) == b"", "the server kept the half-sent request open"
            assert time.monotonic() - started < 4
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", "/still")
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        server.stop()


def test_any_method_reaches_the_handler_and_head_gets_no_body() -> None:
    server = HttpServer(0, echo, host="127.0.0.1")
    server.start()
    try:
        for method in ("GET", "POST", "TRACE", "BREW"):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            connection.request(method, "/m")
            response = connection.getresponse()
            assert (response.status, response.read()) == (
                200,
                b'{"method": "%s", "path": "/m"}' % method.encode(),
            )
            connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("HEAD", "/m")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b""
        connection.close()
    finally:
        server.stop()
