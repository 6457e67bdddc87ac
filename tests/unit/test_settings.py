"""Worker settings come from the environment, with defaults that work on a laptop."""

from __future__ import annotations

import socket

import pytest

from worker.settings import InvalidSetting, WorkerSettings


def test_defaults_work_on_a_laptop() -> None:
    settings = WorkerSettings.from_env({})
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/%2F"
    assert settings.node_name == socket.gethostname()
    assert settings.docker_host is None
    assert settings.max_concurrent_pulls >= 1


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
        ({"PULLER_MAX_CONCURRENT_PULLS": "two"}, "PULLER_MAX_CONCURRENT_PULLS='two' is not a int"),
        ({"PULLER_MAX_CONCURRENT_PULLS": "0"}, "must be at least 1"),
        ({"PULLER_STALL_TIMEOUT": "soon"}, "is not a float"),
        ({"PULLER_HEARTBEAT": "-3"}, "must be at least 1"),
        ({"PULLER_LOG_FORMAT": "xml"}, "expected auto, json or console"),
        ({"PULLER_NODE_NAME": "a\tb"}, "printable"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidSetting, match=message):
        WorkerSettings.from_env(env)
