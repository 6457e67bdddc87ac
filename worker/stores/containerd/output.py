"""Reading what ``ctr`` prints: its tables (``images ls``), a container's record, the lines
of ``ctr events``, and the frames of ``ctr images pull`` (progress, and whether it moves)."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import structlog

from worker.stores.contract import PullProgress

log = structlog.get_logger("worker.containerd")

CRI_CONTAINER_METADATA = "io.cri-containerd.container.metadata"
"""The extension the CRI plugin keeps each of its containers' record in (containerd 1.x):
JSON, ``{"Version": "v1", "Metadata": {..., "ImageRef": "sha256:<image id>", ...}}``."""
INDEX_TYPES = (
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
)
DIGEST = re.compile(r"[a-z0-9]+:[a-f0-9]{32,}")
"""A content digest, as ``ctr`` prints one (and as the CRI plugin names an image by its id)."""
FIRST_FRAME_WAIT = 10.0
"""The shortest stall limit before ``ctr`` prints anything (see ``PullOutput.stalled``)."""


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
        if len(columns) < 5 or not DIGEST.fullmatch(columns[2]):
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


def repository(name: str) -> str:
    """``HOST/PATH:TAG`` → ``HOST/PATH`` (a port's colon comes before the last slash)."""
    head, slash, last = name.rpartition("/")
    return f"{head}{slash}{last.split(':', 1)[0]}"


def is_id(ref: ListedRef) -> bool:
    """The name the CRI plugin gives each image in its namespace: the image id itself."""
    return bool(DIGEST.fullmatch(ref.name))


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
