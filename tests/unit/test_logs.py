"""What the programs' log lines hold when an exception is logged: the traceback, never the
values of the failing frames' variables (a registry password, a broker URL)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from serving.logs import configure_logging

SECRET = "pa55-w0rd-in-a-local"  # noqa: S105 - made up, looked for in the output
EVENTS = ("a pull failed unexpectedly", "from the standard library too")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def fail_holding_a_secret(password: str) -> None:
    terminal = f"typed: {password}"
    raise OSError(f"out of terminals ({len(terminal)})")


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.usefixtures("restore_logging")
def test_a_logged_exception_shows_no_local_variables(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(log_format)
    try:
        fail_holding_a_secret(SECRET)
    except OSError:
        structlog.get_logger("worker.service").exception(EVENTS[0])
        logging.getLogger("publisher").exception(EVENTS[1])

    out = capsys.readouterr().out
    assert "out of terminals" in out and "fail_holding_a_secret" in out  # the traceback
    assert SECRET not in out
    if log_format == "json":  # other threads of the test run may log meanwhile
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        ours = [line for line in lines if line["event"] in EVENTS]
        assert len(ours) == 2 and all("exception" in line for line in ours)
