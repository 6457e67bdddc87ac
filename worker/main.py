"""``puller-worker``: the node daemon. Settings come from the environment only."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from contract import puller_version
from serving.logs import configure_logging
from worker.daemon import Worker
from worker.history_ledger import CannotKeepState, OffsetStore
from worker.settings import InvalidSetting, WorkerSettings, environment_help


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="puller-worker",
        description="Pull images onto this node when puller publishes a request.",
        epilog=environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.version:
        print(f"puller-worker {puller_version()}")
        return 0
    try:
        settings = WorkerSettings.from_env()
        offsets = OffsetStore(settings.state_dir)
    except (InvalidSetting, CannotKeepState) as error:
        print(f"puller-worker: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, always={"node": settings.node_name})
    stopping = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        worker = Worker(settings, offsets)
    except OSError as error:  # the health port is taken
        print(f"puller-worker: cannot listen on PULLER_HEALTH_PORT: {error}", file=sys.stderr)
        return 2
    worker.run(stopping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
