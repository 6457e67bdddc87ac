"""The failures every image store (and the pull service) words the same way: a pull cancelled
or interrupted, and what an engine's error message means (its :class:`ErrorKind` and what to
do about it).
"""

from __future__ import annotations

from collections.abc import Mapping

from contract import ErrorKind, ImageReference, PullFailed
from worker.stores.registry_logins import RegistryLogin, login_advice


def cancelled(image: ImageReference) -> PullFailed:
    """A pull cut, or never started, because the worker is stopping."""
    return PullFailed(
        ErrorKind.CANCELLED,
        f"pulling {image} was cancelled because the worker is shutting down; "
        "the node may pull it on the next request",
    )


def interrupted(image: ImageReference) -> PullFailed:
    """A warm pull cut to make room for a session's (any image store)."""
    return PullFailed(
        ErrorKind.CANCELLED,
        f"pulling {image} was interrupted to make room for a session's pull",
    )


_RULES: list[tuple[ErrorKind, tuple[str, ...], str]] = [
    (
        # The store stopping mid-pull (a dockerd restart kills the child unpacking a layer;
        # the last three are containerd's side): retried (worker.pulls.service.TRANSIENT_KINDS).
        ErrorKind.ENGINE_UNAVAILABLE,
        (
            "(signal: terminated)",
            "the client connection is closing",
            "transport is closing",
            "error creating lease",
        ),
        "the node's Docker Engine was stopping; the pull is retried (PULLER_PULL_RETRIES)",
    ),
    (
        ErrorKind.NO_SPACE,
        ("no space left on device",),
        "free disk space on the node (remove images it no longer needs: `puller prune`)",
    ),
    (
        ErrorKind.NOT_FOUND,
        ("manifest unknown", "not found", "does not exist", "name unknown"),
        "check that the repository and tag exist in the registry",
    ),
    (
        ErrorKind.UNAUTHORIZED,
        ("unauthorized", "authentication required", "denied", "no basic auth credentials"),
        "",  # see login_advice
    ),
    (
        ErrorKind.REGISTRY_UNREACHABLE,
        (
            "connection refused",
            "no such host",
            "i/o timeout",
            "dial tcp",
            "connection reset",
            "server closed idle connection",  # Go's client: closed before any answer
            "tls handshake",
            "network is unreachable",
            "eof",
            "timeout",
        ),
        "check that the node can reach the registry (DNS, network, proxy, firewall)",
    ),
    (
        ErrorKind.REGISTRY_ERROR,
        (
            "toomanyrequests",
            "too many requests",
            "500",
            "502",
            "503",
            "504",
            "internal server error",
            "service unavailable",
        ),
        "the registry is failing or rate-limiting; try again later",
    ),
]


def classified(
    engine_message: str,
    image: ImageReference,
    login: RegistryLogin | None = None,
    *,
    engine: str = "dockerd",
    advice: Mapping[ErrorKind, str] | None = None,
    basic_only: bool = False,
) -> PullFailed:
    """The failure the engine's ``engine_message`` means; ``login``: what the pull sent the
    registry, which tells a missing login from a refused one. ``engine``: whose log to
    look in; ``advice``: what to do, per kind, where it differs from the Docker Engine's;
    ``basic_only``: the client sends only a user name and password (see
    :func:`worker.stores.registry_logins.login_advice`)."""
    lowered = engine_message.lower()
    for kind, needles, default in _RULES:
        if any(needle in lowered for needle in needles):
            if advice and kind in advice:
                what_to_do = advice[kind]
            elif kind is ErrorKind.UNAUTHORIZED:
                what_to_do = login_advice(image.domain or "docker.io", login, basic_only=basic_only)
            else:
                what_to_do = default
            return PullFailed(
                kind, f"pulling {image} failed: {engine_message.strip()}; {what_to_do}"
            )
    return PullFailed(
        ErrorKind.ENGINE_ERROR,
        f"pulling {image} failed: {engine_message.strip()}; see the node's {engine} log",
    )
