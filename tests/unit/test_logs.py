"""What the programs' log lines hold when an exception is logged: the traceback, never the
values of the failing frames' variables (a registry password, a broker URL). Run in a
process of its own: logging's configuration is the whole process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "pa55-w0rd-in-a-local"  # noqa: S105 - made up, looked for in the output
PROGRAM = """
import logging, sys
import structlog
from serving.logs import configure_logging

def fail_holding_a_secret(password):
    terminal = f"typed: {password}"
    raise OSError(f"out of terminals ({len(terminal)})")

configure_logging(sys.argv[1])
try:
    fail_holding_a_secret(sys.argv[2])
except OSError:
    structlog.get_logger("worker.service").exception("a pull failed unexpectedly")
    logging.getLogger("publisher").exception("from the standard library too")
"""


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_logged_exception_shows_no_local_variables(log_format: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, log_format, SECRET],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).parents[2],  # where serving/ is
    )

    out = done.stdout
    assert "out of terminals" in out and "fail_holding_a_secret" in out  # the traceback
    assert SECRET not in out + done.stderr
    if log_format == "json":
        lines = [json.loads(line) for line in out.splitlines()]
        assert len(lines) == 2 and all("exception" in line for line in lines)
