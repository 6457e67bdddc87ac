"""Pull-through caches: K nodes on one slow uplink fetch each image across it about once.

A cache is a registry inside the cluster that serves one upstream registry's content by
digest: Debian's ``docker-registry`` in proxy mode, or puller's own ``puller-blob-cache``
(:mod:`blob_cache`, docs/blob-cache.md: it fetches each blob from upstream once however
many nodes ask at the same moment).
``PULLER_PULL_THROUGH_CACHES`` maps upstream registries to their caches::

    PULLER_PULL_THROUGH_CACHES="registry-1.example:5000=cache.local:5001,docker.io=cache.local:5002"

How the worker pulls an image whose registry has a cache (:meth:`DockerEngine.pull`):

1. resolve the upstream's digest for the asked name through the engine
   (``GET /distribution/{name}/json``: the engine's own registry client, with the login
   the direct pull would send); a digest-pinned reference is its own digest;
2. pull ``CACHE/PATH@DIGEST``: the layers come from the cache, so across the uplink only
   once for the whole cluster;
3. pull the asked name directly, as without a cache: the engine fetches the upstream's
   manifest (a few kilobytes), finds the image's config and layers already there, and
   records the name, its tag and the upstream's repo digest itself. The engine checks the
   upstream's digest, exactly as for any pull; nothing is tagged by hand;
4. remove the cache's name (``CACHE/PATH@DIGEST``), keeping the image.

Whatever goes wrong in steps 1 and 2 (the cache is down, refuses, stalls or lacks the
image; the upstream cannot be resolved) is logged as a warning, and step 3 then does the
whole pull directly: a cache never makes a pull fail. Failures of step 3 are the pull's
own, classified as without a cache. A cache that does not answer its ``/v2/`` within
:data:`PROBE_TIMEOUT` or answers it with a server error (5xx), or whose pull failed for any
reason (refused, stalled, lacked the image, or the upstream's digest could not be resolved),
is skipped for :data:`DOWN_FOR` seconds; each such failure in a row doubles that, up to
:data:`MAX_DOWN_FOR`, until a pull through it succeeds again. So a cache whose ``/v2/``
answers but whose blobs fail or hang costs one failed pull (a stall timeout, or the
engine's retries), then fewer and fewer.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from contract.reference import DOMAIN_PATTERN

PULL_THROUGH_CACHES = "PULLER_PULL_THROUGH_CACHES"
PROBE_TIMEOUT = 3.0
"""Seconds the cache's ``/v2/`` may take to answer before the pull goes direct."""
DOWN_FOR = 30.0
"""Seconds a cache that failed is skipped (its pulls go direct at once), the first time."""
MAX_DOWN_FOR = 600.0
"""The longest skip, after failures in a row (each doubles the one before)."""

CacheRoutes = tuple[tuple[str, str], ...]
"""``(upstream registry, cache address)`` pairs, both ``HOST[:PORT]`` as image names spell
them."""


def cache_routes(text: str) -> CacheRoutes:
    """Parses ``UPSTREAM=CACHE[,UPSTREAM=CACHE...]``; raises ``ValueError`` saying what is
    wrong. ``docker.io`` names Docker Hub (as normalised image names do)."""
    routes: dict[str, str] = {}
    for item in text.split(","):
        entry = item.strip()
        if not entry:
            continue
        upstream, equals, cache = (part.strip() for part in entry.partition("="))
        if not equals or not upstream or not cache:
            raise ValueError(f"{entry!r} is not UPSTREAM=CACHE (both HOST[:PORT])")
        for what, host in (("upstream", upstream), ("cache", cache)):
            if "://" in host or "/" in host or not DOMAIN_PATTERN.fullmatch(host):
                raise ValueError(
                    f"{what} {host!r} in {entry!r} is not a registry HOST[:PORT] "
                    "(no scheme, no path)"
                )
        upstream = _docker_hub_spelling(upstream)
        if upstream in routes:
            raise ValueError(f"upstream {upstream!r} has more than one cache")
        if upstream == _docker_hub_spelling(cache):
            raise ValueError(f"{entry!r}: a registry cannot be its own cache")
        routes[upstream] = cache
    if not routes:
        raise ValueError("expected UPSTREAM=CACHE[,UPSTREAM=CACHE...]")
    return tuple(routes.items())


