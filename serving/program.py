"""What every puller command does first: its arguments (``--help`` with the environment it
reads, ``--version``), and SIGTERM/SIGINT as a request to stop."""

from __future__ import annotations

import argparse
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
