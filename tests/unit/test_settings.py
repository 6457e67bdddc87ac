"""Worker settings come from the environment, with defaults that work on a laptop."""

from __future__ import annotations

import socket

import pytest

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
