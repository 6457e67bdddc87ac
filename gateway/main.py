"""``puller-http``: the HTTP gateway. Settings come from the environment only."""

from __future__ import annotations

import sys

import structlog

from gateway.api import Gateway
from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings, InvalidSetting, environment_help
from publisher import Publisher
from serving.http import HttpServer
from serving.logs import configure_logging
from serving.program import parse_arguments, raise_open_file_limit, stop_on_signals
from serving.settings import broker_tls, image_policy

log = structlog.get_logger("gateway")

SPARE_THREADS = 16
"""Threads for every other call while ``PULLER_HTTP_MAX_WAITING`` callers wait in
``POST /pulls``, each holding one."""
UNFINISHED_BYTES = 32 * 2**20
"""Bytes of requests read and not yet handled, over all connections (their first 4 KB
each aside): what slow senders of big bodies can hold."""


def main(argv: list[str] | None = None) -> int:
    description = "puller over HTTP and JSON: a drop-in for cyber-dojo's puller service."
    if parse_arguments("puller-http", description, environment_help(), argv):
        return 0
    try:
        settings = GatewaySettings.from_env()
    except InvalidSetting as error:
        print(f"puller-http: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    raise_open_file_limit()
    stopping = stop_on_signals()
    with Publisher(
        settings.amqp_url,
        connect_timeout=settings.connect_timeout,
        tls=broker_tls(settings),
        policy=image_policy(settings),
        answer_memory=settings.answer_memory_mb * 2**20,
    ) as publisher:
        gateway = Gateway(publisher, settings, GatewayMetrics())
        try:
            server = HttpServer(
                settings.http_port,
                gateway.handle,
                name="gateway",
                threads=settings.max_waiting + SPARE_THREADS,
                max_connections=settings.max_connections,
                max_held_bytes=UNFINISHED_BYTES,
            )
        except OSError as error:
            print(f"puller-http: cannot listen on PULLER_HTTP_PORT: {error}", file=sys.stderr)
            return 2
        server.start()
        log.info("listening", port=server.port, broker=settings.amqp_url.rpartition("@")[2])
        if not publisher.connect(settings.connect_timeout):
            log.warning(
                "RabbitMQ is not reachable yet; /ready answers 503 until it is",
                error=publisher.connection_problem,
            )
        stopping.wait()
        log.info("stopping")
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
