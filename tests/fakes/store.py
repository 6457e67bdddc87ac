"""The one in-memory image store of the unit tests.

It keeps the store contract (:mod:`worker.stores.contract`), checked by the same cases as the
Docker and containerd stores (:mod:`tests.stores.conformance`), and lets a test hold its
steps, script its failures and read what it was asked. By default any name can be pulled;
``registry`` makes it a registry of named images (with ``logins``, ``unreachable``,
``failing``, ``silent`` and ``throttled`` registries) as the conformance cases use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from contract import ErrorKind, ImageReference, PullFailed
from worker.stores.contract import ImageInfo, ImageInUse, PullProgress, StoredImage, store_name
from worker.stores.failures import cancelled, classified, interrupted
from worker.stores.registry_logins import BasicLogin, DockerConfig

STEP = 0.01
"""Seconds between the progress reports of a throttled pull."""


@dataclass(frozen=True)
class RegistryImage:
    """An image a registry serves: what a pull of it gives."""

    image_id: str
    digest: str
    size: int = 1000


@dataclass
class MemoryStore:
    stored: list[StoredImage] = field(default_factory=list)
    """What the store holds, in the order it came (dangling images too)."""
    pulled: ImageInfo | None = None
    """What a pull gives for a name not in ``pull_gives`` (nor in ``registry``); ``None``:
    an id of the name's own."""
    pull_gives: dict[str, str] = field(default_factory=dict)
    """Name -> the image id a pull of it gives."""
    root: str = "/nowhere/at/all"
    """The store's :meth:`data_root`."""
    events_lag: bool = False
    """A change reaches the memory only at :meth:`forget_index` (the store's event feed
    lags); otherwise at once."""

    # -- a registry, for the conformance cases ------------------------------------------------
    registry: dict[str, RegistryImage] | None = None
    """Name -> image: what can be pulled (others are not found); ``None``: any name."""
    docker_config: DockerConfig = field(default_factory=lambda: DockerConfig(None))
    logins: dict[str, BasicLogin] = field(default_factory=dict)
    """Registry -> the login it wants."""
    unreachable: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)
    """Registries answering 503."""
    silent: set[str] = field(default_factory=set)
    """Registries that go silent mid-layer."""
    throttled: dict[str, float] = field(default_factory=dict)
    """Registry -> bytes a second."""
    stall_timeout: float = 1.0
    pull_timeout: float = 60.0

    # -- what a test scripts --------------------------------------------------------------------
    away: threading.Event = field(default_factory=threading.Event)
    """While set, the store cannot be reached: every question raises ``engine_unavailable``."""
    failures: dict[str, list[BaseException]] = field(default_factory=dict)
    """Raised by successive pulls of a name, then it pulls."""
    gates: dict[str, threading.Event] = field(default_factory=dict)
    """A pull of a name with a gate waits for it (an interrupt or a cancel opens it)."""
    progress_steps: list[PullProgress] = field(default_factory=list)
    """Reported by every pull, once past its gate."""
    hold_at: int = 0
    """The pull of that number (1-based, every pull counted) waits for ``release``, setting
    ``held``."""
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    after_find: Callable[[], None] | None = None
    """Run once, right after the store was looked at."""
    during_pull: Callable[[], None] | None = None
    """Run once, as a pull ends (the image is held already)."""
    removal_gate: threading.Event = field(default_factory=threading.Event)
    """A removal waits for it (set from the start)."""
    removing: threading.Event = field(default_factory=threading.Event)
    refuse: dict[str, BaseException] = field(default_factory=dict)
    """Image id -> what removing it raises."""
    in_use: set[str] = field(default_factory=set)
    """Ids of images containers use."""
    in_use_later: set[str] = field(default_factory=set)
    """Ids a container uses from the second listing of containers on."""

    # -- what the store was asked ---------------------------------------------------------------
    pulls: list[str] = field(default_factory=list)
    """Each pull past its gate: the name (``away NAME``: the store was away; ``cut NAME``:
    interrupted at its gate)."""
    started: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    pull_threads: set[str] = field(default_factory=set)
    running: int = 0
    most_running: int = 0
    removed: list[str] = field(default_factory=list)
    container_listings: int = 0
    events: list[str] = field(default_factory=list)
    """``found NAME: ID``, ``pulled NAME``, ``removed ID``, in order."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    _memory: dict[str, ImageInfo] = field(default_factory=dict)
    _watching: bool = False
    _generation: int = 0
    _pulling: dict[str, int] = field(default_factory=dict)
    _cut: set[str] = field(default_factory=set)
    _cancelling: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.removal_gate.set()

    # -- steering -------------------------------------------------------------------------------

    def hold(
        self,
        name: str,
        image_id: str | None = None,
        digest: str | None = None,
        *,
        remembered: bool = False,
    ) -> None:
        """``name`` is put in the store (by another client, or before the test);
        ``remembered``: the store is watching its events and remembers it."""
        info = ImageInfo(image_id or f"sha256:{name}", digest)
        with self.lock:
            self._put(name, info)
            if remembered:
                self._watching = True
                self._memory[name] = info

    def drop(self, name: str) -> None:
        """Another client takes ``name`` off (an image left with no name goes)."""
        with self.lock:
            self._take_name(name)
            self._changed()

    def use(self, image_id: str) -> None:
        """A container is made from the image."""
        with self.lock:
            self.in_use.add(image_id)

    def forget_index(self) -> None:
        """The event feed catches up: the memory forgets everything."""
        with self.lock:
            self._memory.clear()
            self._generation += 1

    @property
    def names(self) -> dict[str, str]:
        """Name -> image id, as the store holds them now."""
        with self.lock:
            return {name: image.image_id for image in self.stored for name in image.names}

    @property
    def present(self) -> set[str]:
        return set(self.names)

    @property
    def index(self) -> dict[str, str]:
        """Name -> image id, as the store's memory has them."""
        with self.lock:
            return {name: info.image_id for name, info in self._memory.items()}

    # -- ImageStore -----------------------------------------------------------------------------

    def describe(self) -> str:
        return "an in-memory store"

    def start(self) -> None:
        with self.lock:
            self._watching = True
            self._generation += 1

    def close(self) -> None:
        pass

    def version(self) -> str:
        self._reachable()
        return "20.10.24"

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        with self.lock:
            if not self._watching or self.away.is_set():
                return None
            return self._memory.get(store_name(image))

    def find_image(self, image: ImageReference) -> ImageInfo | None:
        known = self.known_image(image)
        if known is not None:
            return known
        self._reachable()
        name = store_name(image)
        with self.lock:
            generation = self._generation
            info = self._info(name)
        self.events.append(f"found {name}: {None if info is None else info.image_id}")
        hook, self.after_find = self.after_find, None
        if hook is not None:
            hook()
        if info is not None:
            with self.lock:
                if self._watching and generation == self._generation:
                    self._memory[name] = info
        return info

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        name = store_name(image)
        with self.lock:
            number = len(self.pulls) + 1
        if number == self.hold_at:
            self.held.set()
            assert self.release.wait(10)
        with self.lock:
            self.started.append(name)
            self.pull_threads.add(threading.current_thread().name)
            if self.away.is_set():
                self.pulls.append(f"away {name}")
                raise _away()
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self._pulling[name] = self._pulling.get(name, 0) + 1
        try:
            return self._pull(image, name, on_progress)
        finally:
            with self.lock:
                self.running -= 1
                self._pulling[name] -= 1
                self._cut.discard(name)

    def cancel_pulls(self) -> None:
        self._cancelling.set()
        for gate in list(self.gates.values()):
            gate.set()

    def interrupt(self, image: ImageReference) -> None:
        name = store_name(image)
        with self.lock:
            if not self._pulling.get(name):
                return
            self.interrupted.append(name)
            self._cut.add(name)
        gate = self.gates.get(name)
        if gate is not None:
            gate.set()

    # -- PrunableStore --------------------------------------------------------------------------

    def images(self) -> list[StoredImage]:
        self._reachable()
        with self.lock:
            return list(self.stored)

    def images_in_use(self) -> set[str]:
        self._reachable()
        with self.lock:
            self.container_listings += 1
            return self._used()

    def remove_image(self, image_id: str) -> bool:
        self._reachable()
        self.removing.set()
        assert self.removal_gate.wait(10)
        if image_id in self.refuse:
            raise self.refuse[image_id]
        with self.lock:
            if image_id in self._used():
                raise ImageInUse(f"a container uses {image_id}")
            kept = [image for image in self.stored if image.image_id != image_id]
            if len(kept) == len(self.stored):
                return False
            self.stored = kept
            self.removed.append(image_id)
            self.events.append(f"removed {image_id}")
            self._changed()
        return True

    def data_root(self) -> str:
        return self.root

    # -- inside -----------------------------------------------------------------------------------

    def _pull(
        self,
        image: ImageReference,
        name: str,
        on_progress: Callable[[PullProgress], None] | None,
    ) -> ImageInfo:
        gate = self.gates.get(name)
        if gate is not None:
            assert gate.wait(10)
        with self.lock:
            cut = name in self._cut
            self.pulls.append(f"cut {name}" if cut else name)
        if cut:
            raise interrupted(image)
        if self._cancelling.is_set():
            raise cancelled(image)
        for step in self.progress_steps:
            if on_progress is not None:
                on_progress(step)
        queued = self.failures.get(name)
        if queued:
            raise queued.pop(0)
        info, size = self._fetch(image, name, on_progress)
        with self.lock:
            self._put(name, info, size)
        hook, self.during_pull = self.during_pull, None
        if hook is not None:
            hook()
        self.events.append(f"pulled {name}")
        return info

    def _fetch(
        self,
        image: ImageReference,
        name: str,
        on_progress: Callable[[PullProgress], None] | None,
    ) -> tuple[ImageInfo, int]:
        """What the registry gives for ``image`` and its size, as slowly as it gives it."""
        if self.registry is None:
            if name in self.pull_gives:
                return ImageInfo(self.pull_gives[name], None), 100
            return self.pulled or ImageInfo(f"sha256:{name}", None), 100
        domain = image.domain
        login = self.docker_config.login(domain)
        if domain in self.unreachable:
            raise classified(f"dial tcp {domain}: connect: connection refused", image, login)
        if domain in self.failing:
            raise classified("received unexpected HTTP status: 503 Service Unavailable", image)
        wanted = self.logins.get(domain)
        if wanted is not None and (login.basic is None or login.basic != wanted):
            raise classified("unauthorized: authentication required", image, login)
        served = self.registry.get(name)
        if served is None:
            raise classified(f"manifest for {name} not found: manifest unknown", image, login)
        self._download(image, name, served.size, domain, on_progress)
        return ImageInfo(served.image_id, served.digest), served.size

    def _download(
        self,
        image: ImageReference,
        name: str,
        size: int,
        domain: str,
        on_progress: Callable[[PullProgress], None] | None,
    ) -> None:
        """Reports progress up to ``size`` bytes at the registry's pace; stops when cut."""
        rate = self.throttled.get(domain)
        done = 0
        started = time.monotonic()
        silent_since: float | None = None
        while done < size:
            with self.lock:
                cut = name in self._cut
            if cut or self._cancelling.is_set():
                raise interrupted(image) if cut else cancelled(image)
            if time.monotonic() - started > self.pull_timeout:
                raise PullFailed(
                    ErrorKind.TIMEOUT,
                    f"pulling {image} took longer than PULLER_PULL_TIMEOUT "
                    f"({self.pull_timeout:g}s)",
                )
            if domain in self.silent and done >= size // 3:
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since > self.stall_timeout:
                    raise PullFailed(
                        ErrorKind.STALLED,
                        f"pulling {image}: nothing moved for {self.stall_timeout:g}s "
                        "(PULLER_STALL_TIMEOUT); the pull was cancelled",
                    )
                time.sleep(STEP)
                continue
            done = min(size, done + int(rate * STEP)) if rate else size
            if domain in self.silent:
                done = min(done, size // 3)
            if on_progress is not None:
                on_progress(PullProgress(done, size))
            if rate:
                time.sleep(STEP)

    def _reachable(self) -> None:
        if self.away.is_set():
            raise _away()

    def _used(self) -> set[str]:
        later = self.in_use_later if self.container_listings > 1 else set()
        return self.in_use | later

    def _info(self, name: str) -> ImageInfo | None:
        """The image held under ``name``, with its digest for ``name``'s repository."""
        for image in self.stored:
            if name in image.names:
                prefix = f"{_repository(name)}@"
                mine = [d.removeprefix(prefix) for d in image.repo_digests if d.startswith(prefix)]
                return ImageInfo(image.image_id, mine[0] if mine else None)
        return None

    def _put(self, name: str, info: ImageInfo, size: int = 100) -> None:
        """Holds ``info`` under ``name``, taken off any other image; an event."""
        self._take_name(name)
        digests = (f"{_repository(name)}@{info.digest}",) if info.digest else ()
        for position, image in enumerate(self.stored):
            if image.image_id == info.image_id:
                self.stored[position] = replace(
                    image,
                    names=(*image.names, name),
                    repo_digests=tuple(dict.fromkeys((*image.repo_digests, *digests))),
                )
                break
        else:
            self.stored.append(StoredImage(info.image_id, (name,), digests, size, None, None))
        self._changed()

    def _take_name(self, name: str) -> None:
        """Takes ``name`` off the image that has it; an image it was the last name of goes."""
        for position, image in enumerate(self.stored):
            if name in image.names:
                names = tuple(n for n in image.names if n != name)
                if names:
                    self.stored[position] = replace(image, names=names)
                else:
                    del self.stored[position]
                return

    def _changed(self) -> None:
        """An image event: the memory forgets everything, unless the feed lags."""
        if not self.events_lag:
            self._memory.clear()
            self._generation += 1


def _repository(name: str) -> str:
    """``HOST/PATH`` of a ``HOST/PATH:TAG`` or ``HOST/PATH@DIGEST`` name."""
    if "@" in name:
        return name.split("@", 1)[0]
    head, slash, last = name.rpartition("/")
    return f"{head}{slash}{last.split(':', 1)[0]}"


def _away() -> PullFailed:
    return PullFailed(ErrorKind.ENGINE_UNAVAILABLE, "no engine answers (the test store is away)")
