"""The worker's settings: one typed dataclass, each field declared once with its variable
(see :mod:`serving.settings`); ``puller-worker --help``, docs/configuration.md and the
deployment tests all follow the declarations.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import serving.settings
from contract import PRESENCE_INTERVAL
from contract.connection import BROKER_ORDERS, SPREAD
from contract.fields import MAX_NODE_NAME_LENGTH
from contract.topology import DEFAULT_HISTORY_MAX_AGE, DEFAULT_HISTORY_MAX_BYTES
from serving.settings import (
    BrokerAndPolicy,
    InvalidSetting,
    Setting,
    broker_tls,
    choice,
    computed_setting,
    log_format_setting,
    number,
    read,
    setting,
    settings_of,
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


def valid_node_name(text: str) -> str:
    if len(text) > MAX_NODE_NAME_LENGTH or not text.isprintable():
        raise ValueError(f"a node name is 1 to {MAX_NODE_NAME_LENGTH} printable characters")
    return text


@dataclass(frozen=True)
class WorkerSettings(BrokerAndPolicy):
    allowed_publishers: frozenset[str] | None = setting(
        ALLOWED_PUBLISHERS,
        publisher_names,
        None,
        help="comma-separated AMQP users whose requests this node takes (RabbitMQ vouches for "
        "a request's `user_id`); others answer `forbidden`",
        unset="anyone who may publish",
    )
    max_requests_per_minute: int = setting(
        MAX_REQUESTS_PER_MINUTE,
        whole_number,
        0,
        help="pulls a minute this node starts for live requests (images it has, and requests "
        "that join a running pull, do not count); more answer `rate_limited`; `0`: no cap",
        minimum=0,
    )
    node_name: str = computed_setting(
        "PULLER_NODE_NAME",
        valid_node_name,
        socket.gethostname,
        help="this node's name in replies and in its queue's name (`puller.node.NAME`, "
        "exclusive: each node needs its own)",
        unset="the host name",
    )
    image_store: str = setting(
        "PULLER_IMAGE_STORE",
        choice("docker", "containerd"),
        "docker",
        help="`docker`: pull through the node's Docker Engine (`DOCKER_HOST`); `containerd`: "
        "pull into the node's containerd with `ctr` (`CONTAINERD_ADDRESS`), where the kubelet "
        "finds images",
    )
    containerd_address: str = setting(
        "CONTAINERD_ADDRESS",
        str,
        DEFAULT_ADDRESS,
        help="the node's containerd socket, for `PULLER_IMAGE_STORE=containerd` (ctr's own "
        "variable)",
    )
    containerd_namespace: str = setting(
        "PULLER_CONTAINERD_NAMESPACE",
        str,
        DEFAULT_NAMESPACE,
        help="the containerd namespace images are pulled into: the kubelet's",
    )
    containerd_snapshotter: str | None = setting(
        "PULLER_CONTAINERD_SNAPSHOTTER",
        str,
        None,
        help="the snapshotter images are unpacked with; it must be the kubelet's",
        unset="containerd's default",
    )
    containerd_hosts_dir: str | None = setting(
        "PULLER_CONTAINERD_HOSTS_DIR",
        str,
        None,
        help="a containerd `hosts.toml` directory (mirrors, CAs, plain HTTP) for registries, as "
        "containerd's `config_path`, mounted into the worker; registries on `localhost` and "
        "loopback addresses are pulled over plain HTTP in any case",
        unset="none",
    )
    containerd_root: Path = setting(
        "PULLER_CONTAINERD_ROOT",
        Path,
        Path(CONTAINERD_ROOT),
        help="containerd's root directory as this worker sees it, for the disk figure of "
        "`PULLER_DISK_HIGH_WATER` on a containerd node: in a container, mount the node's "
        "`/var/lib/containerd` there (read-only will do)",
    )
    docker_host: str | None = setting(
        "DOCKER_HOST",
        str,
        None,
        help="the node's Docker Engine: `unix://PATH`, `tcp://HOST:PORT`, `http://` or "
        "`https://` (checked against the system's certificate authorities; `SSL_CERT_FILE` "
        "adds one), as the docker CLI spells it",
        unset="the local socket, `/var/run/docker.sock`",
    )
    docker_config: Path | None = setting(
        "DOCKER_CONFIG",
        Path,
        None,
        help="the directory of a docker `config.json` whose `auths` (or "
        "`credHelpers`/`credsStore`) log the worker in to private registries; read again at "
        "every pull, so a rotated Secret counts from the next pull; without a login a registry "
        "wants, the node answers `unauthorized` saying so (the docker SDK's own variable)",
        unset="`~/.docker`",
    )
    """See :class:`worker.stores.registry_logins.DockerConfig`."""
    pull_through_caches: CacheRoutes = setting(
        PULL_THROUGH_CACHES,
        cache_routes,
        (),
        help="comma-separated `UPSTREAM=CACHE` registry pairs (`HOST[:PORT]` each, as image "
        "names spell them; `docker.io` for Docker Hub), e.g. `docker.io=cache.local:5002`: "
        "layers of images from UPSTREAM are pulled through the cluster's CACHE first, so a slow "
        "uplink carries each image about once; a cache that is down or fails means a warning "
        "and a direct pull, never a failure",
        unset="none",
    )
    """``(upstream, cache)`` pairs (see :mod:`worker.stores.pull_through`)."""
    max_concurrent_pulls: int = setting(
        "PULLER_MAX_CONCURRENT_PULLS",
        whole_number,
        2,
        help="pulls at once on this node, taken in turn from each registry; identical requests "
        "join a running pull",
        minimum=1,
    )
    pull_timeout: float = setting(
        "PULLER_PULL_TIMEOUT",
        number,
        1800.0,
        help="seconds one pull may take before it is cancelled (`timeout`)",
        minimum=1,
    )
    stall_timeout: float = setting(
        "PULLER_STALL_TIMEOUT",
        number,
        120.0,
        help="seconds with no word from the engine's pull stream before it is cancelled "
        "(`stalled`)",
        minimum=1,
    )
    pull_retries: int = setting(
        "PULLER_PULL_RETRIES",
        whole_number,
        3,
        help="further attempts after a transient failure (`registry_unreachable`, "
        "`registry_error`, `stalled`)",
        minimum=0,
    )
    retry_delay: float = setting(
        "PULLER_RETRY_DELAY",
        number,
        1.0,
        help="least seconds before a retry; each wait is drawn between it and 3 times the last "
        "(jitter), up to 15",
        minimum=0,
    )
    registry_cooldown: float = setting(
        "PULLER_REGISTRY_COOLDOWN",
        number,
        30.0,
        help="seconds a registry that does not answer is known down: its new pulls fail at "
        "once; `0` turns it off",
        minimum=0,
    )
    not_found_memory: float = setting(
        "PULLER_NOT_FOUND_MEMORY",
        number,
        10.0,
        help="seconds a `not_found` answer is repeated from memory for the same image; `0` "
        "turns it off",
        minimum=0,
    )
    heartbeat: int = setting(
        "PULLER_HEARTBEAT", whole_number, 30, help="AMQP heartbeat, seconds", minimum=1
    )
    stream_port: int | None = setting(
        "PULLER_STREAM_PORT",
        whole_number,
        None,
        help="RabbitMQ's stream-protocol port (plugin `rabbitmq_stream`) on the brokers of "
        "`PULLER_AMQP_URL`, where the worker reads where the history ends; TLS with `amqps://`",
        unset="5552, or 5551 with `amqps://`, when the AMQP port is the default one "
        "(else the marker fallback)",
        minimum=1,
        maximum=65535,
    )
    broker_order: str = setting(
        "PULLER_BROKER_ORDER",
        choice(*BROKER_ORDERS),
        SPREAD,
        help="the order this worker tries the brokers of `PULLER_AMQP_URL` in: `spread`, by a "
        "hash of its node name, so that the nodes share a RabbitMQ cluster's brokers (and "
        "those of a lost broker fail over to all the others); `listed`, as written",
    )
    reconnect_spread: float = setting(
        "PULLER_RECONNECT_SPREAD",
        number,
        1.0,
        help="most seconds of the random wait before reconnecting after a lost connection, so "
        "that nodes that lost the same broker come back spread over this time; with "
        "thousands of nodes a broker, raise it (see docs/operations.md)",
        minimum=0,
        maximum=300,
    )
    presence_interval: float = setting(
        "PULLER_PRESENCE_INTERVAL",
        number,
        PRESENCE_INTERVAL,
        help="seconds between presence announcements on a small cluster (publishers drop a "
        "node after three missed); a large one stretches it, see PULLER_PRESENCE_TARGET_RATE",
        minimum=0.1,
    )
    presence_target_rate: float = setting(
        "PULLER_PRESENCE_TARGET_RATE",
        number,
        100.0,
        help="announcements a second the whole cluster aims at: past this many x "
        "PULLER_PRESENCE_INTERVAL nodes, each node announces every nodes/rate seconds (at "
        "most 60); 0 keeps the base interval whatever the size (upgrade publishers first)",
        minimum=0,
    )
    shutdown_grace: float = setting(
        "PULLER_SHUTDOWN_GRACE",
        number,
        20.0,
        help="seconds to finish pulls after SIGTERM, then 5 more to answer `cancelled`; keep "
        "the sum below the pod's `terminationGracePeriodSeconds` (30 by default)",
        minimum=0,
    )
    log_format: str = log_format_setting()
    history_max_age: float = setting(
        "PULLER_HISTORY_MAX_AGE",
        number,
        DEFAULT_HISTORY_MAX_AGE,
        help="seconds a request stays replayable; older ones are never caught up on",
        minimum=1,
    )
    history_max_bytes: int = setting(
        "PULLER_HISTORY_MAX_BYTES",
        whole_number,
        DEFAULT_HISTORY_MAX_BYTES,
        help="size bound of the history stream, whatever the age of what it holds",
        minimum=100_000,
    )
    desired_state_interval: float = setting(
        "PULLER_DESIRED_STATE_INTERVAL",
        number,
        600.0,
        help="seconds between the keeper's snapshots of the desired state (written only when "
        "the history moved; the keeper is one worker, whichever holds the keeper's token)",
        minimum=0.1,
    )
    state_dir: Path = setting(
        "PULLER_STATE_DIR",
        Path,
        Path("/var/lib/puller"),
        help="on the node's own disk: how far this node has caught up, when it last used each "
        "image, and pulls it owes itself since its engine was away (mount a host path in a "
        "container)",
    )
    health_port: int = setting(
        "PULLER_HEALTH_PORT",
        whole_number,
        8080,
        help="HTTP port of `GET /alive`, `/ready` and `/metrics`; `0` turns it off",
        minimum=0,
        maximum=65535,
    )
    health_max_connections: int = setting(
        "PULLER_HEALTH_MAX_CONNECTIONS",
        whole_number,
        4000,
        help="connections the health port holds at once, slow or idle ones included; past it "
        "the oldest idle one is closed for each new one",
        minimum=1,
    )
    disk_high_water: float | None = setting(
        "PULLER_DISK_HIGH_WATER",
        number,
        None,
        help="percent used of the engine's data disk at which the worker removes unused "
        "images, oldest-unused first, never one a container uses or the keep list names",
        unset="never",
        minimum=1,
        maximum=99,
    )
    disk_low_water: float | None = setting(
        "PULLER_DISK_LOW_WATER",
        number,
        None,
        help="percent used to prune down to once over the high-water mark",
        unset="10 under the high mark",
        minimum=0,
        maximum=98,
    )
    disk_check_interval: float = setting(
        "PULLER_DISK_CHECK_INTERVAL",
        number,
        60.0,
        help="seconds between checks of the disk against `PULLER_DISK_HIGH_WATER`",
        minimum=1,
    )
    prune_keep_file: Path | None = setting(
        "PULLER_PRUNE_KEEP_FILE",
        Path,
        None,
        help="a file of images never to remove automatically: one reference a line, `#` "
        "comments; read again at each pass (a bad line stops the worker at start, and skips a "
        "pass later)",
        unset="none",
    )
    prune_min_idle: float = setting(
        "PULLER_PRUNE_MIN_IDLE",
        number,
        DEFAULT_MIN_IDLE,
        help="seconds an image must have gone unused before the high-water mode may remove it",
        minimum=0,
    )
    docker_data_root: Path | None = setting(
        "PULLER_DOCKER_DATA_ROOT",
        Path,
        None,
        help="the engine's data root as this worker sees it, for the disk figure: in a "
        "container, mount the host's `/var/lib/docker` (read-only will do) and name it here",
        unset="the engine's `DockerRootDir`",
    )

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


SETTINGS: tuple[Setting, ...] = settings_of(WorkerSettings)


def environment_help() -> str:
    """The variables, for ``puller-worker --help``."""
    return serving.settings.environment_help(WorkerSettings)
