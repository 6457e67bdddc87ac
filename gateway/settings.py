"""The gateway's settings, read from the environment through one table."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import serving.settings
from serving.settings import (
    BROKER_ROWS,
    LOG_FORMAT,
    POLICY_ROWS,
    BrokerAndPolicy,
    InvalidSetting,
    Setting,
    broker_tls,
    check_table,
    number,
    read,
)
from serving.settings import whole_number as whole

__all__ = ["SETTINGS", "GatewaySettings", "InvalidSetting", "environment_help"]


@dataclass(frozen=True)
class GatewaySettings(BrokerAndPolicy):
    http_port: int = 5017
    sha: str | None = None
    log_format: str = "auto"
    max_waiting: int = 64
    max_connections: int = 8000
    max_timeout: float = 600.0
    connect_timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        settings = read(cls, SETTINGS, os.environ if env is None else env)
        broker_tls(settings)  # fails here, at start, on TLS files that do not fit the URL
        return settings


SETTINGS: tuple[Setting, ...] = (
    *BROKER_ROWS,
    *POLICY_ROWS,
    Setting(
        "PULLER_HTTP_PORT",
        "http_port",
        "the HTTP port (the original puller's: 5017)",
        whole,
        minimum=1,
        maximum=65535,
    ),
    Setting("SHA", "sha", "the commit the image was built from, answered by /sha"),
    LOG_FORMAT,
    Setting(
        "PULLER_HTTP_MAX_WAITING",
        "max_waiting",
        "callers that may wait in `POST /pulls` at once; more get 503",
        whole,
        minimum=1,
    ),
    Setting(
        "PULLER_HTTP_MAX_CONNECTIONS",
        "max_connections",
        "connections held at once, slow or idle ones included; past it the oldest idle one "
        "is closed for each new one",
        whole,
        minimum=1,
    ),
    Setting(
        "PULLER_HTTP_MAX_TIMEOUT",
        "max_timeout",
        "the longest `timeout` a `POST /pulls` may ask for, seconds",
        number,
        minimum=1,
    ),
    Setting(
        "PULLER_CONNECT_TIMEOUT",
        "connect_timeout",
        "seconds to wait for RabbitMQ before answering 503",
        number,
        minimum=0.1,
    ),
)
check_table(GatewaySettings, SETTINGS)


def environment_help() -> str:
    return serving.settings.environment_help(SETTINGS, GatewaySettings())
