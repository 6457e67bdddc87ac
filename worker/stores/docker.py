"""The node's Docker Engine: with :mod:`worker.stores.registry_logins` (which reads a docker
client's logins), the only module of the worker that imports the docker SDK.

It answers two questions, "is this image here?" and "pull it", and turns every
failure into :class:`PullFailed` with an :class:`ErrorKind` and a message a
person can act on. The containerd backend is another class with the same methods
(:class:`worker.stores.contract.ImageStore`, :mod:`worker.stores.containerd`).

Registry logins come from a docker client ``config.json`` (:mod:`worker.stores.registry_logins`),
read again at every pull, and go to the engine with each pull; they never go into a
message or a log line.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from typing import Any

import docker
import requests
import structlog
import urllib3

from contract import ErrorKind, ImageReference, InvalidReference, PullFailed, parse_reference
from worker.stores.contract import ImageInfo, ImageInUse, PullProgress, StoredImage, store_name
from worker.stores.failures import cancelled, classified, interrupted
from worker.stores.image_index import ImageEvents, ImageIndex
from worker.stores.pull_through import CacheOutcome, CacheUnusable, PullThrough
from worker.stores.registry_logins import DockerConfig, RegistryLogin

log = structlog.get_logger("worker.engine")

ENGINE_API_VERSION = "auto"


class DockerEngine:
    """Talks to one Docker Engine (``docker_host``, or the SDK's default from the environment).

    ``stall_timeout``: a pull whose stream says nothing for that long is abandoned; closing
    the stream makes the engine cancel the pull. ``pull_timeout``: the most one pull may take.
    """

    def __init__(
        self,
        docker_host: str | None,
        stall_timeout: float,
        pull_timeout: float,
        inspect_timeout: float = 30.0,
        docker_config: DockerConfig | None = None,
        pull_through: PullThrough | None = None,
    ) -> None:
        """``docker_config``: where registry logins come from; by default ``DOCKER_CONFIG``'s
        ``config.json``, else ``~/.docker/config.json``, as the docker CLI looks.
        ``pull_through``: registries whose layers come through a cache in the cluster (see
        :mod:`worker.stores.pull_through`)."""
        self._docker_host = docker_host
        self._pull_through = pull_through
        self._docker_config = docker_config or DockerConfig.from_environment()
        self._stall_timeout = stall_timeout
        self._pull_timeout = pull_timeout
        self._inspect_timeout = inspect_timeout
        self._client: docker.APIClient | None = None
        self._lock = threading.Lock()
        self._open_streams: set[requests.Response] = set()
        self._stream_owner: dict[requests.Response, ImageReference] = {}
        """The image whose pull opened each stream (a cache's name pulls for the asked one)."""
        self._interrupted: set[ImageReference] = set()
        self._index = ImageIndex(DockerImageEvents(docker_host))
        self._cancelling = threading.Event()

    def describe(self) -> str:
        return self._docker_host or "the local Docker Engine (DOCKER_HOST unset)"

    def version(self) -> str:
        with self._failures_as_pull_failed(None):
            answer = self._api().version()
        return str(answer.get("Version", "unknown"))

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        """The image if the index knows the engine holds it; never asks the engine."""
        return self._index.get(store_name(image))

    def find_image(self, image: ImageReference) -> ImageInfo | None:
        """The image's id and digest if the engine has it; ``None`` if it does not.

        Answered from memory when the image index knows it, else by the engine.
        """
        return self.known_image(image) or self._inspect(image)

    def _inspect(self, image: ImageReference) -> ImageInfo | None:
        """The engine's own answer (remembered); after a pull, whose image events may not
        have reached the index yet, the only true one."""
        name = store_name(image)

        def inspect() -> ImageInfo | None:
            try:
                with self._failures_as_pull_failed(image):
                    attrs = self._api().inspect_image(name)
            except docker.errors.ImageNotFound:
                return None
            return _image_info(attrs, image)

        return self._index.looked_up(name, inspect)

    def start(self) -> None:
        """Starts following the engine's image events, so that known images are answered
        from memory."""
        self._index.start()

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        """Pulls ``image`` through the engine, streaming; raises :class:`PullFailed` (of kind
        ``cancelled`` when :meth:`interrupt` cut it)."""
        try:
            return self._pull(image, on_progress)
        except PullFailed:
            if self._take_interrupted(image):
                raise interrupted(image) from None
            raise
        finally:
            self._take_interrupted(image)

    def interrupt(self, image: ImageReference) -> None:
        """Cuts the running pull of ``image`` (its streams: the engine then cancels it and
        keeps the layers it had finished); nothing if none runs."""
        with self._lock:
            streams = [r for r, owner in self._stream_owner.items() if owner == image]
            if streams:
                self._interrupted.add(image)
        for response in streams:
            _cut(response)

    def _take_interrupted(self, image: ImageReference) -> bool:
        with self._lock:
            if image in self._interrupted:
                self._interrupted.discard(image)
                return True
            return False

    def _pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None
    ) -> ImageInfo:
        """Pulls ``image`` through the engine, streaming; raises :class:`PullFailed`.

        When ``image``'s registry has a pull-through cache, its layers are fetched through
        the cache first (never a failure: see :mod:`worker.stores.pull_through`); the pull of
        ``image`` itself then finds them here and fetches only the upstream's manifest."""
        api = self._api_or_unavailable()
        if self._cancelling.is_set():
            raise cancelled(image)
        started = time.monotonic()
        login = self._docker_config.login(image.domain)
        cache = self._pull_through.cache_for(image.domain) if self._pull_through else None
        cache_name: str | None = None
        if cache is not None:
            cache_name = self._through_cache(api, cache, image, login, started, on_progress)
        self._stream_pull(api, image, login, started, on_progress, owner=image)
        if cache_name is not None:
            self._forget_cache_name(api, cache_name)
        info = self._inspect(image)
        if info is None:
            raise PullFailed(
                ErrorKind.ENGINE_ERROR,
                f"the engine reported pulling {image} but does not list it afterwards; "
                "it may have been removed at once by another client",
            )
        return info

    def _through_cache(
        self,
        api: docker.APIClient,
        cache: str,
        image: ImageReference,
        login: RegistryLogin,
        started: float,
        on_progress: Callable[[PullProgress], None] | None,
    ) -> str | None:
        """Pulls ``image``'s layers as ``CACHE/PATH@DIGEST``, the upstream's digest; returns
        that name, or ``None`` when the cache could not be used (logged; the pull then goes
        direct). Raises :class:`PullFailed` only when the worker is cancelling."""
        pull_through = self._pull_through
        assert pull_through is not None  # noqa: S101 - the caller checked
        try:
            pull_through.check(cache)
            digest = image.digest or self._upstream_digest(api, image, login)
            through = ImageReference(cache, image.path, None, digest)
            cache_login = self._docker_config.login(cache)
            if cache_login.header is None:
                # A cache that forwards logins (puller-blob-cache) needs the upstream's; one
                # with its own login (docker-registry's proxy.username) ignores it.
                cache_login = login
            self._stream_pull(api, through, cache_login, started, on_progress, owner=image)
        except (CacheUnusable, PullFailed) as why:
            if self._cancelling.is_set() or image in self._interrupted:
                raise cancelled(image) from None
            if isinstance(why, PullFailed) and why.kind in _CACHE_DOWN_KINDS:
                pull_through.mark_down(cache)
            log.warning(
                "pull-through cache not used; pulling directly",
                image=str(image),
                cache=cache,
                reason=str(why),
            )
            pull_through.outcome(CacheOutcome.FALLBACK)
            return None
        pull_through.outcome(CacheOutcome.CACHE)
        return str(through)

    def _stream_pull(
        self,
        api: docker.APIClient,
        image: ImageReference,
        login: RegistryLogin,
        started: float,
        on_progress: Callable[[PullProgress], None] | None,
        owner: ImageReference,
    ) -> None:
        """One pull through the engine's stream, to its end; raises :class:`PullFailed`."""
        response: requests.Response | None = None
        try:
            response = self._start_pull(api, image, login, owner)
            self._follow(api, response, image, started, on_progress, login)
        except PullFailed:
            raise
        except Exception as error:
            raise self._failure(error, image, login, stream_open=response is not None) from None
        finally:
            if response is not None:
                with self._lock:
                    self._open_streams.discard(response)
                    self._stream_owner.pop(response, None)
                response.close()  # an abandoned stream makes the engine cancel the pull
        if owner in self._interrupted:
            raise cancelled(owner)  # the stream ended because it was cut

    def _upstream_digest(
        self, api: docker.APIClient, image: ImageReference, login: RegistryLogin
    ) -> str:
        """The digest the upstream registry gives ``image`` now, asked through the engine
        (its registry client, with the login a direct pull sends); raises
        :class:`CacheUnusable`."""
        headers = {} if login.header is None else {"X-Registry-Auth": login.header}
        try:
            response = api._get(  # noqa: SLF001 - inspect_distribution, with our login
                api._url("/distribution/{0}/json", store_name(image)),  # noqa: SLF001
                headers=headers,
                timeout=self._inspect_timeout,
            )
            answer = api._result(response, json=True)  # noqa: SLF001
        except docker.errors.APIError as error:
            raise CacheUnusable(
                f"the upstream's digest for {image} is unknown: {_api_error_text(error)}"
            ) from None
        except _TRANSPORT_ERRORS as error:
            raise CacheUnusable(
                f"the upstream's digest for {image} is unknown ({type(error).__name__})"
            ) from None
        descriptor = answer.get("Descriptor") if isinstance(answer, dict) else None
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not isinstance(digest, str) or ":" not in digest:
            raise CacheUnusable(f"the engine gave no digest for {image}")
        return digest

    def _forget_cache_name(self, api: docker.APIClient, name: str) -> None:
        """Removes the cache's name of an image that now has the asked one too (the image
        stays); a failure only leaves an extra name, so it is logged, not raised."""
        try:
            api.remove_image(name, noprune=True)
        except docker.errors.ImageNotFound:
            pass
        except (docker.errors.APIError, *_TRANSPORT_ERRORS) as error:
            log.warning("could not remove the cache's name", name=name, error=str(error))

    def _start_pull(
        self,
        api: docker.APIClient,
        image: ImageReference,
        login: RegistryLogin,
        owner: ImageReference,
    ) -> requests.Response:
        headers: dict[str, str] = {}
        if login.header is not None:
            headers["X-Registry-Auth"] = login.header
        # The SDK's own pull() reads the stream with no timeout at all; a stalled
        # registry would hang it forever. This is the same request with a read timeout.
        response: requests.Response = api._post(  # noqa: SLF001 - see above
            api._url("/images/create"),  # noqa: SLF001
            params={"fromImage": image.repository, "tag": image.digest or image.tag},
            headers=headers,
            stream=True,
            timeout=(self._inspect_timeout, self._stall_timeout),
        )
        with self._lock:
            self._open_streams.add(response)
            self._stream_owner[response] = owner
        try:
            api._raise_for_status(response)  # noqa: SLF001
        except docker.errors.APIError:
            response.close()
            with self._lock:
                self._open_streams.discard(response)
                self._stream_owner.pop(response, None)
            raise
        return response

    def _follow(
        self,
        api: docker.APIClient,
        response: requests.Response,
        image: ImageReference,
        started: float,
        on_progress: Callable[[PullProgress], None] | None,
        login: RegistryLogin,
    ) -> None:
        """Reads the pull's event stream to its end, raising what it reports."""
        tracker = _ProgressTracker()
        for event in _events(api, response):
            if "error" in event or "errorDetail" in event:
                message = event.get("error") or event.get("errorDetail", {}).get("message", "")
                raise classified(str(message), image, login)
            if on_progress is not None and tracker.update(event):
                on_progress(tracker.progress)
            if time.monotonic() - started > self._pull_timeout:
                raise PullFailed(
                    ErrorKind.TIMEOUT,
                    f"pulling {image} took longer than PULLER_PULL_TIMEOUT="
                    f"{self._pull_timeout:g}s; the pull was cancelled. Raise the timeout "
                    "for very large images or check the node's network.",
                )
        if self._cancelling.is_set():
            raise cancelled(image)  # the stream ended because it was cut

    def _failure(
        self, error: Exception, image: ImageReference, login: RegistryLogin, stream_open: bool
    ) -> PullFailed:
        """What an exception during a pull means for the requester; re-raises a bug."""
        if self._cancelling.is_set():
            return cancelled(image)
        if isinstance(error, docker.errors.APIError):
            return classified(_api_error_text(error), image, login)
        if not isinstance(error, _TRANSPORT_ERRORS):
            raise error
        # Silence from an engine that took the request: while it waits on the registry it
        # sends nothing, not even its response headers. A refused connection is the engine.
        silent = isinstance(
            error, requests.exceptions.ReadTimeout | urllib3.exceptions.ReadTimeoutError
        )
        if stream_open or silent:
            return PullFailed(
                ErrorKind.STALLED,
                f"pulling {image}: the engine reported no progress for "
                f"{self._stall_timeout:g}s (PULLER_STALL_TIMEOUT); the pull was cancelled. "
                f"Check that the node can reach {image.domain} ({type(error).__name__}).",
            )
        self._forget_client()
        return _engine_unavailable(self.describe(), error)

    def _api(self) -> docker.APIClient:
        with self._lock:
            if self._client is None:
                self._client = docker.APIClient(
                    base_url=self._docker_host,  # None: the SDK's default local socket
                    version=ENGINE_API_VERSION,
                    timeout=int(self._inspect_timeout),
                )
            return self._client

    def _api_or_unavailable(self) -> docker.APIClient:
        with self._failures_as_pull_failed(None):
            api = self._api()
        return api

    def _forget_client(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None

    @contextlib.contextmanager
    def _failures_as_pull_failed(self, image: ImageReference | None) -> Iterator[None]:
        """Turns the SDK's exceptions into :class:`PullFailed` for inspect and version calls."""
        try:
            yield
        except (PullFailed, docker.errors.ImageNotFound):
            raise
        except docker.errors.APIError as error:
            what = f" about {image}" if image else ""
            raise PullFailed(
                ErrorKind.ENGINE_ERROR,
                f"the engine at {self.describe()} answered an error{what}: "
                f"{_api_error_text(error)}",
            ) from None
        except (
            docker.errors.DockerException,
            requests.exceptions.RequestException,
            urllib3.exceptions.HTTPError,
            OSError,
        ) as error:
            self._forget_client()
            raise _engine_unavailable(self.describe(), error) from None

    def cancel_pulls(self) -> None:
        """Cuts every running pull's stream (the engine then cancels those pulls); each
        running and later :meth:`pull` raises :class:`PullFailed` of kind ``cancelled``."""
        self._cancelling.set()
        with self._lock:
            streams = list(self._open_streams)
        for response in streams:
            _cut(response)

    # -- pruning (worker.stores.contract.PrunableStore, used by worker.pruning) ----------------

    def images(self) -> list[StoredImage]:
        """Every image the engine lists (``docker images``, dangling ones included), with
        each one's ``LastTagTime``, which only an inspect tells."""
        with self._failures_as_pull_failed(None):
            api = self._api()
            listed = api.images()
        found: list[StoredImage] = []
        for entry in listed if isinstance(listed, list) else []:
            image_id = entry.get("Id") if isinstance(entry, dict) else None
            if not isinstance(image_id, str) or not image_id:
                continue
            try:
                with self._failures_as_pull_failed(None):
                    attrs = api.inspect_image(image_id)
            except docker.errors.ImageNotFound:
                continue  # removed since it was listed
            found.append(_stored_image(image_id, entry, attrs))
        return found

    def images_in_use(self) -> set[str]:
        """The image ids of every container, stopped and created ones included."""
        with self._failures_as_pull_failed(None):
            containers = self._api().containers(all=True)
        return {
            str(container["ImageID"])
            for container in containers
            if isinstance(container, dict) and container.get("ImageID")
        }

    def remove_image(self, image_id: str) -> bool:
        """Removes the image and all its names, never by force; ``False``: it was gone.

        The engine removes an image by id, names and all, only when its names are of one
        repository with at most one tag; otherwise it asks for force. So the other names are
        taken off first, one at a time and by name (the engine still refuses to take off an
        image's last name while a container uses it), then the image goes by id. A refusal
        because something uses it raises :class:`ImageInUse`; the names already taken off
        stay off (pruning checks containers just before, so that takes a container made in
        between).
        """
        try:
            with self._failures_as_pull_failed(None):
                api = self._api()
                references = _references(api.inspect_image(image_id))
                while not _removable_by_id(references):
                    _delete_image(api, references[0])
                    references = _references(api.inspect_image(image_id))
                _delete_image(api, image_id)
        except docker.errors.ImageNotFound:
            return False
        return True

    def data_root(self) -> str:
        """The engine's ``DockerRootDir``, as the engine sees that path."""
        with self._failures_as_pull_failed(None):
            answer = self._api().info()
        return str(answer.get("DockerRootDir") or "")

    def close(self) -> None:
        self._index.stop()
        self._forget_client()


class DockerImageEvents(ImageEvents):
    """The engine's image events (``GET /events``, images only), for the image index."""

    def __init__(self, docker_host: str | None) -> None:
        self._docker_host = docker_host
        self._lock = threading.Lock()
        self._stream: Any = None
        self._interrupted = False

    def follow(self) -> Generator[object, None, None]:
        client = docker.APIClient(base_url=self._docker_host, version="auto", timeout=30)
        try:
            stream = client.events(filters={"type": "image"}, decode=True)
            with self._lock:
                self._stream = stream
                interrupted = self._interrupted
            if interrupted:
                return
            yield "subscribed"  # the engine answered: every later event is in the stream
            yield from stream
        finally:
            with self._lock:
                stream, self._stream = self._stream, None
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
            client.close()

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


class _ProgressTracker:
    """Sums the per-layer byte counts of the engine's "Downloading" events."""

    def __init__(self) -> None:
        self._layers: dict[str, tuple[int, int]] = {}
        self.progress = PullProgress(0, 0)

    def update(self, event: dict[str, Any]) -> bool:
        layer = event.get("id")
        detail = event.get("progressDetail") or {}
        status = event.get("status", "")
        if not isinstance(layer, str):
            return False
        done, total = self._layers.get(layer, (0, 0))
        if status == "Downloading" and isinstance(detail.get("total"), int):
            done, total = int(detail.get("current", 0)), int(detail["total"])
        elif status in ("Download complete", "Already exists", "Pull complete") and total:
            done = total
        else:
            return False
        self._layers[layer] = (done, total)
        if not total:
            return False
        self.progress = PullProgress(
            done=sum(d for d, _ in self._layers.values()),
            total=sum(t for _, t in self._layers.values()),
        )
        return True


_TRANSPORT_ERRORS = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    urllib3.exceptions.HTTPError,
    OSError,
)


def _cut(response: requests.Response) -> None:
    """Shuts the stream's socket down, waking the thread blocked reading it; closing the
    response alone would leave that thread waiting for the read timeout."""
    raw = response.raw
    sockets = [
        getattr(getattr(raw, "_connection", None), "sock", None),
        getattr(
            getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None
        ),
    ]
    for sock in sockets:
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return
    with contextlib.suppress(Exception):
        response.close()


def _events(api: docker.APIClient, response: requests.Response) -> Iterator[dict[str, Any]]:
    for event in api._stream_helper(response, decode=True):  # noqa: SLF001
        if isinstance(event, dict):
            yield event


def _image_info(attrs: dict[str, Any], image: ImageReference) -> ImageInfo:
    """The image's id, and the digest of the repository that was asked for: an image held
    under several names has one repo digest per repository, and another repository's digest
    says nothing about this one."""
    return ImageInfo(
        image_id=str(attrs.get("Id", "")),
        digest=repository_digest(attrs.get("RepoDigests"), image),
    )


def repository_digest(repo_digests: object, image: ImageReference) -> str | None:
    """The digest in ``repo_digests`` (the engine's ``NAME@DIGEST`` list, names in any
    spelling) whose repository is ``image``'s; else the digest ``image`` names, if any."""
    for entry in repo_digests if isinstance(repo_digests, list) else []:
        if not isinstance(entry, str) or "@" not in entry:
            continue
        try:
            named = parse_reference(entry)
        except InvalidReference:
            continue
        if named.repository == image.repository and named.digest is not None:
            return named.digest
    return image.digest


def _stored_image(image_id: str, entry: dict[str, Any], attrs: dict[str, Any]) -> StoredImage:
    """An image from its entry in the engine's list and its inspect."""
    size = entry.get("Size", attrs.get("Size"))
    metadata = attrs.get("Metadata")
    return StoredImage(
        image_id=image_id,
        names=tuple(_names(attrs.get("RepoTags"), "<none>:<none>")),
        repo_digests=tuple(_names(attrs.get("RepoDigests"), "<none>@<none>")),
        size_bytes=size if isinstance(size, int) and size >= 0 else 0,
        created=_timestamp(attrs.get("Created")),
        last_tagged=_timestamp(metadata.get("LastTagTime") if isinstance(metadata, dict) else None),
    )


def _names(value: object, none: str) -> list[str]:
    """The strings of an engine's name list, without its placeholder for no name."""
    listed = value if isinstance(value, list) else []
    return [name for name in listed if isinstance(name, str) and name and name != none]


def _timestamp(value: object) -> float | None:
    """Seconds since the epoch from the engine's RFC 3339 time; ``None`` for Go's zero time
    (``0001-01-01T00:00:00Z``: never) and anything unreadable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.year <= 1:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _references(attrs: dict[str, Any]) -> list[str]:
    """The image's names, tags first, then digest references."""
    return _names(attrs.get("RepoTags"), "<none>:<none>") + _names(
        attrs.get("RepoDigests"), "<none>@<none>"
    )


def _removable_by_id(references: list[str]) -> bool:
    """Whether the engine removes an image with these names by id without force: all of one
    repository, with at most one tag."""
    repositories: set[str] = set()
    tags = 0
    for name in references:
        try:
            parsed = parse_reference(name)
        except InvalidReference:
            repositories.add(name)
            continue
        repositories.add(parsed.repository)
        if "@" not in name:
            tags += 1
    return len(repositories) <= 1 and tags <= 1


def _delete_image(api: docker.APIClient, name: str) -> None:
    """``DELETE /images/NAME`` without force (and pruning untagged parents, as ``docker rmi``
    does); a conflict (HTTP 409) raises :class:`ImageInUse`."""
    try:
        api.remove_image(name, force=False, noprune=False)
    except docker.errors.ImageNotFound:
        raise
    except docker.errors.APIError as error:
        if error.status_code == 409:
            raise ImageInUse(_api_error_text(error)) from None
        raise


def _api_error_text(error: docker.errors.APIError) -> str:
    explanation = getattr(error, "explanation", None)
    return str(explanation or error)


def _engine_unavailable(where: str, error: BaseException) -> PullFailed:
    return PullFailed(
        ErrorKind.ENGINE_UNAVAILABLE,
        f"cannot reach the Docker Engine at {where} ({type(error).__name__}: {error}). "
        "Check that dockerd is running on this node and that DOCKER_HOST points at it.",
    )


_CACHE_DOWN_KINDS = frozenset(
    {ErrorKind.STALLED, ErrorKind.REGISTRY_UNREACHABLE, ErrorKind.ENGINE_UNAVAILABLE}
)
"""Failures of a pull through a cache that say the cache is away: skip it for a while."""
