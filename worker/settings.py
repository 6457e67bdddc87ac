"""The worker's settings: one typed dataclass, built from the environment in one place.

Every variable is one row of :data:`SETTINGS` (see :mod:`serving.settings`);
``puller-worker --help``, the README's table and the deployment tests all follow it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import serving.settings
from contract import PRESENCE_INTERVAL
from contract.fields import MAX_NODE_NAME_LENGTH
from contract.topology import DEFAULT_HISTORY_MAX_AGE, DEFAULT_HISTORY_MAX_BYTES
from serving.settings import (
    BROKER_ROWS,
    LOG_FORMAT,
    POLICY_ROWS,
    BrokerAndPolicy,
    InvalidSetting,
    Setting,
    broker_tls,
    check_table,
    choice,
    number,
    read,
    whole_number,
)
from worker.admission import (
    ALLOWED_PUBLISHERS,
    MAX_REQUESTS_PER_MINUTE,
    publisher_names,
)
from worker.pruning.pruner import DEFAULT_MIN_IDLE, KeepListError, read_keep_file
from worker.stores.containerd import DEFAULT_ADDRESS, DEFAULT_NAMESPACE
from worker.stores.containerd import DEFAULT_ROOT as CONTAINERD_ROOT
from worker.stores.pull_through import PULL_THROUGH_CACHES, CacheRoutes, cache_routes

__all__ = ["SETTINGS", "InvalidSetting", "WorkerSettings", "environment_help"]


@dataclass(frozen=True)
class WorkerSettings(BrokerAndPolicy):
    allowed_publishers: frozenset[str] | None = None
    """AMQP users whose requests are taken; ``None``: anyone who may publish."""
    max_requests_per_minute: int = 0
    """Pulls a minute started for live requests; 0: no cap."""
    node_name: str = field(default_factory=socket.gethostname)
    image_store: str = "docker"
    """``docker`` or ``containerd``: which of the node's engines the worker pulls into."""
    containerd_address: str = DEFAULT_ADDRESS
    containerd_namespace: str = DEFAULT_NAMESPACE
    containerd_snapshotter: str | None = None
    """``None``: containerd's default snapshotter."""
    containerd_hosts_dir: str | None = None
    """containerd's ``hosts.toml`` directory for registries; ``None``: none."""
    containerd_root: Path = Path(CONTAINERD_ROOT)
    """containerd's root directory as the worker sees it (the disk figure for pruning)."""
    docker_host: str | None = None
    """``None``: the local socket, ``/var/run/docker.sock``."""
    docker_config: Path | None = None
    """``None``: ``~/.docker``, as the docker SDK looks (see
    :class:`worker.stores.registry_logins.DockerConfig`)."""
    pull_through_caches: CacheRoutes = ()
    """``(upstream, cache)`` pairs (see :mod:`worker.stores.pull_through`); empty: none."""
    max_concurrent_pulls: int = 2
    pull_timeout: float = 1800.0
    stall_timeout: float = 120.0
    pull_retries: int = 3
    retry_delay: float = 1.0
    registry_cooldown: float = 30.0
    not_found_memory: float = 10.0
    heartbeat: int = 30
    presence_interval: float = PRESENCE_INTERVAL
    shutdown_grace: float = 20.0
    log_format: str = "auto"
    history_max_age: float = DEFAULT_HISTORY_MAX_AGE
    history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES
    state_dir: Path = Path("/var/lib/puller")
    health_port: int = 8080
    health_max_connections: int = 4000
    disk_high_water: float | None = None
    """Percent of the engine's data disk used at which unused images are removed; ``None``:
    never automatically (see ``worker.pruning``)."""
    disk_low_water: float | None = None
    """Percent to prune down to; ``None``: 10 points under ``disk_high_water``."""
    disk_check_interval: float = 60.0
    prune_keep_file: Path | None = None
    prune_min_idle: float = DEFAULT_MIN_IDLE
    docker_data_root: Path | None = None
    """The engine's data root as this worker sees it; ``None``: the engine's DockerRootDir."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Reads every variable of :data:`SETTINGS`; raises :class:`InvalidSetting` naming
        the variable and saying what is wrong."""
        settings = read(cls, SETTINGS, os.environ if env is None else env)
        broker_tls(settings)  # fails here, at start, on TLS files that do not fit the URL
        _check_pruning(settings)
        return settings


