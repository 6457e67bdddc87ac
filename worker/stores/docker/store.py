"""The node's Docker Engine as its image store (:class:`worker.stores.contract.ImageStore`).

It answers "is this image here?" and "pull it", and turns every failure into
:class:`PullFailed` with an :class:`ErrorKind` and a message a person can act on. It talks
to the engine through :mod:`worker.stores.docker.engine_api`.

Registry logins come from a docker client ``config.json`` (:mod:`worker.stores.registry_logins`),
read again at every pull, and go to the engine with each pull; they never go into a
message or a log line.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import structlog

from contract import ErrorKind, ImageReference, PullFailed
from worker.stores.contract import ImageInfo, ImageInUse, PullProgress, StoredImage, store_name
from worker.stores.docker.engine_api import (
    EngineApi,
    EngineError,
    EngineLost,
    EngineUnreachable,
    Stream,
)
from worker.stores.docker.records import (
    ProgressTracker,
    image_info,
    references,
    removable_by_id,
    stored_image,
)
from worker.stores.failures import cancelled, classified, interrupted
from worker.stores.image_index import ImageEvents, ImageIndex
from worker.stores.pull_through import CacheOutcome, CacheUnusable, PullThrough
from worker.stores.registry_logins import DockerConfig, RegistryLogin

log = structlog.get_logger("worker.engine")


class DockerEngine:
    """Talks to one Docker Engine (``docker_host``: ``DOCKER_HOST``; ``None``: the local socket).

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
        self._api = EngineApi(docker_host, inspect_timeout)
        self._lock = threading.Lock()
        self._streams: dict[Stream, ImageReference] = {}
        """Each running pull's stream, and the image it pulls for (a cache's name pulls for
        the asked one)."""
        self._interrupted: set[ImageReference] = set()
        self._index = ImageIndex(DockerImageEvents(self._api))
        self._cancelling = threading.Event()

    def describe(self) -> str:
        return self._docker_host or "the local Docker Engine (DOCKER_HOST unset)"

    def version(self) -> str:
        with self._asking(None):
            answer = self._api.get("/version")
        version = answer.get("Version") if isinstance(answer, dict) else None
        return str(version or "unknown")

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
            attrs = self._inspect_image(name, image)
            return None if attrs is None else image_info(attrs, image)

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
            streams = [stream for stream, owner in self._streams.items() if owner == image]
            if streams:
                self._interrupted.add(image)
        for stream in streams:
            stream.cut()

    def cancel_pulls(self) -> None:
        """Cuts every running pull's stream (the engine then cancels those pulls); each
        running and later :meth:`pull` raises :class:`PullFailed` of kind ``cancelled``."""
        self._cancelling.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.cut()

    def close(self) -> None:
        self._index.stop()

    def _take_interrupted(self, image: ImageReference) -> bool:
        with self._lock:
            if image in self._interrupted:
                self._interrupted.discard(image)
                return True
            return False

    def _was_interrupted(self, image: ImageReference) -> bool:
        with self._lock:
            return image in self._interrupted

    def _pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None
    ) -> ImageInfo:
        """When ``image``'s registry has a pull-through cache, its layers are fetched through
        the cache first (never a failure: see :mod:`worker.stores.pull_through`); the pull of
        ``image`` itself then finds them here and fetches only the upstream's manifest."""
        if self._cancelling.is_set():
            raise cancelled(image)
        started = time.monotonic()
        login = self._docker_config.login(image.domain)
        cache = self._pull_through.cache_for(image.domain) if self._pull_through else None
        cache_name: str | None = None
        if cache is not None:
            cache_name = self._through_cache(cache, image, login, started, on_progress)
        self._stream_pull(image, login, started, on_progress, owner=image)
        if cache_name is not None:
            self._forget_cache_name(cache_name)
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
            digest = image.digest or self._upstream_digest(image, login)
            through = ImageReference(cache, image.path, None, digest)
            cache_login = self._docker_config.login(cache)
            if cache_login.header is None:
                # A cache that forwards logins (puller-blob-cache) needs the upstream's; one
                # with its own login (docker-registry's proxy.username) ignores it.
                cache_login = login
            self._stream_pull(through, cache_login, started, on_progress, owner=image)
        except (CacheUnusable, PullFailed) as why:
            if self._cancelling.is_set() or self._was_interrupted(image):
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
        image: ImageReference,
        login: RegistryLogin,
        started: float,
        on_progress: Callable[[PullProgress], None] | None,
        owner: ImageReference,
    ) -> None:
        """One ``POST /images/create``, read to its end; raises :class:`PullFailed`. Its
        stream is registered before it is sent, so that a cut can reach it while the engine
        is still silent (asking the registry)."""
        params = {"fromImage": image.repository}
        if image.digest or image.tag:
            params["tag"] = image.digest or image.tag or ""
        stream = self._api.new_stream()
        with self._lock:
            self._streams[stream] = owner
        try:
            self._api.stream(
                "POST",
                "/images/create",
                params=params,
                headers={} if login.header is None else {"X-Registry-Auth": login.header},
                read_timeout=self._stall_timeout,
                opened=stream,
            )
            self._follow(stream, image, started, on_progress, login)
        except EngineError as error:
            raise self._cancelled_or(image, classified(error.message, image, login)) from None
        except (EngineUnreachable, EngineLost) as error:
            raise self._transport_failure(error, image, stream) from None
        finally:
            with self._lock:
                self._streams.pop(stream, None)
            stream.close()  # an abandoned stream makes the engine cancel the pull
        if self._was_interrupted(owner):
            raise cancelled(owner)  # the stream ended because it was cut

    def _follow(
        self,
        stream: Stream,
        image: ImageReference,
        started: float,
        on_progress: Callable[[PullProgress], None] | None,
        login: RegistryLogin,
    ) -> None:
        """Reads the pull's messages to their end, raising what they report."""
        tracker = ProgressTracker()
        for message in stream.messages():
            if "error" in message or "errorDetail" in message:
                detail = message.get("errorDetail")
                said = message.get("error") or (
                    detail.get("message", "") if isinstance(detail, dict) else ""
                )
                raise classified(str(said), image, login)
            if on_progress is not None and tracker.update(message):
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

    def _cancelled_or(self, image: ImageReference, failure: PullFailed) -> PullFailed:
        return cancelled(image) if self._cancelling.is_set() else failure

    def _transport_failure(
        self, error: EngineUnreachable | EngineLost, image: ImageReference, stream: Stream
    ) -> PullFailed:
        """What a broken or silent connection during a pull means for the requester. Silence
        from an engine that took the request is the registry's: while the engine waits on
        it, it sends nothing, not even its answer's headers. A refused connection is the
        engine."""
        if self._cancelling.is_set():
            return cancelled(image)
        silent = isinstance(error, EngineLost) and error.silent
        if stream.response is not None or silent:
            return PullFailed(
                ErrorKind.STALLED,
                f"pulling {image}: the engine reported no progress for "
                f"{self._stall_timeout:g}s (PULLER_STALL_TIMEOUT); the pull was cancelled. "
                f"Check that the node can reach {image.domain} ({error}).",
            )
        return _engine_unavailable(self.describe(), error)

    def _upstream_digest(self, image: ImageReference, login: RegistryLogin) -> str:
        """The digest the upstream registry gives ``image`` now, asked through the engine
        (its registry client, with the login a direct pull sends); raises
        :class:`CacheUnusable`."""
        headers = {} if login.header is None else {"X-Registry-Auth": login.header}
        try:
            answer = self._api.get(
                EngineApi.path("/distribution/{}/json", store_name(image)), headers=headers
            )
        except EngineError as error:
            raise CacheUnusable(
                f"the upstream's digest for {image} is unknown: {error.message}"
            ) from None
        except (EngineUnreachable, EngineLost) as error:
            raise CacheUnusable(f"the upstream's digest for {image} is unknown ({error})") from None
        descriptor = answer.get("Descriptor") if isinstance(answer, dict) else None
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not isinstance(digest, str) or ":" not in digest:
            raise CacheUnusable(f"the engine gave no digest for {image}")
        return digest

    def _forget_cache_name(self, name: str) -> None:
        """Removes the cache's name of an image that now has the asked one too (the image
        stays); a failure only leaves an extra name, so it is logged, not raised."""
        try:
            self._api.delete(EngineApi.path("/images/{}", name), {"noprune": "1"})
        except EngineError as error:
            if error.status != 404:
                log.warning("could not remove the cache's name", name=name, error=error.message)
        except (EngineUnreachable, EngineLost) as error:
            log.warning("could not remove the cache's name", name=name, error=str(error))

    def _inspect_image(self, name: str, image: ImageReference | None) -> dict[str, Any] | None:
        """``GET /images/NAME/json``; ``None`` when the engine has no such image."""
        try:
            with self._asking(image):
                attrs = self._api.get(EngineApi.path("/images/{}/json", name))
        except _NotThere:
            return None
        return attrs if isinstance(attrs, dict) else {}

    @contextlib.contextmanager
    def _asking(self, image: ImageReference | None) -> Iterator[None]:
        """Turns a question's failures into :class:`PullFailed` (an engine's 404 into
        :class:`_NotThere`)."""
        try:
            yield
        except EngineError as error:
            if error.status == 404:
                raise _NotThere from None
            what = f" about {image}" if image else ""
            raise PullFailed(
                ErrorKind.ENGINE_ERROR,
                f"the engine at {self.describe()} answered an error{what}: {error.message}",
            ) from None
        except (EngineUnreachable, EngineLost) as error:
            raise _engine_unavailable(self.describe(), error) from None

    # -- pruning (worker.stores.contract.PrunableStore, used by worker.pruning) ----------------

    def images(self) -> list[StoredImage]:
        """Every image the engine lists (``docker images``, dangling ones included), with
        each one's ``LastTagTime``, which only an inspect tells."""
        with self._asking(None):
            listed = self._api.get("/images/json")
        found: list[StoredImage] = []
        for entry in listed if isinstance(listed, list) else []:
            image_id = entry.get("Id") if isinstance(entry, dict) else None
            if not isinstance(image_id, str) or not image_id:
                continue
            attrs = self._inspect_image(image_id, None)
            if attrs is None:
                continue  # removed since it was listed
            found.append(stored_image(image_id, entry, attrs))
        return found

    def images_in_use(self) -> set[str]:
        """The image ids of every container, stopped and created ones included."""
        with self._asking(None):
            containers = self._api.get("/containers/json", {"all": "1"})
        listed = containers if isinstance(containers, list) else []
        return {
            str(container["ImageID"])
            for container in listed
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
        attrs = self._inspect_image(image_id, None)
        if attrs is None:
            return False
        names = references(attrs)
        try:
            while not removable_by_id(names):
                self._delete_image(names[0])
                attrs = self._inspect_image(image_id, None)
                if attrs is None:
                    return False
                names = references(attrs)
            self._delete_image(image_id)
        except _NotThere:
            return False
        return True

    def _delete_image(self, name: str) -> None:
        """``DELETE /images/NAME`` without force (and pruning untagged parents, as ``docker
        rmi`` does); a conflict (HTTP 409) raises :class:`ImageInUse`."""
        with self._asking(None):
            try:
                self._api.delete(EngineApi.path("/images/{}", name))
            except EngineError as error:
                if error.status == 409:
                    raise ImageInUse(error.message) from None
                raise

    def data_root(self) -> str:
        """The engine's ``DockerRootDir``, as the engine sees that path."""
        with self._asking(None):
            answer = self._api.get("/info")
        root = answer.get("DockerRootDir") if isinstance(answer, dict) else None
        return str(root or "")


class _NotThere(Exception):
    """The engine answered 404: no such image."""


class DockerImageEvents(ImageEvents):
    """The engine's image events (``GET /events``, images only), for the image index."""

    def __init__(self, api: EngineApi) -> None:
        self._api = api
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._interrupted = False

    def follow(self) -> Generator[object, None, None]:
        stream = self._api.new_stream()
        with self._lock:
            self._stream = stream
            if self._interrupted:
                stream.cut()
        try:
            self._api.stream(
                "GET",
                "/events",
                params={"filters": json.dumps({"type": ["image"]})},
                read_timeout=None,
                opened=stream,
            )
            if stream.was_cut:
                return
            yield "subscribed"  # the engine answered: every later event is in the stream
            yield from stream.messages()
        finally:
            with self._lock:
                self._stream = None
            stream.close()

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True
            stream = self._stream
        if stream is not None:
            stream.cut()


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
