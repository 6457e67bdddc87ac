"""Worker settings come from the environment, with defaults that work on a laptop."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

import serving.settings
from serving.settings import BrokerAndPolicy, read, settings_of, whole_number
from worker.daemon import CANCEL_GRACE
from worker.settings import SETTINGS, InvalidSetting, WorkerSettings, environment_help


def test_defaults_work_on_a_laptop() -> None:
    settings = WorkerSettings.from_env({})
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/%2F"
    assert settings.node_name == socket.gethostname()
    assert settings.docker_host is None
    assert settings.max_concurrent_pulls >= 1


def test_the_shutdown_grace_and_its_cancel_window_fit_in_the_default_pod_grace() -> None:
    assert WorkerSettings().shutdown_grace + CANCEL_GRACE < 30


def test_help_lists_every_variable_with_its_default() -> None:
    text = environment_help()
    for setting in SETTINGS:
        assert setting.env in text
    assert "PULLER_SHUTDOWN_GRACE" in text and "(20.0)" in text


def test_every_variable_is_read() -> None:
    settings = WorkerSettings.from_env(
        {
            "PULLER_AMQP_URL": "amqp://u:p@rabbit:5672/puller",
            "PULLER_NODE_NAME": "node-7",
            "DOCKER_HOST": "unix:///tmp/d.sock",
            "PULLER_MAX_CONCURRENT_PULLS": "4",
            "PULLER_PULL_TIMEOUT": "600",
            "PULLER_STALL_TIMEOUT": "15.5",
            "PULLER_HEARTBEAT": "10",
            "PULLER_SHUTDOWN_GRACE": "0",
            "PULLER_LOG_FORMAT": "json",
        }
    )
    assert settings == WorkerSettings(
        amqp_url="amqp://u:p@rabbit:5672/puller",
        node_name="node-7",
        docker_host="unix:///tmp/d.sock",
        max_concurrent_pulls=4,
        pull_timeout=600.0,
        stall_timeout=15.5,
        heartbeat=10,
        shutdown_grace=0.0,
        log_format="json",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PULLER_MAX_CONCURRENT_PULLS": "two"}, "PULLER_MAX_CONCURRENT_PULLS='two': not a whole"),
        ({"PULLER_MAX_CONCURRENT_PULLS": "0"}, "must be at least 1"),
        ({"PULLER_STALL_TIMEOUT": "soon"}, "PULLER_STALL_TIMEOUT='soon': not a number"),
        ({"PULLER_STALL_TIMEOUT": "inf"}, "not a finite number"),
        ({"PULLER_HEALTH_PORT": "70000"}, "must be at most 65535"),
        ({"PULLER_HEARTBEAT": "-3"}, "must be at least 1"),
        ({"PULLER_LOG_FORMAT": "xml"}, "expected auto, json or console"),
        ({"PULLER_NODE_NAME": "a\tb"}, "printable"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidSetting, match=message):
        WorkerSettings.from_env(env)


def test_a_field_without_a_declaration_is_refused() -> None:
    @dataclass(frozen=True)
    class Undeclared(BrokerAndPolicy):
        port: int = 1

    with pytest.raises(TypeError, match=r"Undeclared\.port is not declared with setting\(\)"):
        settings_of(Undeclared)


def test_one_declaration_gives_the_field_its_reading_and_its_help() -> None:
    @dataclass(frozen=True)
    class Example:
        port: int = serving.settings.setting(
            "EXAMPLE_PORT", whole_number, 80, help="the port", maximum=90
        )
        token: str = serving.settings.setting("EXAMPLE_TOKEN", str, "", help="a token", secret=True)

    (port, token) = settings_of(Example)
    assert (port.env, port.attribute, port.default) == ("EXAMPLE_PORT", "port", 80)
    assert read(Example, (port, token), {}) == Example()
    assert read(Example, (port, token), {"EXAMPLE_PORT": "85"}).port == 85
    with pytest.raises(InvalidSetting, match="EXAMPLE_PORT='95' must be at most 90"):
        read(Example, (port, token), {"EXAMPLE_PORT": "95"})
    assert "s3cret" not in repr(Example(token="s3cret"))  # noqa: S106 - a test value
    assert token.file_env == "EXAMPLE_TOKEN_FILE" and "`EXAMPLE_TOKEN_FILE`" in token.meaning
    assert "EXAMPLE_PORT" in serving.settings.environment_help(Example)


def test_help_says_what_a_default_worked_out_at_start_is() -> None:
    assert "(the host name)" in " ".join(environment_help().split())