def _check_pruning(settings: WorkerSettings) -> None:
    """The disk marks fit together, and a keep file is readable at start."""
    high, low = settings.disk_high_water, settings.disk_low_water
    if low is not None and high is None:
        raise InvalidSetting("PULLER_DISK_LOW_WATER needs PULLER_DISK_HIGH_WATER")
    if low is not None and high is not None and low >= high:
        raise InvalidSetting(
            f"PULLER_DISK_LOW_WATER={low:g} must be under PULLER_DISK_HIGH_WATER={high:g}"
        )
    if settings.prune_keep_file is not None:
        try:
            read_keep_file(settings.prune_keep_file)
        except KeepListError as error:
            raise InvalidSetting(f"PULLER_PRUNE_KEEP_FILE: {error}") from None


def node_name(text: str) -> str:
    if len(text) > MAX_NODE_NAME_LENGTH or not text.isprintable():
        raise ValueError(f"a node name is 1 to {MAX_NODE_NAME_LENGTH} printable characters")
    return text


SETTINGS: tuple[Setting, ...] = (
    *BROKER_ROWS,
    *POLICY_ROWS,
    Setting(
        ALLOWED_PUBLISHERS,
        "allowed_publishers",
        "comma-separated AMQP users whose requests this node takes (the broker vouches for a "
        "request's `user_id`); unset: anyone who may publish",
        publisher_names,
    ),
    Setting(
        MAX_REQUESTS_PER_MINUTE,
        "max_requests_per_minute",
        "pulls a minute this node starts for live requests (images it has, and requests that "
        "join a running pull, do not count); more answer `rate_limited`; 0: no cap",
        whole_number,
        minimum=0,
    ),
    Setting(
        "PULLER_NODE_NAME",
        "node_name",
        "this node's name in replies and in its queue name",
        node_name,
    ),
    Setting(
        "PULLER_IMAGE_STORE",
        "image_store",
        "`docker`: pull through the node's Docker Engine (`DOCKER_HOST`); `containerd`: pull "
        "into the node's containerd with `ctr` (`CONTAINERD_ADDRESS`), where the kubelet finds "
        "images",
        choice("docker", "containerd"),
    ),
    Setting(
        "CONTAINERD_ADDRESS",
        "containerd_address",
        f"the node's containerd socket, for `PULLER_IMAGE_STORE=containerd` (ctr's own "
        f"variable; default `{DEFAULT_ADDRESS}`)",
    ),
    Setting(
        "PULLER_CONTAINERD_NAMESPACE",
        "containerd_namespace",
        f"the containerd namespace images are pulled into (default `{DEFAULT_NAMESPACE}`, the "
        "kubelet's)",
    ),
    Setting(
        "PULLER_CONTAINERD_SNAPSHOTTER",
        "containerd_snapshotter",
        "the snapshotter images are unpacked with; it must be the kubelet's (unset: "
        "containerd's default)",
    ),
    Setting(
        "PULLER_CONTAINERD_HOSTS_DIR",
        "containerd_hosts_dir",
        "a containerd `hosts.toml` directory (mirrors, CAs, plain HTTP) for registries, as "
        "containerd's `config_path`, mounted into the worker; unset: none (registries on "
        "localhost and loopback addresses are pulled over plain HTTP in any case)",
    ),
    Setting(
        "PULLER_CONTAINERD_ROOT",
        "containerd_root",
        "containerd's root directory as this worker sees it, for the disk figure of "
        f"`PULLER_DISK_HIGH_WATER` (default `{CONTAINERD_ROOT}`: mount the node's there, "
        "read-only will do)",
        Path,
    ),
    Setting(
        "DOCKER_HOST",
        "docker_host",
        "the node's Docker Engine (the docker SDK's own variable; unset: the local socket)",
    ),
    Setting(
        "DOCKER_CONFIG",
        "docker_config",
        "the directory of a docker `config.json` that logs the worker in to private "
        "registries (the docker SDK's own variable; unset: `~/.docker`); read again at every "
        "pull, so a rotated Secret counts from the next pull",
        Path,
    ),
    Setting(
        PULL_THROUGH_CACHES,
        "pull_through_caches",
        "comma-separated `UPSTREAM=CACHE` registry pairs (`HOST[:PORT]`, e.g. "
        "`docker.io=cache.local:5002`): layers of images from UPSTREAM come through the "
        "cluster's CACHE, so a slow uplink carries each image about once; a cache that is "
        "down or fails means a direct pull and a warning, never a failure; unset: none",
        cache_routes,
    ),
    Setting(
        "PULLER_MAX_CONCURRENT_PULLS",
        "max_concurrent_pulls",
        "pulls at once on this node; identical requests join a running pull",
        whole_number,
        minimum=1,
    ),
    Setting(
        "PULLER_PULL_TIMEOUT",
        "pull_timeout",
        "seconds one pull may take before it is cancelled (`timeout`)",
        number,
        minimum=1,
    ),
    Setting(
        "PULLER_STALL_TIMEOUT",
        "stall_timeout",
        "seconds with no word from the engine's pull stream before it is cancelled (`stalled`)",
        number,
        minimum=1,
    ),
    Setting(
        "PULLER_PULL_RETRIES",
        "pull_retries",
        "further attempts after a transient failure "
        "(`registry_unreachable`, `registry_error`, `stalled`)",
        whole_number,
        minimum=0,
    ),
    Setting(
        "PULLER_RETRY_DELAY",
        "retry_delay",
        "least seconds before a retry; each wait is drawn between it and 3 times the last "
        "(jitter), up to 15",
        number,
        minimum=0,
    ),
    Setting(
        "PULLER_REGISTRY_COOLDOWN",
        "registry_cooldown",
        "seconds a registry that does not answer is known down: its pulls fail at once; 0: off",
        number,
        minimum=0,
    ),
    Setting(
        "PULLER_NOT_FOUND_MEMORY",
        "not_found_memory",
        "seconds a `not_found` answer is repeated from memory for the same image; 0: off",
        number,
        minimum=0,
    ),
    Setting("PULLER_HEARTBEAT", "heartbeat", "AMQP heartbeat, seconds", whole_number, minimum=1),
    Setting(
        "PULLER_PRESENCE_INTERVAL",
        "presence_interval",
        "seconds between presence announcements (publishers drop a node after three missed)",
        number,
        minimum=0.1,
    ),
    Setting(
        "PULLER_SHUTDOWN_GRACE",
        "shutdown_grace",
        "seconds to finish pulls after SIGTERM, then 5 more to answer `cancelled`; keep the "
        "sum below the pod's terminationGracePeriodSeconds (30 by default)",
        number,
        minimum=0,
    ),
    LOG_FORMAT,
    Setting(
        "PULLER_HISTORY_MAX_AGE",
        "history_max_age",
        "seconds a request stays replayable; older ones are never caught up on",
        number,
        minimum=1,
    ),
    Setting(
        "PULLER_HISTORY_MAX_BYTES",
        "history_max_bytes",
        "size bound of the history stream, whatever the age of what it holds",
        whole_number,
        minimum=100_000,
    ),
    Setting(
        "PULLER_STATE_DIR",
        "state_dir",
        "on the node's own disk: how far this node has caught up, when it last used each "
        "image, and pulls it owes itself since its engine was away (mount a host path in a "
        "container)",
        Path,
    ),
    Setting(
        "PULLER_HEALTH_PORT",
        "health_port",
        "HTTP port of `GET /alive`, `/ready` and `/metrics`; `0` turns it off",
        whole_number,
        minimum=0,
        maximum=65535,
    ),
    Setting(
        "PULLER_HEALTH_MAX_CONNECTIONS",
        "health_max_connections",
        "connections the health port holds at once, slow or idle ones included; past it the "
        "oldest idle one is closed for each new one",
        whole_number,
        minimum=1,
    ),
    Setting(
        "PULLER_DISK_HIGH_WATER",
        "disk_high_water",
        "percent used of the engine's data disk at which the worker removes unused images, "
        "oldest-unused first (never one a container uses or the keep list names); unset: never",
        number,
        minimum=1,
        maximum=99,
    ),
    Setting(
        "PULLER_DISK_LOW_WATER",
        "disk_low_water",
        "percent used to prune down to once over the high-water mark; unset: 10 under it",
        number,
        minimum=0,
        maximum=98,
    ),
    Setting(
        "PULLER_DISK_CHECK_INTERVAL",
        "disk_check_interval",
        "seconds between checks of the disk against `PULLER_DISK_HIGH_WATER`",
        number,
        minimum=1,
    ),
    Setting(
        "PULLER_PRUNE_KEEP_FILE",
        "prune_keep_file",
        "a file of images never to remove automatically, one reference a line, `#` comments; "
        "read again at each pass",
        Path,
    ),
    Setting(
        "PULLER_PRUNE_MIN_IDLE",
        "prune_min_idle",
        "seconds an image must have gone unused before the high-water mode may remove it",
        number,
        minimum=0,
    ),
    Setting(
        "PULLER_DOCKER_DATA_ROOT",
        "docker_data_root",
        "the engine's data root as this worker sees it, for its disk figure (unset: the "
        "engine's DockerRootDir, right only when the worker sees that path)",
        Path,
    ),
)

check_table(WorkerSettings, SETTINGS)


def environment_help() -> str:
    """The variables, for ``puller-worker --help``."""
    return serving.settings.environment_help(SETTINGS, WorkerSettings(node_name="(host name)"))
