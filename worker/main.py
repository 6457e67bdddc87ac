"""``puller-worker``: the node daemon. Settings come from the environment only."""

from __future__ import annotations

import sys

from serving.logs import configure_logging
from serving.program import parse_arguments, raise_open_file_limit, stop_on_signals
from worker.catch_up.ledger import CannotKeepState, OffsetStore
from worker.daemon import Worker
from worker.settings import InvalidSetting, WorkerSettings, environment_help


def main(argv: list[str] | None = None) -> int:
    description = "Pull images onto this node when puller publishes a request."
    if parse_arguments("puller-worker", description, environment_help(), argv):
        return 0
    try:
        settings = WorkerSettings.from_env()
        offsets = OffsetStore(settings.state_dir)
    except (InvalidSetting, CannotKeepState) as error:
        print(f"puller-worker: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, always={"node": settings.node_name})
    raise_open_file_limit()
    stopping = stop_on_signals()
    try:
        worker = Worker(settings, offsets)
    except OSError as error:  # the health port is taken
        print(f"puller-worker: cannot listen on PULLER_HEALTH_PORT: {error}", file=sys.stderr)
        return 2
    worker.run(stopping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
