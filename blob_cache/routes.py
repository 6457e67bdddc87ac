"""What a request may ask the cache for: a strict reading of the request target.

Only the registry API's read paths are served (``/v2/``, ``/v2/NAME/manifests/REF``,
``/v2/NAME/blobs/DIGEST``) plus the cache's own ``/alive`` and ``/metrics``. The target
is read as sent (``REQUEST_URI``), never decoded: ``%``, ``#``, ``@``, ``;``, ``\\`` and
absolute-form targets are refused outright, so an upstream URL built from a route's
parts can only ever name the upstream's own API.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contract.reference import (
    DIGEST_HEX_LENGTHS,
    MAX_NAME_LENGTH,
    PATH_COMPONENT_PATTERN,
    TAG_PATTERN,
)

_TARGET_CHARACTERS = re.compile(r"[A-Za-z0-9._~/:=&?-]*")
_QUERY = re.compile(r"[A-Za-z0-9._~=&-]*")
_DIGEST = re.compile(r"(sha256|sha384|sha512):([a-f0-9]+)")


@dataclass(frozen=True)
class Ping:
    """``/v2/``: the registry API's version check (and login challenge)."""


@dataclass(frozen=True)
class Manifest:
    """``/v2/NAME/manifests/REFERENCE``: a tag or a digest."""

    name: str
    reference: str


@dataclass(frozen=True)
class Blob:
    """``/v2/NAME/blobs/DIGEST``."""

    name: str
    digest: str

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]


@dataclass(frozen=True)
class Alive:
    """``/alive``: the cache's own health."""


@dataclass(frozen=True)
class Metrics:
    """``/metrics``: Prometheus text."""


@dataclass(frozen=True)
class Refused:
    """A target the cache will not serve: ``status`` (400 or 404), a registry error code and
    a message saying why."""

    status: int
    code: str
    message: str


Route = Ping | Manifest | Blob | Alive | Metrics


def parse_target(target: str) -> Route | Refused:
    """The route ``target`` (the request target exactly as sent) asks for, or why not."""
    if not target.startswith("/"):
        return Refused(400, "UNSUPPORTED", "the request target must be a path (origin-form)")
    if not _TARGET_CHARACTERS.fullmatch(target):
        return Refused(
            400, "UNSUPPORTED", "the request target holds a character the registry API never uses"
        )
    path, _, query = target.partition("?")
    if not _QUERY.fullmatch(query):
        return Refused(400, "UNSUPPORTED", "the query string is not name=value pairs")
    fixed: dict[str, Route] = {"/v2/": Ping(), "/alive": Alive(), "/metrics": Metrics()}
    if path in fixed:
        return fixed[path]
    parts = path.removeprefix("/v2/").rsplit("/", 2)
    if not path.startswith("/v2/") or len(parts) != 3 or parts[1] not in ("blobs", "manifests"):
        return Refused(404, "UNSUPPORTED", "only /v2/, manifests and blobs are served")
    return _content_route(*parts)


def _content_route(name: str, kind: str, reference: str) -> Route | Refused:
    if not _valid_name(name):
        return Refused(400, "NAME_INVALID", "invalid repository name")
    if kind == "blobs":
        if not valid_digest(reference):
            return Refused(400, "DIGEST_INVALID", "invalid digest (sha256, sha384 or sha512)")
        return Blob(name, reference)
    if not (TAG_PATTERN.fullmatch(reference) or valid_digest(reference)):
        return Refused(400, "MANIFEST_INVALID", "invalid tag or digest")
    return Manifest(name, reference)


def valid_digest(text: str) -> bool:
    """``ALGORITHM:HEX`` with an algorithm Docker knows and its exact number of lowercase hex
    digits."""
    matched = _DIGEST.fullmatch(text)
    return matched is not None and len(matched[2]) == DIGEST_HEX_LENGTHS[matched[1]]


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LENGTH and all(
        PATH_COMPONENT_PATTERN.fullmatch(component) for component in name.split("/")
    )
