"""The gateway's settings: one typed dataclass, each field declared once with its variable
(see :mod:`serving.settings`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import serving.settings
from publisher.settings import PublisherSettings
from serving.settings import (
    InvalidSetting,
    Setting,
    broker_tls,
    log_format_setting,
    number,
    read,
    setting,
    settings_of,
)
from serving.settings import whole_number as whole

__all__ = ["SETTINGS", "GatewaySettings", "InvalidSetting", "environment_help"]


@dataclass(frozen=True)
class GatewaySettings(PublisherSettings):
    http_port: int = setting(
        "PULLER_HTTP_PORT",
        whole,
        5017,
        help="the HTTP port (the original puller's)",
        minimum=1,
        maximum=65535,
    )
    sha: str | None = setting(
        "SHA", str, None, help="the commit the image was built from, answered by `/sha`"
    )
    log_format: str = log_format_setting()
    max_waiting: int = setting(
        "PULLER_HTTP_MAX_WAITING",
        whole,
        64,
        help="callers that may wait in `POST /pulls` at once; more get 503",
        minimum=1,
    )
    max_connections: int = setting(
        "PULLER_HTTP_MAX_CONNECTIONS",
        whole,
        8000,
        help="connections held at once, slow or idle ones included; past it the oldest idle "
        "one is closed for each new one",
        minimum=1,
    )
    max_timeout: float = setting(
        "PULLER_HTTP_MAX_TIMEOUT",
        number,
        600.0,
        help="the longest `timeout` a `POST /pulls` may ask for, seconds",
        minimum=1,
    )
    connect_timeout: float = setting(
        "PULLER_CONNECT_TIMEOUT",
        number,
        5.0,
        help="seconds to wait for RabbitMQ before answering 503",
        minimum=0.1,
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        settings = read(cls, SETTINGS, os.environ if env is None else env)
        broker_tls(settings)  # fails here, at start, on TLS files that do not fit the URL
        return settings


SETTINGS: tuple[Setting, ...] = settings_of(GatewaySettings)


def environment_help() -> str:
    return serving.settings.environment_help(GatewaySettings)