def _docker_hub_spelling(host: str) -> str:
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


class CacheOutcome:
    """What a pull did about its registry's cache, for the metric."""

    CACHE = "cache"
    """The layers came through the cache."""
    FALLBACK = "fallback"
    """The cache could not be used; the pull went direct."""


@dataclass(frozen=True)
class CacheUnusable(Exception):
    """Why this pull cannot go through its registry's cache (it then goes direct)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


class PullThrough:
    """The caches of ``routes`` and what the worker knows of their health.

    ``on_outcome``: called with :class:`CacheOutcome` values, once for each pull from a
    registry that has a cache.
    """

    def __init__(
        self,
        routes: CacheRoutes,
        on_outcome: Callable[[str], None] | None = None,
        probe_timeout: float = PROBE_TIMEOUT,
        down_for: float = DOWN_FOR,
        max_down_for: float = MAX_DOWN_FOR,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._routes: Mapping[str, str] = dict(routes)
        self._on_outcome = on_outcome
        self._probe_timeout = probe_timeout
        self._down_for = down_for
        self._max_down_for = max_down_for
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until: dict[str, float] = {}
        self._skip_for: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        # The cache this thread checked last: the one its next outcome is about.
        self._checked = threading.local()

    def cache_for(self, registry: str) -> str | None:
        return self._routes.get(registry)

    def check(self, cache: str) -> None:
        """Raises :class:`CacheUnusable` if ``cache`` is known down, or does not answer its
        ``/v2/`` now, or answers it with a server error (any other answer, a login
        challenge included, counts as up)."""
        self._checked.cache = cache
        self._checked.marked = False
        with self._lock:
            until = self._down_until.get(cache, 0.0)
            skip_for = self._skip_for.get(cache, self._down_for)
        if self._clock() < until:
            raise CacheUnusable(f"cache {cache} failed a moment ago (skipped for {skip_for:g}s)")
        probe = http.client.HTTPConnection(cache, timeout=self._probe_timeout)
        try:
            probe.request("GET", "/v2/")
            status = probe.getresponse().status
        except (OSError, http.client.HTTPException) as error:
            self.mark_down(cache)
            raise CacheUnusable(f"cache {cache} does not answer ({type(error).__name__})") from None
        finally:
            probe.close()
        if status >= 500:
            self.mark_down(cache)
            raise CacheUnusable(f"cache {cache} answered its /v2/ with {status}")

    def mark_down(self, cache: str) -> None:
        """Skips ``cache`` for a while: :data:`DOWN_FOR` seconds, doubled for each failure
        since its last successful pull, at most :data:`MAX_DOWN_FOR`."""
        if getattr(self._checked, "cache", None) == cache:
            self._checked.marked = True
        with self._lock:
            failures = self._failures.get(cache, 0) + 1
            self._failures[cache] = failures
            skip_for = min(self._max_down_for, self._down_for * 2 ** min(failures - 1, 32))
            self._skip_for[cache] = skip_for
            self._down_until[cache] = self._clock() + skip_for

    def outcome(self, outcome: str) -> None:
        """Counts ``outcome`` of a pull from the registry of the cache this thread last
        checked. A pull through it forgets its failures; a fallback after it answered the
        check is one (it refused, failed or lacked the image: skipped for a while)."""
        cache: str | None = getattr(self._checked, "cache", None)
        if cache is not None:
            if outcome == CacheOutcome.CACHE:
                with self._lock:
                    self._failures.pop(cache, None)
            elif not getattr(self._checked, "marked", False):
                self.mark_down(cache)
            self._checked.cache = None
        if self._on_outcome is not None:
            self._on_outcome(outcome)
