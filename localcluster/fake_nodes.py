"""Many nodes answering every request at once, as the wire contract says, from one queue and
one pika connection: the reply path's load without a worker per node (benches and tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pika

from contract import CONTENT_TYPE, ErrorKind, NodeError, NodeResult, Status, decode_request
from contract import topology as topo
from contract.connection import declare

IMAGE_ID = "sha256:" + "a" * 64


@dataclass(frozen=True)
class Answered:
    request_id: str
    answers: int
    bytes: int
    seconds: float
    """Publishing every answer (the broker's flow control included)."""


class FakeNodes:
    """``count`` nodes named ``{prefix}-00000``...: each request taken from their one queue is
    answered by every one of them (a result per node; every ``fail_every``-th fails)."""

    def __init__(self, amqp_url: str, count: int, prefix: str = "fake-node") -> None:
        self.count = count
        self.names = [f"{prefix}-{n:05d}" for n in range(count)]
        self._connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self._channel = self._connection.channel()
        queue, binding = topo.node_queue(prefix)
        for item in (topo.PULLS, topo.REPLIES, queue, binding):
            declare(self._channel, item)
        self._queue = queue.name

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def __enter__(self) -> FakeNodes:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def answer_next(
        self, timeout: float = 30.0, fail_every: int = 0, nodes: int | None = None
    ) -> Answered:
        """Waits for the next request and answers it from every node (the first ``nodes``)."""
        deadline = time.monotonic() + timeout
        while True:
            method, properties, body = self._channel.basic_get(self._queue, auto_ack=True)
            if method is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no request reached {self._queue} in {timeout:g} s")
            self._connection.process_data_events(time_limit=0.01)
        request = decode_request(body)
        image = str(getattr(request, "image", ""))
        reply = pika.BasicProperties(
            content_type=CONTENT_TYPE, correlation_id=properties.correlation_id
        )
        bodies = [
            self._answer(
                request.request_id, node, image, bool(fail_every) and number % fail_every == 0
            )
            for number, node in enumerate(self.names[:nodes], start=1)
        ]
        started = time.monotonic()
        for body in bodies:  # encoded first: what is timed is the publishing
            self._channel.basic_publish(topo.REPLIES.name, properties.reply_to, body, reply)
        self._connection.process_data_events(time_limit=0)
        sent = sum(map(len, bodies))
        return Answered(
            request.request_id, len(self.names[:nodes]), sent, time.monotonic() - started
        )

    @staticmethod
    def _answer(request_id: str, node: str, image: str, failed: bool) -> bytes:
        if failed:
            error = NodeError(ErrorKind.NOT_FOUND, f"manifest for {image} not found")
            answer = NodeResult(request_id, node, image, Status.FAILED, 0.2, error=error)
        else:
            digest = f"{image.partition(':')[0]}@sha256:{'b' * 64}"
            answer = NodeResult(request_id, node, image, Status.PRESENT, 0.01, IMAGE_ID, digest)
        return answer.encode()
