"""The ``puller`` CLI's argument handling, without a broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contract import puller_version
from publisher import cli


def test_an_invalid_reference_exits_2_and_publishes_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_publisher(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a Publisher was created for an invalid reference")

    monkeypatch.setattr(cli, "Publisher", no_publisher)
    assert cli.main(["pull", "Not A Reference"]) == cli.EXIT_USAGE
    assert "invalid image reference" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--expect", "0"], ["--timeout", "-1"], ["--expect", "x"]])
def test_bad_flags_exit_2(flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pull", "busybox", *flags])
    assert exit_info.value.code == 2


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == cli.EXIT_USAGE
    assert "pull" in capsys.readouterr().err


def test_an_unreachable_broker_exits_3_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    code = cli.main(["--amqp-url", "amqp://guest:guest@127.0.0.1:9/%2F", "pull", "busybox"])
    assert code == cli.EXIT_BROKER
    assert "cannot connect to RabbitMQ at 127.0.0.1:9" in capsys.readouterr().err


def test_the_installed_command_answers_its_version() -> None:
    """As ``puller-worker --version`` and ``puller-http --version`` do."""
    command = Path(sys.executable).parent / "puller"
    done = subprocess.run(
        [command, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"puller {puller_version()}\n", "")
    assert puller_version() != "unknown"
