"""containerd as a node's image store (:class:`worker.stores.contract.ImageStore`), through
``ctr`` (:mod:`worker.stores.containerd.ctr`); see :mod:`worker.stores.containerd`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import structlog

from contract import ErrorKind, ImageReference, PullFailed
from worker.stores.containerd.ctr import (
    NO_MESSAGE,
    QUERY_TIMEOUT,
    Ctr,
    PasswordTerminal,
    collect,
    ctr_failure,
    ctr_login,
    kill,
    last_words,
    plain_http,
    unavailable,
)
from worker.stores.containerd.events import CtrImageEvents
from worker.stores.containerd.output import (
    DIGEST,
    INDEX_TYPES,
    ListedRef,
    PullOutput,
    container_image,
    is_id,
    listed_refs,
    listed_target,
    repository,
)
from worker.stores.containerd.platforms import Platform, node_platform, platform_manifest
from worker.stores.contract import ImageInfo, ImageInUse, PullProgress, StoredImage, store_name
from worker.stores.failures import cancelled, interrupted
from worker.stores.image_index import ImageIndex
from worker.stores.registry_logins import DockerConfig, RegistryLogin

log = structlog.get_logger("worker.containerd")

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
DEFAULT_ROOT = "/var/lib/containerd"
REMOVE_TIMEOUT = 600.0
"""Seconds ``ctr images rm --sync`` may take: it waits for containerd to collect the
content, which for a large image on a slow disk is more than a query's time."""
MAX_REMEMBERED_IDS = 10_000
"""Manifest digests whose image id the store remembers (forgotten all at once beyond)."""
WATCH_INTERVAL = 0.2
"""Seconds between looks at a running pull (timeouts, cancelling)."""
INDEX_STOP_WAIT = 5.0
"""Seconds closing the store waits for ``ctr events`` to be gone."""


