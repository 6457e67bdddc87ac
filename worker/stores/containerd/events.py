"""containerd's image events through ``ctr events``, for the image index
(:mod:`worker.stores.image_index`)."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import threading
from collections.abc import Generator

import structlog

from worker.stores.containerd.ctr import NO_MESSAGE, QUERY_TIMEOUT, collect, kill, last_words
from worker.stores.containerd.output import event_of
from worker.stores.image_index import ImageEvents

log = structlog.get_logger("worker.containerd")

PROBE_PREFIX = "puller-probe-"
"""The start of the name of each namespace :class:`CtrImageEvents` makes (and removes) to
see that its subscription is open."""
PROBE_INTERVAL = 0.5
"""Seconds between probes, until one is seen."""
SUBSCRIBE_WAIT = 30.0
"""Seconds ``ctr events`` has to show a probe before it is given up (and started again)."""


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
                threading.Thread(target=collect, args=(process.stderr, errors), daemon=True),
                threading.Thread(target=self._probe, args=(probes, seen), daemon=True),
            ]
            deadline = threading.Timer(SUBSCRIBE_WAIT, kill, (process,))
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
                said = last_words(b"".join(errors).decode(errors="replace"))
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
            kill(process)

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
                kill(process)
                process.communicate()
                raise RuntimeError(f"ctr {arguments[0]} {arguments[1]} timed out") from None
            finally:
                self._forget(process)
        if process.returncode != 0:
            said = last_words(err.decode(errors="replace"))
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
            kill(process)
        return process

    def _forget(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.discard(process)
        kill(process)
