"""The one registry the cache serves, and what it recently allowed.

Every upstream URL is built here from a route's validated parts (:mod:`blob_cache.routes`)
on the base URL given at start: the cache can ask its upstream and nothing else. Only
blob GETs follow redirects (registries send them to their storage); ``/v2/``, manifests
and the authorising HEADs do not.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from blob_cache.routes import Blob, Manifest, Ping

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
"""Seconds without a byte from upstream before a request (or a blob fetch) fails."""
MANIFEST_LIMIT = 4 << 20
"""The largest manifest passed on (distribution's own limit)."""
PASSED_HEADERS = (
    "Content-Type",
    "Docker-Content-Digest",
    "Docker-Distribution-API-Version",
    "WWW-Authenticate",
)
AUTH_MEMORY_SECONDS = 300.0
AUTH_MEMORY_ENTRIES = 10_000


class UpstreamUnreachable(Exception):
    """The upstream did not answer (refused, timed out, or cut the connection)."""


@dataclass(frozen=True)
class Answer:
    """The upstream's answer to a request passed on (the body read whole, bounded)."""

    status: int
    headers: dict[str, str]
    body: bytes


def upstream_base(url: str) -> str:
    """``url`` checked to be ``http[s]://HOST[:PORT]`` (no user, path, query or fragment);
    raises ``ValueError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: expected http[s]://HOST[:PORT]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: no user or password in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no path, query or fragment")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    return f"{parts.scheme}://{parts.netloc}"


class Upstream:
    """Requests to the upstream registry, one ``requests`` session per thread."""

    def __init__(self, base_url: str) -> None:
        self.base = upstream_base(base_url)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def url(self, route: Ping | Manifest | Blob) -> str:
        if isinstance(route, Ping):
            return f"{self.base}/v2/"
        if isinstance(route, Manifest):
            return f"{self.base}/v2/{route.name}/manifests/{route.reference}"
        return f"{self.base}/v2/{route.name}/blobs/{route.digest}"

    def forward(self, method: str, route: Ping | Manifest, headers: dict[str, str]) -> Answer:
        """``method`` (GET or HEAD) of ``route`` with the client's ``headers``; the answer's
        body up to :data:`MANIFEST_LIMIT` bytes (a longer one is an error)."""
        try:
            with self._session().request(
                method,
                self.url(route),
                headers=headers,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                allow_redirects=False,
                stream=True,
            ) as response:
                body = response.raw.read(MANIFEST_LIMIT + 1, decode_content=True)
                if len(body) > MANIFEST_LIMIT:
                    raise UpstreamUnreachable(
                        f"the upstream's answer is over {MANIFEST_LIMIT} bytes"
                    )
                return Answer(response.status_code, _passed(response, method == "HEAD"), body)
        except (requests.RequestException, OSError) as error:
            raise UpstreamUnreachable(_why(error)) from None

    def check_blob(self, blob: Blob, authorization: str | None) -> Answer:
        """A HEAD of ``blob`` with the client's ``authorization``: what the upstream would
        let this client see."""
        headers = {"Authorization": authorization} if authorization else {}
        try:
            response = self._session().head(
                self.url(blob),
                headers=headers,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                allow_redirects=False,
            )
        except (requests.RequestException, OSError) as error:
            raise UpstreamUnreachable(_why(error)) from None
        return Answer(response.status_code, _passed(response, head=True), b"")

    def open_blob(self, blob: Blob, authorization: str | None) -> requests.Response:
        """A streaming GET of ``blob`` on a connection of its own (redirects followed;
        ``requests`` drops the ``Authorization`` on a redirect to another host). The caller
        closes it."""
        headers = {"Authorization": authorization} if authorization else {}
        try:
            return requests.get(
                self.url(blob),
                headers=headers,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                stream=True,
            )
        except (requests.RequestException, OSError) as error:
            raise UpstreamUnreachable(_why(error)) from None


def content_length(response: requests.Response) -> int | None:
    """The response's ``Content-Length``, if it has a valid one."""
    text = response.headers.get("Content-Length", "")
    return int(text) if text.isdigit() else None


def _passed(response: requests.Response, head: bool) -> dict[str, str]:
    names = (*PASSED_HEADERS, "Content-Length") if head else PASSED_HEADERS
    return {name: value for name in names if (value := response.headers.get(name)) is not None}


def _why(error: BaseException) -> str:
    return f"upstream unreachable ({type(error).__name__})"


class AuthMemory:
    """Which (credential, repository, blob) the upstream allowed in the last ``seconds``:
    used only while the upstream cannot be asked, to serve kept blobs to clients it
    recently allowed. Keys hold a hash of the credential, never the credential."""

    def __init__(
        self,
        seconds: float = AUTH_MEMORY_SECONDS,
        entries: int = AUTH_MEMORY_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self._entries = entries
        self._clock = clock
        self._lock = threading.Lock()
        self._allowed: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    @staticmethod
    def _key(authorization: str | None, name: str, digest: str) -> tuple[str, str, str]:
        credential = hashlib.sha256((authorization or "").encode()).hexdigest()
        return (credential, name, digest)

    def remember(self, authorization: str | None, name: str, digest: str) -> None:
        key = self._key(authorization, name, digest)
        with self._lock:
            self._allowed[key] = self._clock() + self.seconds
            self._allowed.move_to_end(key)
            while len(self._allowed) > self._entries:
                self._allowed.popitem(last=False)

    def forget(self, authorization: str | None, name: str, digest: str) -> None:
        with self._lock:
            self._allowed.pop(self._key(authorization, name, digest), None)

    def recalls(self, authorization: str | None, name: str, digest: str) -> bool:
        key = self._key(authorization, name, digest)
        with self._lock:
            until = self._allowed.get(key)
            if until is None:
                return False
            if self._clock() >= until:
                del self._allowed[key]
                return False
            return True
