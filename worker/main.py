"""``puller-worker``: the node daemon. Settings come from the environment only."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from types import FrameType

import structlog

from contract import BrokerUnavailable, NodeState, history_stream_arguments
from worker.broker import Delivery, NodeNameInUse, WorkerBroker
from worker.catch_up import CannotKeepState, CatchUp, Ledger, OffsetStore
from worker.engine import DockerEngine
from worker.health import HealthServer, Liveness
from worker.logs import configure_logging
from worker.presence import PresenceAnnouncer
from worker.service import PullService, RetryPolicy
from worker.settings import InvalidSetting, WorkerSettings

log = structlog.get_logger("worker")

EVENT_LOOP_SLICE = 0.5
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
CANCEL_GRACE = 5.0
"""Seconds, after cancelling, to send the ``cancelled`` replies."""

ENVIRONMENT_HELP = """\
environment:
  PULLER_AMQP_URL              RabbitMQ URL (amqp://guest:guest@localhost:5672/%2F)
  PULLER_NODE_NAME             this node's name in replies (the host name)
  DOCKER_HOST                  the node's Docker Engine (the local socket)
  PULLER_MAX_CONCURRENT_PULLS  pulls at once on this node (2)
  PULLER_PULL_TIMEOUT          seconds one pull may take at most (1800)
  PULLER_STALL_TIMEOUT         seconds of no pull progress before giving up (120)
  PULLER_PULL_RETRIES          retries after a transient pull failure (3)
  PULLER_RETRY_DELAY           seconds before the first retry, doubling (1)
  PULLER_HEARTBEAT             AMQP heartbeat seconds (30)
  PULLER_PRESENCE_INTERVAL     seconds between presence announcements (5)
  PULLER_SHUTDOWN_GRACE        seconds to finish pulls after SIGTERM (30)
  PULLER_HISTORY_MAX_AGE       seconds a request stays replayable (604800: a week)
  PULLER_HISTORY_MAX_BYTES     size bound of the history stream (100000000)
  PULLER_STATE_DIR             where catch-up progress is kept (/var/lib/puller)
  PULLER_HEALTH_PORT           HTTP port of /alive and /ready; 0: off (8080)
  PULLER_LOG_FORMAT            auto | json | console (auto: console on a terminal)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="puller-worker",
        description="Pull images onto this node when puller publishes a request.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        settings = WorkerSettings.from_env()
    except InvalidSetting as error:
        print(f"puller-worker: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    structlog.contextvars.bind_contextvars(node=settings.node_name)
    try:
        offsets = OffsetStore(settings.state_dir)
    except CannotKeepState as error:
        print(f"puller-worker: {error}", file=sys.stderr)
        return 2
    stopping = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        run(settings, stopping, offsets)
    except OSError as error:  # the health port is taken
        print(f"puller-worker: {error}", file=sys.stderr)
        return 2
    return 0


def run(settings: WorkerSettings, stopping: threading.Event, offsets: OffsetStore) -> None:
    """Connects, serves and reconnects until ``stopping`` is set; then drains and closes."""
    engine = DockerEngine(
        settings.docker_host,
        stall_timeout=settings.stall_timeout,
        pull_timeout=settings.pull_timeout,
    )
    engine.watch_images()
    service = PullService(
        settings.node_name,
        engine,
        settings.max_concurrent_pulls,
        RetryPolicy(attempts=1 + settings.pull_retries, first_delay=settings.retry_delay),
    )
    broker = _broker(settings)
    catch_up = CatchUp(
        settings.node_name, Ledger(offsets), service, broker, settings.history_max_age
    )
    liveness = Liveness()
    health = (
        HealthServer(settings.health_port, liveness, catch_up.status)
        if settings.health_port
        else None
    )
    if health is not None:
        health.start()
    presence = PresenceAnnouncer(
        settings.node_name, engine, settings.presence_interval, catch_up.status
    )
    presence.start()
    _log_start(engine, presence)

    def on_live(delivery: Delivery) -> None:
        catch_up.note_live(service.on_delivery(delivery, broker))

    delay = RECONNECT_FIRST_DELAY
    attempt = 0
    while not stopping.is_set():
        attempt += 1
        try:
            broker.connect(on_live, catch_up.on_connect())
        except (BrokerUnavailable, NodeNameInUse) as error:
            catch_up.on_disconnect()
            log.warning(
                "cannot serve yet", error=str(error), attempt=attempt, retry_in=round(delay, 1)
            )
            stopping.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
            continue
        log.info("serving", queue=broker.queue, broker=broker.where)
        delay, attempt = RECONNECT_FIRST_DELAY, 0
        try:
            while not stopping.is_set():
                liveness.tick()
                if presence.due():
                    broker.announce(presence.message())
                broker.process_events(EVENT_LOOP_SLICE)
                catch_up.checkpoint_if_due(service.unfinished)
        except BrokerUnavailable as error:
            log.warning("connection lost; reconnecting", error=str(error))
            catch_up.on_disconnect()
            broker.close()
    presence.stop()
    catch_up.on_disconnect()  # not ready while draining
    _drain(settings, broker, service, presence)
    engine.close()
    if health is not None:
        health.stop()
    log.info("stopped")


def _log_start(engine: DockerEngine, presence: PresenceAnnouncer) -> None:
    if presence.engine_version is None:
        log.warning(
            "the Docker Engine is not reachable yet; requests will fail until it is",
            engine=engine.describe(),
        )
    else:
        log.info("starting", engine=engine.describe(), engine_version=presence.engine_version)


def _broker(settings: WorkerSettings) -> WorkerBroker:
    return WorkerBroker(
        settings.amqp_url,
        settings.node_name,
        prefetch=max(8, 2 * settings.max_concurrent_pulls),
        heartbeat=settings.heartbeat,
        history_arguments=history_stream_arguments(
            settings.history_max_age, settings.history_max_bytes
        ),
        # A replay leaves a pull slot free for live requests (unless there is only one).
        replay_prefetch=max(1, settings.max_concurrent_pulls - 1),
    )


def _drain(
    settings: WorkerSettings,
    broker: WorkerBroker,
    service: PullService,
    presence: PresenceAnnouncer,
) -> None:
    """Says it is leaving, stops taking requests, and answers those in flight for up to the
    grace period."""
    # Not connected? Then the roster drops this node when its announcements stop.
    with contextlib.suppress(BrokerUnavailable):
        broker.announce(presence.message(NodeState.LEAVING))
    broker.stop_consuming()
    _serve_while_unfinished(broker, service, settings.shutdown_grace)
    if service.unfinished:
        log.warning("grace period over; cancelling", unanswered=service.unfinished)
        service.cancel()
        _serve_while_unfinished(broker, service, CANCEL_GRACE)
    if service.unfinished:
        log.warning("stopping with requests unanswered", unanswered=service.unfinished)
    service.shutdown(wait=False)
    broker.close()


def _serve_while_unfinished(broker: WorkerBroker, service: PullService, seconds: float) -> None:
    """Keeps the connection's thread serving (replies, acks) until nothing is unanswered."""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(BrokerUnavailable):
        while service.unfinished and time.monotonic() < deadline:
            broker.process_events(0.1)


if __name__ == "__main__":
    sys.exit(main())
