"""The worker's settings: one typed dataclass, built from the environment in one place."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from contract import (
    DEFAULT_HISTORY_MAX_AGE,
    DEFAULT_HISTORY_MAX_BYTES,
    PRESENCE_INTERVAL,
    PullerError,
)
from contract.messages import DEFAULT_AMQP_URL, MAX_NODE_NAME_LENGTH

_T = TypeVar("_T")


class InvalidSetting(PullerError):
    """An environment variable holds a value the worker cannot use."""


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str = DEFAULT_AMQP_URL
    node_name: str = field(default_factory=socket.gethostname)
    docker_host: str | None = None
    """``None``: the docker SDK's own default (``DOCKER_HOST`` or the local socket)."""
    max_concurrent_pulls: int = 2
    pull_timeout: float = 1800.0
    stall_timeout: float = 120.0
    pull_retries: int = 3
    """Further attempts after a transient failure (registry unreachable or failing, stall)."""
    retry_delay: float = 1.0
    """Seconds before the first retry; doubles for each next one, up to 15."""
    heartbeat: int = 30
    presence_interval: float = PRESENCE_INTERVAL
    shutdown_grace: float = 30.0
    log_format: str = "auto"
    history_max_age: float = DEFAULT_HISTORY_MAX_AGE
    """Seconds a request stays replayable; older ones are not caught up on."""
    history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES
    state_dir: Path = Path("/var/lib/puller")
    """Where the worker remembers how far it has caught up (the node's own disk)."""
    health_port: int = 8080
    """``GET /alive`` and ``GET /ready``; 0 turns the HTTP server off."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Reads ``PULLER_*`` and ``DOCKER_HOST``; raises :class:`InvalidSetting` saying which."""
        env = os.environ if env is None else env
        defaults = cls()
        node_name = env.get("PULLER_NODE_NAME", "").strip() or defaults.node_name
        if len(node_name) > MAX_NODE_NAME_LENGTH or not node_name.isprintable():
            raise InvalidSetting(
                f"PULLER_NODE_NAME={node_name!r}: a node name is 1 to "
                f"{MAX_NODE_NAME_LENGTH} printable characters"
            )
        log_format = env.get("PULLER_LOG_FORMAT", defaults.log_format)
        if log_format not in ("auto", "json", "console"):
            raise InvalidSetting(
                f"PULLER_LOG_FORMAT={log_format!r}: expected auto, json or console"
            )
        return cls(
            amqp_url=env.get("PULLER_AMQP_URL", defaults.amqp_url),
            node_name=node_name,
            docker_host=env.get("DOCKER_HOST") or None,
            max_concurrent_pulls=_read(
                env, "PULLER_MAX_CONCURRENT_PULLS", int, defaults.max_concurrent_pulls, minimum=1
            ),
            pull_timeout=_read(env, "PULLER_PULL_TIMEOUT", float, defaults.pull_timeout, minimum=1),
            stall_timeout=_read(
                env, "PULLER_STALL_TIMEOUT", float, defaults.stall_timeout, minimum=1
            ),
            pull_retries=_read(env, "PULLER_PULL_RETRIES", int, defaults.pull_retries, minimum=0),
            retry_delay=_read(env, "PULLER_RETRY_DELAY", float, defaults.retry_delay, minimum=0),
            heartbeat=_read(env, "PULLER_HEARTBEAT", int, defaults.heartbeat, minimum=1),
            presence_interval=_read(
                env, "PULLER_PRESENCE_INTERVAL", float, defaults.presence_interval, minimum=0.1
            ),
            shutdown_grace=_read(
                env, "PULLER_SHUTDOWN_GRACE", float, defaults.shutdown_grace, minimum=0
            ),
            log_format=log_format,
            history_max_age=_read(
                env, "PULLER_HISTORY_MAX_AGE", float, defaults.history_max_age, minimum=1
            ),
            history_max_bytes=_read(
                env, "PULLER_HISTORY_MAX_BYTES", int, defaults.history_max_bytes, minimum=100_000
            ),
            state_dir=Path(env.get("PULLER_STATE_DIR", "").strip() or defaults.state_dir),
            health_port=_port(env, defaults.health_port),
        )


def _read(
    env: Mapping[str, str],
    name: str,
    convert: Callable[[str], _T],
    default: _T,
    minimum: float,
) -> _T:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = convert(text)
    except ValueError:
        raise InvalidSetting(f"{name}={text!r} is not a {convert.__name__}") from None
    if value < minimum:  # type: ignore[operator]
        raise InvalidSetting(f"{name}={text!r} must be at least {minimum:g}")
    return value


def _port(env: Mapping[str, str], default: int) -> int:
    port = _read(env, "PULLER_HEALTH_PORT", int, default, minimum=0)
    if port > 65535:
        raise InvalidSetting(f"PULLER_HEALTH_PORT={port}: a port is 0 (off) to 65535")
    return port
