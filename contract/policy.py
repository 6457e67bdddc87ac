"""Which images may be asked for: the allow-list and the digest rule, the same on every side.

A worker enforces its policy on every request it takes, live or replayed; a publisher or the
HTTP API configured with the same policy refuses before anything is published, so a caller
hears ``forbidden`` at once instead of from every node.

Allowed prefixes are written in the normalised form Docker resolves names to
(``docker.io/cyberdojofoundation/``, ``ghcr.io/acme/tools/``, ``localhost:5000/``), so that
one image has one spelling: ``gcc_assert`` and ``index.docker.io/library/gcc_assert`` are
both ``docker.io/library/gcc_assert``. A prefix matches whole path components only:
``docker.io/cyberdojo`` allows ``docker.io/cyberdojo/x`` and ``docker.io/cyberdojo`` itself,
not ``docker.io/cyberdojofoundation/x``.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.errors import InvalidReference
from contract.reference import ImageReference, parse_exact

ALLOWED_IMAGES = "PULLER_ALLOWED_IMAGES"
REQUIRE_DIGEST = "PULLER_REQUIRE_DIGEST"


@dataclass(frozen=True)
class ImagePolicy:
    """``allowed``: normalised repository prefixes, empty = every image; ``require_digest``:
    only ``...@sha256:...`` references, so a tag moved on the registry cannot change what
    the nodes run."""

    allowed: tuple[str, ...] = ()
    require_digest: bool = False

    @property
    def restricts(self) -> bool:
        return bool(self.allowed) or self.require_digest

    def refusal(self, image: ImageReference) -> str | None:
        """Why ``image`` is refused, naming the rule; ``None`` when it is allowed."""
        if self.allowed and not any(_within(image.repository, p) for p in self.allowed):
            return (
                f"{image} is not in {ALLOWED_IMAGES} ({', '.join(self.allowed)}); "
                "ask whoever runs puller to allow it"
            )
        if self.require_digest and image.digest is None:
            return (
                f"{image} has no digest and {REQUIRE_DIGEST} is on: ask for it as NAME@sha256:..."
            )
        return None

    def describe(self) -> str:
        """The policy in one line, for the start-up log."""
        images = ", ".join(self.allowed) if self.allowed else "every image"
        digest = "digests only" if self.require_digest else "tags or digests"
        return f"allowed: {images}; {digest}"


def allowed_prefixes(text: str) -> tuple[str, ...]:
    """Parses a comma-separated :data:`ALLOWED_IMAGES` value; raises ``ValueError`` saying
    how to write an entry that is not a normalised prefix."""
    prefixes: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        prefixes.append(_normalised_prefix(entry))
    return tuple(prefixes)


def _normalised_prefix(entry: str) -> str:
    bare = entry.rstrip("/")
    hint = (
        f"{entry!r} is not a normalised repository prefix: write the registry host first, "
        "as Docker resolves names (docker.io/cyberdojofoundation/, "
        "docker.io/library/busybox, localhost:5000/)"
    )
    domain, slash, _ = bare.partition("/")
    if not _is_domain(domain):
        raise ValueError(hint)
    if domain != domain.lower():
        # Docker does not fold a host's case, so this would match only names spelled so.
        raise ValueError(f"{hint}: write the registry host in lowercase")
    if not slash:
        return domain  # a whole registry
    try:
        parsed = parse_exact(bare)
    except InvalidReference as error:
        raise ValueError(f"{hint}: {error}") from None
    if parsed.tag is not None or parsed.digest is not None or parsed.repository != bare:
        raise ValueError(f"{hint}: a prefix has no tag or digest")
    if domain in ("index.docker.io", "registry-1.docker.io"):
        raise ValueError(f"{hint}: Docker Hub is spelled docker.io")
    return bare


def _is_domain(text: str) -> bool:
    return "." in text or ":" in text or text == "localhost"


def _within(repository: str, prefix: str) -> bool:
    return repository == prefix or repository.startswith(prefix + "/")
