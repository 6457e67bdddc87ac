"""containerd as a node's image store, through containerd's own client, ``ctr``.

A Kubernetes node that runs containerd without Docker keeps the images of its pods in
containerd's ``k8s.io`` namespace: an image pulled there is one the kubelet finds, and so
does anything that runs containers through the CRI. The worker runs ``ctr`` (installed in
its image) against the node's containerd socket:

- ``ctr images ls name==NAME``, then ``ctr content get`` of the manifest: is the image
  there, its digest and its id (the config's digest, as Docker calls an image's id);
- ``ctr images pull NAME``: the pull; its progress output is read as it comes, for
  progress messages and to notice a pull that has stopped moving (``stalled``);
- ``ctr version``: the engine's version, for the roster;
- ``ctr events``: containerd's image events, so that an image known to be there is
  answered from memory (:class:`CtrImageEvents`, :mod:`worker.stores.image_index`).

Registry logins come from the same docker client ``config.json`` as the Docker Engine's
(:mod:`worker.stores.registry_logins`): ``ctr`` is given the user name with ``--user``, and the
password through a pseudo-terminal it reads at start (``ctr`` reads a password from
nowhere else but its command line, which any process on the node may read).

Registries on 127.0.0.0/8 and ``localhost`` are pulled over plain HTTP, as the Docker
Engine does by default; anything else about registries (mirrors, certificate
authorities, plain HTTP elsewhere) is containerd's own ``hosts.toml`` configuration, in
the directory ``PULLER_CONTAINERD_HOSTS_DIR`` names.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import os
import platform
import pty
import re
import secrets
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import IO

import structlog

from contract import ErrorKind, ImageReference, PullFailed
from worker.stores.contract import ImageInfo, PullProgress, StoredImage, store_name
from worker.stores.failures import cancelled, classified, interrupted
from worker.stores.image_index import ImageEvents, ImageIndex
from worker.stores.registry_logins import BasicLogin, DockerConfig, RegistryLogin

log = structlog.get_logger("worker.containerd")

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "k8s.io"
DEFAULT_ROOT = "/var/lib/containerd"
QUERY_TIMEOUT = 30.0
"""Seconds a ``ctr`` query (not a pull) may take."""
REMOVE_TIMEOUT = 600.0
"""Seconds ``ctr images rm --sync`` may take: it waits for containerd to collect the
content, which for a large image on a slow disk is more than a query's time."""
MAX_REMEMBERED_IDS = 10_000
"""Manifest digests whose image id the store remembers (forgotten all at once beyond)."""
CRI_CONTAINER_METADATA = "io.cri-containerd.container.metadata"
"""The extension the CRI plugin keeps each of its containers' record in (containerd 1.x):
JSON, ``{"Version": "v1", "Metadata": {..., "ImageRef": "sha256:<image id>", ...}}``."""
WATCH_INTERVAL = 0.2
"""Seconds between looks at a running pull (timeouts, cancelling)."""
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)
INDEX_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
ADVICE = {
    ErrorKind.ENGINE_UNAVAILABLE: (
        "containerd was stopping; the pull is retried (PULLER_PULL_RETRIES)"
    ),
    ErrorKind.NO_SPACE: (
        "free disk space on the node (the kubelet's image garbage collection, or "
        "`crictl rmi --prune`)"
    ),
}
"""What to do, where it differs from the Docker Engine's advice."""
_UNREACHABLE = ("failed to dial", "dial unix", "code = unavailable", "failed to send write")
"""What ``ctr`` says when containerd's socket does not answer, or containerd went away
mid-call (``failed to send write``: the content store's stream, while a layer is copied);
a registry that does not answer is ``dial tcp``."""
CONNECT_TIMEOUT = "5s"
"""How long ``ctr`` tries to reach containerd's socket."""
NO_MESSAGE = "ctr exited with no message"
INDEX_STOP_WAIT = 5.0
"""Seconds closing the store waits for ``ctr events`` to be gone."""
FIRST_FRAME_WAIT = 10.0
"""The shortest stall limit before ``ctr`` prints anything (see ``PullOutput.stalled``)."""
PROBE_PREFIX = "puller-probe-"
"""The start of the name of each namespace :class:`CtrImageEvents` makes (and removes) to
see that its subscription is open."""
PROBE_INTERVAL = 0.5
"""Seconds between probes, until one is seen."""
SUBSCRIBE_WAIT = 30.0
"""Seconds ``ctr events`` has to show a probe before it is given up (and started again)."""
PASSWORD_LIMIT = 4000
"""The longest password a terminal line carries to ``ctr`` (a Linux terminal's line holds
4,095 characters)."""


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
        self._ctr = ctr
        self._lock = threading.Lock()
        self._running: dict[subprocess.Popen[bytes], ImageReference] = {}
        """Each running ``ctr images pull``, and the image it pulls."""
        self._interrupted: set[ImageReference] = set()
        self._cancelling = threading.Event()
        self._index = ImageIndex(CtrImageEvents(self._base(), namespace), "containerd-events")
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
                [self._ctr, "--version"], capture_output=True, timeout=QUERY_TIMEOUT, check=False
            ).stdout.decode(errors="replace")
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("ctr cannot be run; every pull will fail", ctr=self._ctr, error=str(error))
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
        output = self._query("version")
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
            target = listed_target(self._query("images", "ls", f"name=={name}"), name)
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
                _kill(process)
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
            *self._base(),
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
            _kill(process)

    def cancel_pulls(self) -> None:
        """Stops every running pull (``ctr`` is killed; containerd keeps finished layers)."""
        self._cancelling.set()
        with self._lock:
            running = list(self._running)
        for process in running:
            _kill(process)

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
            tags = sorted(r.name for r in named if "@" not in r.name and not _is_id(r))
            digests = {r.name for r in named if "@" in r.name}
            digests.update(
                f"{_repository(r.name)}@{r.target}"
                for r in named
                if "@" not in r.name and not _is_id(r)
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
        refs, ids = self._listing()
        by_name = {ref.name: ref.target for ref in refs}
        used = set()
        for image in made_from:
            if image in by_name:
                used.add(ids[by_name[image]])
            elif _DIGEST.fullmatch(image):
                used.add(image)  # an image id, listed or not
        return used

    def remove_image(self, image_id: str) -> bool:
        """Removes every name of the image, its id last (``ctr images rm --sync``: the
        content is collected before this returns). containerd refuses nothing, so an image
        a container uses is not protected here: pruning lists containers just before."""
        refs, ids = self._listing()
        names = [ref.name for ref in refs if ids[ref.target] == image_id]
        names.sort(key=lambda name: bool(_DIGEST.fullmatch(name)))  # the id last
        if not names:
            return False
        self._query("images", "rm", "--sync", *names, timeout=REMOVE_TIMEOUT)
        return True

    def data_root(self) -> str:
        """containerd's root directory (``PULLER_CONTAINERD_ROOT``), which ``ctr`` cannot
        ask; as the worker sees it."""
        return self._root

    def _containers_images(self) -> list[str]:
        """The image each container of the namespace was made from (see
        :func:`container_image`); a container's is read once, as it never changes."""
        listed = self._query("containers", "ls", "-q").split()
        with self._lock:
            known = dict(self._made_from)
        for container in listed:
            if container in known:
                continue
            try:
                info = json.loads(self._query("containers", "info", container))
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
        refs = listed_refs(self._query("images", "ls"))
        return refs, self._ids(refs)

    def _ids(self, refs: list[ListedRef]) -> dict[str, str]:
        """Each listed target's image id: the name the CRI plugin gives an image is its id;
        otherwise read from the manifest (and remembered: a digest's id never changes)."""
        ids = {ref.target: ref.name for ref in refs if _is_id(ref)}
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

    # -- running ctr ---------------------------------------------------------------------------

    def _base(self) -> list[str]:
        return [
            self._ctr,
            "--address",
            self._address,
            "--connect-timeout",
            CONNECT_TIMEOUT,
            "--namespace",
            self._namespace,
        ]

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

    def _query(self, *arguments: str, timeout: float = QUERY_TIMEOUT) -> str:
        """``ctr``'s output for a question; raises :class:`PullFailed` when containerd cannot
        be asked."""
        try:
            done = subprocess.run(
                [*self._base(), *arguments],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise unavailable(self._address, error) from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()
            if any(text in said.lower() for text in _UNREACHABLE):
                raise unavailable(self._address, said)
            what = f"`ctr {' '.join(arguments)}` failed: {said}"
            raise PullFailed(ErrorKind.ENGINE_ERROR, f"{what}; see containerd's log")
        return done.stdout.decode(errors="replace")

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
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"{digest!r} is not a digest")
        return json.loads(self._query("content", "get", digest))

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
            threading.Thread(target=_collect, args=(process.stderr, errors)),
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
                _kill(process)
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
        said = _last_words(b"".join(errors).decode(errors="replace"))
        if process.returncode < 0 and said == NO_MESSAGE:  # an OOM kill, say
            said = f"ctr was killed by {signal.Signals(-process.returncode).name}, not by puller"
        failure = ctr_failure(said, image, self._address, login)
        log.info("ctr pull failed", image=str(image), said=said, kind=failure.kind.value)
        return failure


# -- what ctr prints -----------------------------------------------------------------------------


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DIGEST = re.compile(r"[a-z0-9]+:[a-f0-9]{32,}")
_FINISHED = frozenset({"done", "resolved", "exists", "already exists"})
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STATUS_LINE = re.compile(r"^(?P<ref>\S+?):\s+(?P<status>[a-z][a-z ]*?)\s+\|")
_SIZES = re.compile(
    r"\|\s*(?P<done>\d+(?:\.\d+)?)\s*(?P<du>[A-Za-z]*)/(?P<total>\d+(?:\.\d+)?)\s*(?P<tu>[A-Za-z]*)\s*$"
)
"""After the bar: ``DONE/TOTAL``, each a number and a unit (``ctr`` cuts DONE to 8
characters: ``1023.9 MiB`` comes as ``1023.9 M``)."""


def size(number: str, unit: str) -> int:
    """``1.5``, ``MiB`` → bytes; an unknown unit counts as bytes."""
    return int(float(number) * _UNITS.get(unit.lower(), 1))


@dataclass
class PullOutput:
    """What ``ctr images pull`` has printed so far: a frame every 100 ms, a line per
    reference (resolving, each blob: waiting, downloading ``DONE/TOTAL``, done), then
    ``unpacking ...``. Read by one thread; the others look at the fields."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Blob → (bytes done, bytes in all), as far as the frames have said."""
    statuses: dict[str, str] = field(default_factory=dict)
    moved_at: float = field(default_factory=time.monotonic)
    """When anything last moved: a status changed, or bytes came."""
    unpacking: bool = False

    def stalled(self, now: float, limit: float) -> bool:
        """Nothing moved for ``limit`` seconds while resolving or downloading (or, before
        ``ctr``'s first frame, for ``FIRST_FRAME_WAIT`` if that is longer: reaching
        containerd has its own timeout, which says more). Never while unpacking, which
        prints no figures."""
        if self.unpacking:
            return False
        if not self.statuses:  # reaching containerd: its own timeout speaks first
            limit = max(limit, FIRST_FRAME_WAIT)
        return now - self.moved_at > limit

    @property
    def phase(self) -> str:
        if not self.statuses:
            return "starting"
        statuses = list(self.statuses.values())  # the reader thread may add to it meanwhile
        busy = sorted({s for s in statuses if s not in _FINISHED})
        return ", ".join(busy) if busy else "finishing"

    def follow(self, stream: IO[bytes], on_progress: Callable[[PullProgress], None] | None) -> None:
        """Reads ``stream`` to its end; ``on_progress`` gets the figures at the end of each
        frame in which bytes moved."""
        last: PullProgress | None = None
        for raw in stream:
            text = raw.decode(errors="replace")
            try:
                self.read_line(text)
            except Exception:  # a line it cannot read must not stop the draining
                log.exception("could not read a line of ctr's output", line=text[:200])
            if on_progress is None or not _ESCAPES.sub("", text).startswith("elapsed:"):
                continue
            progress = self.progress()
            if progress.total and progress != last:
                last = progress
                try:
                    on_progress(progress)
                except Exception:
                    log.exception("reporting progress failed")

    def read_line(self, line: str) -> bool:
        """Takes one line in; whether it said something new about bytes or statuses."""
        line = _ESCAPES.sub("", line).strip()
        if line.startswith("unpacking "):
            self.unpacking = True
            self.moved_at = time.monotonic()
            return False
        matched = _STATUS_LINE.match(line)
        if matched is None:
            return False
        reference, status = matched.group("ref"), matched.group("status")
        moved = self.statuses.get(reference) != status
        self.statuses[reference] = status
        if reference.startswith("layer-"):
            before = self.layers.get(reference, (0, 0))
            sizes = _SIZES.search(line)
            if sizes is not None:
                now = (
                    size(sizes.group("done"), sizes.group("du")),
                    size(sizes.group("total"), sizes.group("tu")),
                )
            elif status == "done":
                now = (before[1], before[1])
            else:
                now = before
            moved = moved or now[0] > before[0]
            self.layers[reference] = now
        if moved:
            self.moved_at = time.monotonic()
        return moved

    def progress(self) -> PullProgress:
        return PullProgress(
            done=sum(done for done, _ in self.layers.values()),
            total=sum(total for _, total in self.layers.values()),
        )


class CtrImageEvents(ImageEvents):
    """containerd's image events in one namespace, through ``ctr events``, for the image
    index.

    ``ctr`` says nothing when its subscription is open, and an event missed between
    starting it and that moment would leave the index wrong. So the feed makes events of
    its own and waits to see one come back: it creates a namespace with a name of its own
    (:data:`PROBE_PREFIX`) and removes it at once, again every :data:`PROBE_INTERVAL`
    seconds until one is seen. Only then does it count as subscribed. After that, every
    line that is not a namespace being created counts as an image event, including one
    it cannot read: when in doubt, memory is emptied."""

    def __init__(self, base: list[str], namespace: str) -> None:
        """``base``: ``ctr`` and its flags that reach containerd."""
        self._base = base
        self._namespace = namespace
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        """Every ``ctr`` this feed runs now: interrupting kills them all."""
        self._interrupted = threading.Event()

    def follow(self) -> Generator[object, None, None]:
        filters = [
            'topic=="/namespaces/create"',
            f'namespace=="{self._namespace}",topic~="^/images/"',
        ]
        probes: list[str] = []
        seen = threading.Event()
        errors: list[bytes] = []
        with self._ctr("events", *filters) as process:
            assert process.stdout is not None and process.stderr is not None  # noqa: S101
            helpers = [
                threading.Thread(target=_collect, args=(process.stderr, errors), daemon=True),
                threading.Thread(target=self._probe, args=(probes, seen), daemon=True),
            ]
            deadline = threading.Timer(SUBSCRIBE_WAIT, _kill, (process,))
            deadline.daemon = True
            try:
                for helper in helpers:
                    helper.start()
                deadline.start()
                for raw in process.stdout:
                    topic, name = event_of(raw.decode(errors="replace"))
                    if not seen.is_set():
                        if topic == "/namespaces/create" and name in probes:
                            seen.set()
                            deadline.cancel()
                            yield topic
                    elif topic != "/namespaces/create":
                        yield topic
                process.wait()
                helpers[0].join(1)
                if self._interrupted.is_set():
                    return
                said = _last_words(b"".join(errors).decode(errors="replace"))
                if not seen.is_set() and said == NO_MESSAGE:
                    said = f"none of its own events came within {SUBSCRIBE_WAIT:.0f} s"
                raise RuntimeError(f"ctr events ended: {said}")
            finally:
                seen.set()  # stops the probing
                deadline.cancel()
                self._forget(process)

    def interrupt(self) -> None:
        self._interrupted.set()
        with self._lock:
            running = list(self._running)
        for process in running:
            _kill(process)

    def _probe(self, probes: list[str], seen: threading.Event) -> None:
        """Makes a namespace and removes it, every :data:`PROBE_INTERVAL` until one is seen
        (or the feed ends); first removes those a worker that stopped mid-probe left
        behind (containerd refuses to remove one that is not empty)."""
        said: set[str] = set()
        with contextlib.suppress(RuntimeError, OSError):
            for name in self._run("namespaces", "ls", "-q").split():
                if name.startswith(PROBE_PREFIX):
                    with contextlib.suppress(RuntimeError, OSError):
                        self._run("namespaces", "remove", name)
        while not seen.is_set() and not self._interrupted.is_set():
            name = f"{PROBE_PREFIX}{secrets.token_hex(6)}"
            probes.append(name)
            try:
                self._run("namespaces", "create", name)
                self._run("namespaces", "remove", name)
            except (RuntimeError, OSError) as error:  # ctr events ends too if containerd is away
                if str(error) not in said:
                    said.add(str(error))
                    log.info("probing containerd's events failed", error=str(error))
            seen.wait(PROBE_INTERVAL)

    def _run(self, *arguments: str) -> str:
        with self._ctr(*arguments) as process:
            try:
                out, err = process.communicate(timeout=QUERY_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill(process)
                process.communicate()
                raise RuntimeError(f"ctr {arguments[0]} {arguments[1]} timed out") from None
            finally:
                self._forget(process)
        if process.returncode != 0:
            said = _last_words(err.decode(errors="replace"))
            raise RuntimeError(f"ctr {' '.join(arguments[:2])} failed: {said}")
        return out.decode(errors="replace")

    def _ctr(self, *arguments: str) -> subprocess.Popen[bytes]:
        """A ``ctr`` this feed runs, killed at once if the feed was interrupted."""
        process = subprocess.Popen(
            [*self._base, *arguments],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        with self._lock:
            self._running.add(process)
        if self._interrupted.is_set():
            _kill(process)
        return process

    def _forget(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.discard(process)
        _kill(process)


_EVENT = re.compile(r"\s(?P<namespace>\S+)\s(?P<topic>/\S+)(?:\s(?P<payload>.*))?$")


def event_of(line: str) -> tuple[str, str | None]:
    """The topic of a line of ``ctr events`` and the name the event is about (``""`` and
    ``None`` for a line that is not an event). A line looks like
    ``2026-12-02 14:01:39.66 +0000 UTC k8s.io /images/create {"name":"..."}``."""
    found = _EVENT.search(line.rstrip("\n"))
    if found is None:
        return "", None
    try:
        payload = json.loads(found.group("payload") or "{}")
    except ValueError:
        payload = None
    name = payload.get("name") if isinstance(payload, dict) else None
    return found.group("topic"), name if isinstance(name, str) else None


def listed_target(listing: str, name: str) -> tuple[str, str] | None:
    """From ``ctr images ls``'s table: the media type and digest ``name`` points at, if it
    is listed."""
    for ref in listed_refs(listing):
        if ref.name == name:
            return ref.media_type, ref.target
    return None


@dataclass(frozen=True)
class ListedRef:
    """One row of ``ctr images ls``: a name and the manifest (or index) it points at."""

    name: str
    media_type: str
    target: str
    size_bytes: int


def listed_refs(listing: str) -> list[ListedRef]:
    """Every row of ``ctr images ls``'s table (REF TYPE DIGEST SIZE PLATFORMS LABELS, SIZE
    as a number and a unit); a row it cannot read is left out."""
    refs = []
    for line in listing.splitlines()[1:]:
        columns = line.split()
        if len(columns) < 5 or not _DIGEST.fullmatch(columns[2]):
            continue
        try:
            size_bytes = size(columns[3], columns[4])
        except ValueError:
            size_bytes = 0
        refs.append(ListedRef(columns[0], columns[1], columns[2], size_bytes))
    return refs


def container_image(info: object) -> str | None:
    """From ``ctr containers info``: the image a container was made from. For a container
    the CRI plugin made (the kubelet's), the image id it recorded: the name the container
    was made with may since point at another image (a tag pulled again). Else that name."""
    if not isinstance(info, dict):
        return None
    extensions = info.get("Extensions")
    record = extensions.get(CRI_CONTAINER_METADATA) if isinstance(extensions, dict) else None
    value = record.get("value") if isinstance(record, dict) else None
    if isinstance(value, str):
        try:
            metadata = json.loads(base64.b64decode(value, validate=True))
        except ValueError:
            metadata = None
        inner = metadata.get("Metadata") if isinstance(metadata, dict) else None
        image_ref = inner.get("ImageRef") if isinstance(inner, dict) else None
        if isinstance(image_ref, str) and image_ref:
            return image_ref
    image = info.get("Image")
    return image if isinstance(image, str) and image else None


def _repository(name: str) -> str:
    """``HOST/PATH:TAG`` → ``HOST/PATH`` (a port's colon comes before the last slash)."""
    head, slash, last = name.rpartition("/")
    return f"{head}{slash}{last.split(':', 1)[0]}"


def _is_id(ref: ListedRef) -> bool:
    """The name the CRI plugin gives each image in its namespace: the image id itself."""
    return bool(_DIGEST.fullmatch(ref.name))


@dataclass(frozen=True)
class Platform:
    """An OCI platform (``os``, ``architecture``, ``variant``), as image indexes name them."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        """As ``ctr --platform`` takes it: ``linux/arm/v7``."""
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def normalized(self) -> Platform:
        """containerd's spelling: ``arm64`` without ``v8``, ``arm`` with ``v7`` when none is
        named, ``amd64`` without ``v1``."""
        architecture = _ARCHITECTURES.get(self.architecture, self.architecture)
        variant = (
            self.variant
            if self.variant.startswith("v") or not self.variant
            else (f"v{self.variant}")
        )
        if architecture == "arm64" and variant == "v8":
            variant = ""
        elif architecture == "arm" and not variant:
            variant = "v7"
        elif architecture == "amd64" and variant == "v1":
            variant = ""
        return Platform(self.os, architecture, variant)

    def runs(self) -> list[Platform]:
        """What this platform runs, best first, as containerd's platform matcher ranks it:
        itself, then older ARM variants (an arm64 node also runs 32-bit ARM), then 386 on
        amd64."""
        own = self.normalized()
        found = [own]
        if own.architecture == "amd64":
            found.append(Platform(own.os, "386"))
        elif own.architecture in ("arm", "arm64"):
            newest = 8 if own.architecture == "arm64" else int(own.variant[1:] or 7)
            first = newest if own.architecture == "arm64" else newest - 1
            found += [Platform(own.os, "arm", f"v{version}") for version in range(first, 4, -1)]
        return found


_ARCHITECTURES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386"}


def node_platform(machine: str = "") -> Platform:
    """This machine's platform (``machine`` as ``uname -m`` says it): the variant for ARM
    from the processor's generation. 32-bit ARM on an ARMv8 processor (``armv8l``) is
    ``arm/v7``: images are published for it; hardly any for ``arm/v8``."""
    machine = (machine or platform.machine()).lower()
    arm = re.fullmatch(r"armv(\d+)\w*", machine)
    if arm:
        return Platform("linux", "arm", f"v{min(int(arm.group(1)), 7)}")
    if re.fullmatch(r"i[3-6]86", machine):
        return Platform("linux", "386")
    if machine in ("aarch64", "arm64"):
        return Platform("linux", "arm64", "v8")
    return Platform("linux", _ARCHITECTURES.get(machine, machine))


def platform_manifest(index: object, node: Platform | None = None) -> str:
    """The digest of the manifest an image index has for the node's platform: its own, the
    variant included, else the best other one the node runs (as the kubelet chooses)."""
    node = node or node_platform()
    listed: list[tuple[Platform, str]] = []
    manifests = index.get("manifests", []) if isinstance(index, dict) else []
    for entry in manifests if isinstance(manifests, list) else []:
        named = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(named, dict):
            offered = Platform(
                str(named.get("os", "")),
                str(named.get("architecture", "")),
                str(named.get("variant", "")),
            )
            listed.append((offered.normalized(), str(entry.get("digest"))))
    for wanted in node.runs():
        for offered, digest in listed:
            if offered == wanted:
                return digest
    raise PullFailed(
        ErrorKind.ENGINE_ERROR, f"the image index names no manifest for {node} (nor one it runs)"
    )


def plain_http(domain: str | None) -> bool:
    """Registries the Docker Engine pulls from over plain HTTP with no configuration:
    ``localhost`` and loopback addresses, any port."""
    if not domain:
        return False
    host = domain[1:].split("]", 1)[0] if domain.startswith("[") else domain.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _last_words(stderr: str) -> str:
    """``ctr``'s own error (its last ``ctr: ...`` line), else the last line it wrote."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ctr: "):
            return line[len("ctr: ") :]
    return lines[-1] if lines else NO_MESSAGE


def _collect(stream: IO[bytes], into: list[bytes]) -> None:
    for chunk in stream:
        into.append(chunk)
        if len(into) > 200:  # ctr's info lines, retried hosts: the end is what matters
            del into[:100]


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)


def ctr_failure(
    said: str, image: ImageReference, address: str, login: RegistryLogin | None = None
) -> PullFailed:
    """What ``ctr``'s last words mean. Between ``ctr`` and containerd everything is gRPC
    (``code = Unavailable`` when containerd goes away); between ``ctr`` and the
    registry, HTTP. ``login``: what the pull gave ``ctr`` to log in with."""
    lowered = said.lower()
    if any(text in lowered for text in _UNREACHABLE):
        return unavailable(address, said)
    failure = classified(said, image, login, engine="containerd", advice=ADVICE, basic_only=True)
    if failure.kind is ErrorKind.NOT_FOUND and "failed to resolve reference" not in lowered:
        # containerd's own "not found" (a snapshot, a blob): not the image's absence
        return PullFailed(
            ErrorKind.ENGINE_ERROR,
            f"pulling {image} failed: {said}; see the node's containerd log",
        )
    return failure


def unavailable(address: str, error: object) -> PullFailed:
    return PullFailed(
        ErrorKind.ENGINE_UNAVAILABLE,
        f"cannot reach containerd at {address} with ctr ({error}). Check that "
        "containerd runs on this node, that its socket is mounted into the worker "
        "(CONTAINERD_ADDRESS), and that ctr is installed",
    )


def ctr_login(login: RegistryLogin) -> RegistryLogin:
    """``login`` as ``ctr`` can use it: no user name and password (``basic``), with the
    reason in ``problem``, when ``ctr`` would misread them (it cuts ``--user`` at the first
    colon; a terminal line ends at a line break, and holds 4,095 characters)."""
    if login.basic is None:
        return dataclasses.replace(login, problem=login.basic_problem)
    user, password = login.basic.user, login.basic.password
    problem = None
    if ":" in user:
        problem = f"the user name for {login.registry} has a colon, which ctr cannot send"
    elif any(_is_control(c) for c in user):
        problem = f"the user name for {login.registry} has a control character"
    elif any(_is_control(c) for c in password):
        # A terminal edits a line as it is typed (^U erases it, DEL a character, ^D ends
        # it): ctr would read another password than the one given.
        problem = (
            f"the password for {login.registry} has a control character (a line break, "
            "a tab, DEL), which a terminal line cannot carry to ctr as it is"
        )
    elif not _utf8(user) or not _utf8(password):
        problem = f"the login for {login.registry} is not valid text (UTF-8)"
    elif len(password.encode()) > PASSWORD_LIMIT:
        problem = (
            f"the password for {login.registry} is longer than {PASSWORD_LIMIT} bytes, "
            "more than ctr can read"
        )
    if problem is None:
        return login
    return dataclasses.replace(login, header=None, basic=None, problem=problem)


class PasswordTerminal:
    """A pseudo-terminal with ``login``'s password typed into it, for ``ctr``'s standard
    input (``login`` has passed :func:`ctr_login`).

    ``ctr images pull --user USER`` reads the password from a terminal before it starts
    (it prints ``Password:`` first). Echo is off from the start, so the password never
    comes back out of the terminal; it is in the terminal's buffer, which the worker and
    that ``ctr`` alone hold, never on a command line or in an environment."""

    def __init__(self, login: BasicLogin) -> None:
        self._writer, self.reader = pty.openpty()
        try:
            modes = termios.tcgetattr(self.reader)
            modes[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(self.reader, termios.TCSANOW, modes)
            os.write(self._writer, login.password.encode() + b"\n")
        except BaseException:
            self.close()
            raise

    def handed_over(self) -> None:
        """``ctr`` has its own copy of the reading end: the worker's is closed."""
        _close_fd(self.reader)
        self.reader = -1

    def close(self) -> None:
        _close_fd(self.reader)
        _close_fd(self._writer)
        self.reader = self._writer = -1


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_control(character: str) -> bool:
    return ord(character) < 0x20 or ord(character) == 0x7F


def _close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
