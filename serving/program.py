"""What every puller command does first: its arguments (``--help`` with the environment it
reads, ``--version``), SIGTERM/SIGINT as a request to stop, and the open-file limit."""

from __future__ import annotations

import argparse
import resource
import signal
import threading
from types import FrameType

from contract import puller_version


def parse_arguments(prog: str, description: str, epilog: str, argv: list[str] | None) -> bool:
    """Parses the command line; returns whether the version was asked for (and printed)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    if parser.parse_args(argv).version:
        print(f"{prog} {puller_version()}")
        return True
    return False


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (the main thread's signal handlers)."""
    stopping = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stopping


def raise_open_file_limit() -> int:
    """Raises the soft limit on open files to the hard one (each HTTP connection is a file;
    a container's soft limit may be 1,024); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
