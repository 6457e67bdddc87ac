"""The image-reference grammar, as the distribution project defines it.

A reference is ``[domain/]path[:tag][@digest]``. Parsing normalises it the way
the Docker Engine does, so that every node and the publisher agree on one
spelling: no domain means ``docker.io``; a single path component on docker.io
means ``library/NAME``; no tag and no digest means ``latest``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from contract.errors import InvalidReference

DEFAULT_DOMAIN = "docker.io"
OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255
MAX_REFERENCE_LENGTH = 1024

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, order=True)
class ImageReference:
    """A validated, normalised image reference."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """``domain/path``: what the Engine's pull endpoint calls ``fromImage``."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def familiar(self) -> str:
        """The short spelling people type (``gcc_assert:93eefc6``)."""
        text = str(self)
        if self.domain == DEFAULT_DOMAIN:
            text = text.removeprefix(f"{DEFAULT_DOMAIN}/").removeprefix(f"{OFFICIAL_NAMESPACE}/")
        return text


def parse_reference(text: object) -> ImageReference:
    """Validates and normalises ``text``; raises :class:`InvalidReference` saying why."""
    if not isinstance(text, str):
        raise InvalidReference(f"an image reference must be a string, not {type(text).__name__}")
    if text == "":
        raise InvalidReference("the image reference is empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(
            f"the image reference is {len(text)} characters long; at most "
            f"{MAX_REFERENCE_LENGTH} are allowed"
        )
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"the image reference {text!r} contains white space")

    remainder, digest = _split_digest(text)
    name, tag = _split_tag(remainder)
    domain, path = _split_domain(name)

    components = path.split("/")
    for component in components:
        if component == "":
            raise InvalidReference(f"{text!r} has an empty path component")
        if _PATH_COMPONENT.fullmatch(component) is None:
            if _PATH_COMPONENT.fullmatch(component.lower()) is not None:
                raise InvalidReference(
                    f"{text!r}: repository names must be lowercase ({component!r})"
                )
            raise InvalidReference(
                f"{text!r}: {component!r} is not a valid path component (lowercase letters, "
                "digits, and single '.', '_', '__' or '-' separators between them)"
            )
    if domain == DEFAULT_DOMAIN and len(components) == 1:
        path = f"{OFFICIAL_NAMESPACE}/{path}"
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise InvalidReference(
            f"{text!r}: the repository name is longer than {MAX_NAME_LENGTH} characters"
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest)


def _split_digest(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    remainder, _, digest = text.partition("@")
    if _DIGEST.fullmatch(digest) is None:
        raise InvalidReference(
            f"{text!r}: {digest!r} is not a digest (expected ALGORITHM:HEX, e.g. sha256:<64 hex>)"
        )
    algorithm, _, hex_part = digest.partition(":")
    if algorithm == "sha256" and _SHA256_HEX.fullmatch(hex_part) is None:
        raise InvalidReference(f"{text!r}: a sha256 digest has exactly 64 lowercase hex digits")
    if remainder == "":
        raise InvalidReference(f"{text!r} has a digest but no repository name")
    return remainder, digest


def _split_tag(text: str) -> tuple[str, str | None]:
    # A ':' after the last '/' starts a tag; one before it belongs to a domain's port.
    last_slash = text.rfind("/")
    colon = text.find(":", last_slash + 1)
    if colon == -1:
        return text, None
    name, tag = text[:colon], text[colon + 1 :]
    if _TAG.fullmatch(tag) is None:
        raise InvalidReference(
            f"{text!r}: {tag!r} is not a valid tag (1 to 128 of letters, digits, '_', '.', '-'; "
            "not starting with '.' or '-')"
        )
    if name == "":
        raise InvalidReference(f"{text!r} has a tag but no repository name")
    return name, tag


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        if _DOMAIN.fullmatch(first) is None:
            raise InvalidReference(f"{name!r}: {first!r} is not a valid registry host[:port]")
        return first, rest
    return DEFAULT_DOMAIN, name
