"""Reading the Docker Engine's answers: an image's inspect (its id, the digest of a
repository, its names and times) and the progress messages of a pull."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from contract import ImageReference, InvalidReference, parse_reference
from worker.stores.contract import ImageInfo, PullProgress, StoredImage


class ProgressTracker:
    """Sums the per-layer byte counts of the engine's "Downloading" messages."""

    def __init__(self) -> None:
        self._layers: dict[str, tuple[int, int]] = {}
        self.progress = PullProgress(0, 0)

    def update(self, message: dict[str, Any]) -> bool:
        layer = message.get("id")
        detail = message.get("progressDetail") or {}
        status = message.get("status", "")
        if not isinstance(layer, str) or not isinstance(detail, dict):
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


def image_info(attrs: dict[str, Any], image: ImageReference) -> ImageInfo:
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


def stored_image(image_id: str, entry: dict[str, Any], attrs: dict[str, Any]) -> StoredImage:
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


def references(attrs: dict[str, Any]) -> list[str]:
    """The image's names, tags first, then digest references."""
    return _names(attrs.get("RepoTags"), "<none>:<none>") + _names(
        attrs.get("RepoDigests"), "<none>@<none>"
    )


def removable_by_id(references: list[str]) -> bool:
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