class ContainerdStore:
    """The image store of a node's containerd (``address``: its socket), in ``namespace``.

    ``stall_timeout``: a pull whose bytes do not move for that long is stopped (while
    resolving or downloading; unpacking has no figures, so only ``pull_timeout`` bounds
    it). ``pull_timeout``: the most one pull may take. ``snapshotter``: where images are
    unpacked (``None``: containerd's default; it must be the one the kubelet uses).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        stall_timeout: float,
        pull_timeout: float,
        snapshotter: str | None = None,
        hosts_dir: str | None = None,
        docker_config: DockerConfig | None = None,
        root: str = DEFAULT_ROOT,
        ctr: str = "ctr",
        node: Platform | None = None,
    ) -> None:
        """``docker_config``: where registry logins come from (by default as the Docker
        Engine's: ``DOCKER_CONFIG``, else ``~/.docker``). ``root``: containerd's root
        directory as the worker sees it, for the disk figure. ``node``: the platform whose
        manifest is pulled from an image index (this machine's by default)."""
        self._platform = node or node_platform()
        self._address = address
        self._root = root
        self._docker_config = docker_config or DockerConfig.from_environment()
        self._namespace = namespace
        self._stall_timeout = stall_timeout
        self._pull_timeout = pull_timeout
        self._snapshotter = snapshotter
        self._hosts_dir = hosts_dir
        self._program = ctr
        self._ctr = Ctr(ctr, address, namespace)
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[bytes], ImageReference] = {}
        """Each running ``ctr images pull``, and the image it pulls."""
        self._interrupted: set[ImageReference] = set()
        self._cancelling = threading.Event()
        self._index = ImageIndex(CtrImageEvents(self._ctr.base, namespace), "containerd-events")
        self._target_ids: dict[str, str] = {}
        """Manifest (or index) digest → image id, as read once."""
        self._made_from: dict[str, str | None] = {}
        """Container → the image it was made from, as read once."""

    def describe(self) -> str:
        return f"containerd at {self._address} (namespace {self._namespace})"

    def start(self) -> None:
        """Starts following containerd's image events (known images are then answered from
        memory); says if ``ctr`` is not one whose output this store reads (containerd
        1.x's)."""
        self._index.start()
        try:
            said = subprocess.run(
                [self._program, "--version"],
                capture_output=True,
                timeout=QUERY_TIMEOUT,
                check=False,
            ).stdout.decode(errors="replace")
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning(
                "ctr cannot be run; every pull will fail", ctr=self._program, error=str(error)
            )
            return
        version = said.split()[-1] if said.split() else "unknown"
        if not version.lstrip("v").startswith("1."):
            log.warning(
                "this ctr is not containerd 1.x's: progress and stall detection may not work",
                ctr_version=version,
            )

    def known_image(self, image: ImageReference) -> ImageInfo | None:
        """The image if the index knows containerd holds it; never runs ``ctr``."""
        return self._index.get(store_name(image))

    def version(self) -> str:
        output = self._ctr.query("version")
        server = output.split("Server:", 1)[-1]
        found = re.search(r"Version:\s*(\S+)", server)
        return found.group(1) if found else "unknown"

    def find_image(self, image: ImageReference) -> ImageInfo | None:
        """The image's id and digest if containerd holds it under that name, else ``None``;
        from memory when the index knows it."""
        return self.known_image(image) or self._look(image)

    def _look(self, image: ImageReference) -> ImageInfo | None:
        """containerd's own answer (remembered); after a pull, whose image events may not
        have reached the index yet, the only true one."""
        name = store_name(image)

        def listed() -> ImageInfo | None:
            target = listed_target(self._ctr.query("images", "ls", f"name=={name}"), name)
            if target is None:
                return None
            media_type, digest = target
            return ImageInfo(self._config_digest(image, media_type, digest), digest)

        return self._index.looked_up(name, listed)

    def pull(
        self, image: ImageReference, on_progress: Callable[[PullProgress], None] | None = None
    ) -> ImageInfo:
        """Pulls ``image`` with ``ctr images pull``; raises :class:`PullFailed` (``stalled``,
        ``timeout``, ``cancelled``, or what ``ctr`` said, classified)."""
        if self._cancelling.is_set():
            raise cancelled(image)
        login = ctr_login(self._docker_config.login(image.domain))
        process, terminal = self._start_pull(image, login)
        with self._lock:
            self._running[process] = image
        with process:  # its pipes closed and the process reaped, whatever happens
            try:
                stopped = self._watch(process, image, on_progress, login)
            except BaseException:
                kill(process)
                raise
            finally:
                if terminal:
                    terminal.close()
                with self._lock:
                    self._running.pop(process, None)
                    was_interrupted = image in self._interrupted
                    self._interrupted.discard(image)
        if was_interrupted and process.returncode != 0:
            raise interrupted(image)
        if stopped is not None:
            raise stopped
        info = self._look(image)
        if info is None:
            raise PullFailed(
                ErrorKind.ENGINE_ERROR,
                f"ctr pulled {image}, but containerd does not list it in namespace "
                f"{self._namespace}",
            )
        return info

    def _start_pull(
        self, image: ImageReference, login: RegistryLogin
    ) -> tuple[subprocess.Popen[bytes], PasswordTerminal | None]:
        """``ctr images pull`` started, and the terminal that holds its password (the
        worker's end, to close once ``ctr`` has ended)."""
        user = ["--user", login.basic.user] if login.basic else []
        command = [
            *self._ctr.base,
            "images",
            "pull",
            *self._pull_flags(image),
            *user,
            store_name(image),
        ]
        try:
            terminal = PasswordTerminal(login.basic) if login.basic else None
        except OSError as error:
            raise PullFailed(
                ErrorKind.ENGINE_ERROR,
                f"no terminal to give ctr the password for {image.domain} through "
                f"({type(error).__name__}: {error.strerror}); is /dev/pts mounted?",
            ) from None
        try:
            process = subprocess.Popen(
                command,
                stdin=terminal.reader if terminal else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException as error:
            if terminal:
                terminal.close()
            if isinstance(error, OSError):
                raise unavailable(self._address, error) from None
            raise
        if terminal:
            terminal.handed_over()
        return process, terminal

    def interrupt(self, image: ImageReference) -> None:
        """Cuts the running pull of ``image`` (containerd keeps the layers it finished);
        nothing if none runs."""
        with self._lock:
            running = [process for process, pulling in self._running.items() if pulling == image]
            if running:
                self._interrupted.add(image)
        for process in running:
            kill(process)

    def cancel_pulls(self) -> None:
        """Stops every running pull (``ctr`` is killed; containerd keeps finished layers)."""
        self._cancelling.set()
        with self._lock:
            running = list(self._running)
        for process in running:
            kill(process)

    def close(self) -> None:
        self.cancel_pulls()
        self._index.stop(wait=INDEX_STOP_WAIT)

    # -- pruning (worker.stores.contract.PrunableStore) ----------------------------------------

    def images(self) -> list[StoredImage]:
        """Every image in the namespace: its names grouped by the image id (the config's
        digest; the CRI plugin names each image by it too). ``repo_digests``: each tag's
        repository with the manifest's digest, as a pull by digest would name it. Sizes are
        ``ctr``'s figures (the content, compressed, to a tenth of a unit); no build or tag
        time is read."""
        refs, ids = self._listing()
        grouped: dict[str, list[ListedRef]] = {}
        for ref in refs:
            grouped.setdefault(ids[ref.target], []).append(ref)
        images = []
        for image_id, named in grouped.items():
            tags = sorted(r.name for r in named if "@" not in r.name and not is_id(r))
            digests = {r.name for r in named if "@" in r.name}
            digests.update(
                f"{repository(r.name)}@{r.target}"
                for r in named
                if "@" not in r.name and not is_id(r)
            )
            size_bytes = max(r.size_bytes for r in named)
            images.append(
                StoredImage(image_id, tuple(tags), tuple(sorted(digests)), size_bytes, None, None)
            )
        return images

    def images_in_use(self) -> set[str]:
        """The ids of the images of every container in the namespace (the kubelet's pods'
        and their sandboxes', running or not): the image id the CRI plugin recorded for a
        container it made, else the image its name points at now."""
        made_from = self._containers_images()
        return _used(made_from, *self._listing())

    def remove_image(self, image_id: str) -> bool:
        """Removes every name of the image, its id last (``ctr images rm --sync``: the
        content is collected before this returns). containerd itself refuses nothing, so the
        store refuses as the Docker Engine does: :class:`ImageInUse` when a container of the
        namespace was made from the image."""
        made_from = self._containers_images()
        refs, ids = self._listing()
        names = [ref.name for ref in refs if ids[ref.target] == image_id]
        names.sort(key=lambda name: bool(DIGEST.fullmatch(name)))  # the id last
        if not names:
            return False
        if image_id in _used(made_from, refs, ids):
            raise ImageInUse(f"a container in namespace {self._namespace} uses {image_id}")
        self._ctr.query("images", "rm", "--sync", *names, timeout=REMOVE_TIMEOUT)
        return True

    def data_root(self) -> str:
        """containerd's root directory (``PULLER_CONTAINERD_ROOT``), which ``ctr`` cannot
        ask; as the worker sees it."""
        return self._root

    def _containers_images(self) -> list[str]:
        """The image each container of the namespace was made from (see
        :func:`container_image`); a container's is read once, as it never changes."""
        listed = self._ctr.query("containers", "ls", "-q").split()
        with self._lock:
            known = dict(self._made_from)
        for container in listed:
            if container in known:
                continue
            try:
                info = json.loads(self._ctr.query("containers", "info", container))
            except PullFailed as failure:
                if failure.kind is ErrorKind.ENGINE_UNAVAILABLE:
                    raise
                continue  # removed since the listing
            except ValueError:
                info = None
            known[container] = container_image(info)
        with self._lock:
            self._made_from = {c: known[c] for c in listed if c in known}
            return [image for image in self._made_from.values() if image]

    def _listing(self) -> tuple[list[ListedRef], dict[str, str]]:
        """Every name in the namespace, and the image id of each target they point at."""
        refs = listed_refs(self._ctr.query("images", "ls"))
        return refs, self._ids(refs)

    def _ids(self, refs: list[ListedRef]) -> dict[str, str]:
        """Each listed target's image id: the name the CRI plugin gives an image is its id;
        otherwise read from the manifest (and remembered: a digest's id never changes)."""
        ids = {ref.target: ref.name for ref in refs if is_id(ref)}
        for ref in refs:
            if ref.target in ids:
                continue
            with self._lock:
                known = self._target_ids.get(ref.target)
            if known is None:
                try:
                    known = self._config_digest(ref.name, ref.media_type, ref.target)
                except PullFailed as failure:
                    if failure.kind is ErrorKind.ENGINE_UNAVAILABLE:
                        raise
                    # No manifest for this platform, or an unreadable one: known by the
                    # manifest's digest, so that it can still be listed and removed.
                    known = ref.target
                with self._lock:
                    if len(self._target_ids) >= MAX_REMEMBERED_IDS:
                        self._target_ids.clear()
                    self._target_ids[ref.target] = known
            ids[ref.target] = known
        return ids

    def _pull_flags(self, image: ImageReference) -> list[str]:
        # ctr 1.6 fetches only the manifest of the platform named (without --platform: its
        # own reading of the processor, which says arm/v8 on 32-bit ARMv8)
        flags = ["--platform", str(self._platform)]
        if plain_http(image.domain):
            flags.append("--plain-http")
        if self._hosts_dir:
            flags += ["--hosts-dir", self._hosts_dir]
        if self._snapshotter:
            flags += ["--snapshotter", self._snapshotter]
        return flags

    def _config_digest(self, name: object, media_type: str, digest: str) -> str:
        """The config digest (the id) of image ``name`` (for messages), through the index
        when it is one."""
        try:
            if media_type in INDEX_TYPES:
                digest = platform_manifest(self._content(digest), self._platform)
            manifest = self._content(digest)
            config = manifest.get("config") if isinstance(manifest, dict) else None
            found = config.get("digest") if isinstance(config, dict) else None
        except ValueError as error:
            raise PullFailed(
                ErrorKind.ENGINE_ERROR,
                f"containerd holds {name}, but its manifest cannot be read ({error})",
            ) from None
        return found if isinstance(found, str) else digest

    def _content(self, digest: str) -> object:
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"{digest!r} is not a digest")
        return json.loads(self._ctr.query("content", "get", digest))

    def _watch(
        self,
        process: subprocess.Popen[bytes],
        image: ImageReference,
        on_progress: Callable[[PullProgress], None] | None,
        login: RegistryLogin,
    ) -> PullFailed | None:
        """Follows a running pull until it ends; the failure it ended with, if any."""
        reading = PullOutput()
        errors: list[bytes] = []
        assert process.stdout is not None and process.stderr is not None  # noqa: S101
        readers = [
            threading.Thread(target=reading.follow, args=(process.stdout, on_progress)),
            threading.Thread(target=collect, args=(process.stderr, errors)),
        ]
        for reader in readers:
            reader.daemon = True
            reader.start()
        started = time.monotonic()
        verdict: PullFailed | None = None
        while process.poll() is None:
            now = time.monotonic()
            if self._cancelling.is_set():
                verdict = cancelled(image)
            elif now - started > self._pull_timeout:
                verdict = PullFailed(
                    ErrorKind.TIMEOUT,
                    f"pulling {image} took longer than PULLER_PULL_TIMEOUT "
                    f"({self._pull_timeout:g}s); containerd keeps the layers it finished",
                )
            elif reading.stalled(now, self._stall_timeout):
                verdict = PullFailed(
                    ErrorKind.STALLED,
                    f"pulling {image} stalled: nothing moved for {self._stall_timeout:g}s "
                    f"(PULLER_STALL_TIMEOUT) while {reading.phase}",
                )
            if verdict is not None:
                kill(process)
                break
            time.sleep(WATCH_INTERVAL)
        process.wait()
        for reader in readers:
            reader.join(timeout=5)
        if verdict is not None or process.returncode == 0:
            return verdict
        if self._cancelling.is_set():
            return cancelled(image)  # killed by cancel_pulls() between two looks
        with self._lock:
            if image in self._interrupted:  # killed by interrupt(); pull() says so
                return PullFailed(ErrorKind.CANCELLED, "interrupted")
        said = last_words(b"".join(errors).decode(errors="replace"))
        if process.returncode < 0 and said == NO_MESSAGE:  # an OOM kill, say
            said = f"ctr was killed by {signal.Signals(-process.returncode).name}, not by puller"
        failure = ctr_failure(said, image, self._address, login)
        log.info("ctr pull failed", image=str(image), said=said, kind=failure.kind.value)
        return failure


def _used(made_from: list[str], refs: list[ListedRef], ids: dict[str, str]) -> set[str]:
    """The ids of the images containers were made from (by name, or by id)."""
    by_name = {ref.name: ref.target for ref in refs}
    used = set()
    for image in made_from:
        if image in by_name:
            used.add(ids[by_name[image]])
        elif DIGEST.fullmatch(image):
            used.add(image)  # an image id, listed or not
    return used
