"""The image-reference grammar, and Docker's normalisation of it.

A reference is ``[domain/]path[:tag][@digest]``. :func:`parse_reference` accepts
and normalises exactly what ``docker pull`` does (the distribution project's
reference package, v0.6.0: ``ParseNormalizedNamed`` followed by ``TagNameOnly``),
so that every node and the publisher agree on one spelling:

* a reference with no ``/`` at all is a repository on Docker Hub, even when it
  looks like a host: ``localhost`` and ``example.com:5000`` are
  ``docker.io/library/localhost:latest`` and ``docker.io/library/example.com:5000``;
* otherwise the first component is a registry host when it is ``localhost``,
  contains a ``.`` or a ``:``, or has an uppercase letter; ``index.docker.io``
  is spelt ``docker.io``; with no host the domain is ``docker.io``;
* a single path component on ``docker.io`` becomes ``library/NAME``;
* no tag and no digest means the tag ``latest``; a tag and a digest are both kept.

The checks are Docker's too: lowercase path components, a tag of at most 128
ASCII word characters, ``.`` and ``-``, a digest whose algorithm Docker knows
(sha256, sha384, sha512) with exactly the right number of lowercase hex digits,
a path of at most 255 characters (counted after ``library/`` is added, without
the domain), and no bare 64-digit hex string (Docker keeps those for image IDs).
On top of that puller refuses non-strings, white space, and anything over 1024
characters. One of Docker's quirks is kept because Docker has it: a first
component such as ``my_host.com`` has a ``.`` but is no valid host, yet it is a
valid path component, so it stays in the path and the domain is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from contract.errors import InvalidReference

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255
MAX_REFERENCE_LENGTH = 1024

# The digest algorithms Docker knows, and how many hex digits each one's digests have.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

# The grammar's pieces. Character classes are spelt out: the grammar is ASCII only.
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALPHANUMERIC}(?:{_SEPARATOR}{_ALPHANUMERIC})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6_ADDRESS = r"\[[a-fA-F0-9:]+\]"
_DOMAIN_AND_PORT = rf"(?:{_DOMAIN_NAME}|{_IPV6_ADDRESS})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN_AND_PORT}/)?{_REMOTE_NAME}"

# Whole-string patterns (use ``fullmatch``), public so the conformance tests can check them.
DOMAIN_PATTERN = re.compile(_DOMAIN_AND_PORT)
"""A registry host (DNS-like name, IPv4, or bracketed IPv6) with an optional port."""
PATH_COMPONENT_PATTERN = re.compile(_PATH_COMPONENT)
"""One ``/``-separated component of a repository path."""
TAG_PATTERN = re.compile(_TAG)
"""A tag."""
DIGEST_PATTERN = re.compile(_DIGEST)
"""A digest's shape (``algorithm:hex``); whether Docker supports it is checked separately."""
NAME_PATTERN = re.compile(rf"(?:({_DOMAIN_AND_PORT})/)?({_REMOTE_NAME})")
"""A repository name; groups: domain (``None`` when absent), path."""
REFERENCE_PATTERN = re.compile(rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?")
"""A whole reference, not normalised; groups: name, tag, digest (``None`` when absent)."""
IDENTIFIER_PATTERN = re.compile(r"[a-f0-9]{64}")
"""A bare image ID, which Docker refuses as a repository name."""

# The stricter algorithm spelling of the digest library Docker uses (lowercase only).
_SUPPORTED_ALGORITHM_SPELLING = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*")
_SUPPORTED = ", ".join(DIGEST_HEX_LENGTHS)


@dataclass(frozen=True, order=True)
class ImageReference:
    """A validated, normalised image reference.

    ``domain`` is empty only in the corner case described in the module docstring
    (and for :func:`parse_exact` results without a host).
    """

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def repository(self) -> str:
        """``domain/path``: what the Engine's pull endpoint calls ``fromImage``."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        """The normalised reference, as ``str()`` gives it (worked out once)."""
        return self.repository + self._suffix()

    @property
    def familiar(self) -> str:
        """The short spelling Docker shows (``gcc_assert:93eefc6``).

        On docker.io the domain is dropped, and so is ``library/`` when what is left
        after it is a single component (``library/a/b`` keeps it, as Docker does).
        """
        if self.domain != DEFAULT_DOMAIN:
            return str(self)
        name = self.path
        official = name.removeprefix(f"{OFFICIAL_NAMESPACE}/")
        if official != name and "/" not in official:
            name = official
        return name + self._suffix()

    def _suffix(self) -> str:
        text = ""
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


PARSED_REMEMBERED = 4096
"""Valid references remembered by :func:`parse_reference`: a cluster asks for the same few
images again and again, and parsing one costs more than the rest of decoding a request."""
_parsed: dict[str, ImageReference] = {}


def parse_reference(text: object) -> ImageReference:
    """Validates and normalises ``text`` as ``docker pull`` does; raises
    :class:`InvalidReference` saying why not."""
    if type(text) is str:
        known = _parsed.get(text)
        if known is not None:
            return known
    reference = _parse_reference(text)
    if len(_parsed) >= PARSED_REMEMBERED:
        _parsed.clear()
    _parsed[str(text)] = reference
    return reference


def _parse_reference(text: object) -> ImageReference:
    text = _checked_text(text)
    if IDENTIFIER_PATTERN.fullmatch(text) is not None:
        raise InvalidReference(
            f"{text!r} is a 64-digit hexadecimal string, which Docker keeps for image IDs; "
            "it cannot be used as a repository name"
        )
    domain, remainder = _split_docker_domain(text)
    # Docker checks the path itself first: everything up to the first ':' after the
    # domain (so a digest's algorithm counts when there is no tag).
    remote = remainder.partition(":")[0]
    if remote.lower() != remote:
        path_part, at, algorithm = remote.partition("@")
        if at and path_part.lower() == path_part:
            raise InvalidReference(
                f"{text!r}: the digest algorithm {algorithm!r} must be lowercase "
                f"(supported: {_SUPPORTED})"
            )
        raise InvalidReference(
            f"{text!r}: repository names must be lowercase ({path_part!r}); only a registry "
            "host may have capitals"
        )
    reference = _parse_grammar(f"{domain}/{remainder}", text)
    if reference.tag is None and reference.digest is None:
        return ImageReference(reference.domain, reference.path, DEFAULT_TAG, None)
    return reference


def parse_exact(text: object) -> ImageReference:
    """Parses ``text`` by the grammar alone, as the distribution project's ``Parse`` does.

    Nothing is normalised: no default domain, no ``library/``, no default tag. The
    first component is a domain whenever it is a valid host and more follows, so
    ``foo/bar`` has the domain ``foo`` here. For tests and diagnostics; image names
    on the wire go through :func:`parse_reference`.
    """
    text = _checked_text(text)
    return _parse_grammar(text, text)


def split_name(text: str) -> tuple[str, str]:
    """Splits a bare repository name (no tag, no digest) into domain and path,
    by the grammar alone, as the distribution project's ``WithName`` does."""
    match = NAME_PATTERN.fullmatch(text)
    if match is None:
        raise InvalidReference(f"{text!r} is not a repository name ([HOST[:PORT]/]PATH)")
    domain, path = match.group(1) or "", match.group(2)
    _check_path_length(path, text)
    return domain, path


def _checked_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidReference(f"an image reference must be a string, not {type(text).__name__}")
    if text == "":
        raise InvalidReference("the image reference is empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(
            f"the image reference is {len(text)} characters long; at most "
            f"{MAX_REFERENCE_LENGTH} are allowed"
        )
    if any(c.isspace() for c in text):
        raise InvalidReference(f"the image reference {text!r} contains white space")
    return text


def _split_docker_domain(text: str) -> tuple[str, str]:
    """Docker's guess at the domain, made before anything is validated."""
    first, slash, rest = text.partition("/")
    if not slash:
        # One component (perhaps with a tag or digest) is always a Docker Hub name,
        # even "localhost" or "example.com:5000".
        return DEFAULT_DOMAIN, f"{OFFICIAL_NAMESPACE}/{text}"
    if first == LEGACY_DEFAULT_DOMAIN:
        domain, remote = DEFAULT_DOMAIN, rest
    elif first == "localhost" or "." in first or ":" in first or first.lower() != first:
        domain, remote = first, rest
    else:
        domain, remote = DEFAULT_DOMAIN, text
    if domain == DEFAULT_DOMAIN and "/" not in remote:
        remote = f"{OFFICIAL_NAMESPACE}/{remote}"
    return domain, remote


def _parse_grammar(candidate: str, text: str) -> ImageReference:
    """Parses ``candidate`` by the grammar; ``text`` is what the caller gave, for messages."""
    match = REFERENCE_PATTERN.fullmatch(candidate)
    if match is None:
        if REFERENCE_PATTERN.fullmatch(candidate.lower()) is not None:
            raise InvalidReference(f"{text!r}: repository names must be lowercase")
        raise InvalidReference(_explain_bad_format(text))
    name, tag, digest = match.groups()
    name_match = NAME_PATTERN.fullmatch(name)
    if name_match is None:  # pragma: no cover - the reference pattern contains the name pattern
        raise InvalidReference(_explain_bad_format(text))
    domain, path = name_match.group(1) or "", name_match.group(2)
    _check_path_length(path, text)
    if digest is not None:
        _check_digest(digest, text)
    return ImageReference(domain=domain, path=path, tag=tag, digest=digest)


def _check_path_length(path: str, text: str) -> None:
    if len(path) > MAX_NAME_LENGTH:
        raise InvalidReference(
            f"{text!r}: the repository path {path[:40]!r}... is {len(path)} characters, longer "
            f"than {MAX_NAME_LENGTH} (the registry host is not counted; library/ is)"
        )


def _check_digest(digest: str, text: str) -> None:
    """The digest library's checks, beyond the grammar's ``algorithm:hex`` shape."""
    algorithm, _, encoded = digest.partition(":")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        if _SUPPORTED_ALGORITHM_SPELLING.fullmatch(algorithm) is None:
            raise InvalidReference(
                f"{text!r}: {algorithm!r} is not a valid digest algorithm (supported, in "
                f"lowercase: {_SUPPORTED})"
            )
        raise InvalidReference(
            f"{text!r}: unsupported digest algorithm {algorithm!r} (supported: {_SUPPORTED})"
        )
    if len(encoded) != length or re.fullmatch(r"[a-f0-9]+", encoded) is None:
        raise InvalidReference(
            f"{text!r}: a {algorithm} digest has exactly {length} lowercase hex digits "
            f"(this one has {len(encoded)} characters)"
        )


def _explain_bad_format(text: str) -> str:
    """Names the piece of ``text`` that breaks the grammar, as helpfully as it can."""
    name_and_tag, at, digest = text.partition("@")
    last_slash = name_and_tag.rfind("/")
    colon = name_and_tag.find(":", last_slash + 1)
    if colon == -1:
        name, tag = name_and_tag, None
    else:
        name, tag = name_and_tag[:colon], name_and_tag[colon + 1 :]
    reason = _explain_suffixes(name, tag, digest if at else None) or _explain_name(name)
    if reason is None:
        return f"{text!r} is not a valid image reference ([HOST[:PORT]/]PATH[:TAG][@DIGEST])"
    return f"{text!r}: {reason}"


def _explain_suffixes(name: str, tag: str | None, digest: str | None) -> str | None:
    if digest is not None and DIGEST_PATTERN.fullmatch(digest) is None:
        return (
            f"{digest!r} is not a digest (expected ALGORITHM:HEX with at least 32 hex digits, "
            "e.g. sha256:<64 lowercase hex>)"
        )
    if name == "":
        return "there is a tag or digest but no repository name"
    if "/" not in name and name.startswith("["):
        return (
            "a name without '/' is a repository on Docker Hub; a registry host must be "
            "followed by /REPOSITORY"
        )
    if tag is not None and TAG_PATTERN.fullmatch(tag) is None:
        return (
            f"{tag!r} is not a valid tag (1 to 128 of ASCII letters, digits, '_', '.', '-'; "
            "not starting with '.' or '-')"
        )
    return None


def _explain_name(name: str) -> str | None:
    first, slash, rest = name.partition("/")
    components = name.split("/")
    if slash and ("." in first or ":" in first or first.lower() != first):
        if DOMAIN_PATTERN.fullmatch(first) is not None:
            components = rest.split("/")
        elif PATH_COMPONENT_PATTERN.fullmatch(first) is None:
            return (
                f"{first!r} is not a valid registry host[:port] (letters, digits and '-' in "
                "dot-separated labels, or [IPv6], then an optional numeric port)"
            )
    for component in components:
        if component == "":
            return "it has an empty path component"
        if PATH_COMPONENT_PATTERN.fullmatch(component) is None:
            if PATH_COMPONENT_PATTERN.fullmatch(component.lower()) is not None:
                return f"repository names must be lowercase ({component!r})"
            return (
                f"{component!r} is not a valid path component (lowercase letters, digits, and "
                "single '.', '_', '__' or '-' separators between them)"
            )
    return None
