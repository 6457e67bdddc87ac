"""Test vectors for the image-reference parser, taken from Docker's own parser.

Every record below is a case from the table-driven tests of
github.com/distribution/reference at tag v0.6.0 (the package ``docker pull`` uses),
restated as data: the input, what the peer expects, and ``source``, the file and
line of that case in v0.6.0. Expected values are the peer's, translated to
puller's semantics, which are ``ParseNormalizedNamed`` followed by ``TagNameOnly``
(a name with neither tag nor digest gets the tag ``latest``). Where the peer only
says that an input is accepted, ``note`` says so and the normalised spelling was
worked out by hand from the peer's rules (normalize.go).

Record kinds:

* :class:`Normalized`: what :func:`contract.parse_reference` must give.
* :class:`Exact`: what the grammar alone gives, with no normalisation (the peer's
  ``Parse``), checked against :func:`contract.reference.parse_exact`.
* :class:`Canonical`: whether an input is already in its normalised spelling (the
  peer's ``ParseNamed``).
* :class:`NameSplit`: how a bare name splits into domain and path (``WithName``).
* :class:`Compose`: a name, tag and digest put together (``WithTag``/``WithDigest``).
* :class:`Match`: whether one piece of the grammar matches a string whole (the
  peer's regexp tests), with the captured groups where the peer states them.

Left out on purpose:

* reference_test.go:107-110, a case the peer itself has commented out (it says
  ``Uppercase/lowercase:tag`` is wrongly accepted with ``Uppercase`` as the domain;
  puller accepts it the same way, see the regression tests).
* The patterns of normalize_test.go TestMatch/TestMatchError (``FamiliarMatch``, a
  glob over the familiar form, which puller does not have); their references are
  kept as :class:`Normalized` records.
* TestSerialization's JSON round trip (only its parse results are kept),
  TestReferenceSorting (sort_test.go) and the fuzz and benchmark files, which
  state no parse results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Error kinds: which check refuses the input.
FORMAT = "format"  # the grammar does not match
LOWERCASE = "lowercase"  # the repository path (or a digest algorithm) has capitals
IDENTIFIER = "identifier"  # a bare 64-digit hex string, reserved for image IDs
TOO_LONG = "too long"  # the path is over 255 characters
EMPTY = "empty"
DIGEST_UNSUPPORTED = "unsupported digest"  # an algorithm Docker does not know
DIGEST_INVALID = "invalid digest"  # a known algorithm with the wrong number or case of digits

VALID_ONLY = "the peer states only that this is accepted; the spelling follows its rules"

Pattern = Literal["domain", "name", "reference", "identifier", "tag", "digest"]


@dataclass(frozen=True)
class Normalized:
    """``parse_reference(text)``: its ``str`` is ``expected``, or it fails with ``error``."""

    source: str
    text: str
    expected: str | None = None
    domain: str | None = None
    path: str | None = None
    familiar_name: str | None = None  # the familiar form without tag or digest
    familiar: str | None = None  # the familiar form with them
    error: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Exact:
    """The grammar alone: ``text`` parses to ``name`` (domain/path as written), ``domain``,
    ``tag`` and ``digest``, and prints back as ``text``; or it fails with ``error``."""

    source: str
    text: str
    name: str | None = None
    domain: str = ""
    tag: str | None = None
    digest: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Canonical:
    """Whether name-only ``text`` is already normalised; its domain and path when it is."""

    source: str
    text: str
    canonical: bool
    domain: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class NameSplit:
    """A bare name split by the grammar alone into ``domain`` and ``path``, or ``error``."""

    source: str
    text: str
    domain: str | None = None
    path: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Compose:
    """``name`` with ``tag`` and ``digest`` added prints as ``combined``."""

    source: str
    name: str
    combined: str
    tag: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Match:
    """Whether ``pattern`` matches all of ``text``; ``groups`` as the peer states them
    (``""`` for a group that took no part), or ``None`` when it states none."""

    source: str
    pattern: Pattern
    text: str
    match: bool
    groups: tuple[str, ...] | None = None


_F64 = "f" * 64
_F128 = "f" * 128
_HEX_BE = "be178c0543eb17f5f3043021c9e5fcf30285e557a4fc309cce97ff9ca6182912"
_HEX_DB = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
_HEX_E6 = "e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582"
_HEX_86 = "86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
_HEX_1A = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"
_HEX_39 = "1234567890098765432112345667890098765"
_SONG = "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev"
_LONG_NAMESPACE = "_".join(
    ["this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255"] * 4
)


def _n(line: int) -> str:
    return f"normalize_test.go:{line}"


def _r(line: int) -> str:
    return f"reference_test.go:{line}"


def _x(line: int) -> str:
    return f"regexp_test.go:{line}"


def _valid(line: int, text: str, expected: str) -> Normalized:
    return Normalized(_n(line), text, expected, note=VALID_ONLY)


def _invalid(line: int, text: str, error: str) -> Normalized:
    return Normalized(_n(line), text, error=error)


# normalize_test.go TestValidateReferenceName and TestValidateRemoteName: accepted or not.
_VALIDATE_NAMES: list[Normalized] = [
    _valid(13, "docker/docker", "docker.io/docker/docker:latest"),
    _valid(14, "library/debian", "docker.io/library/debian:latest"),
    _valid(15, "debian", "docker.io/library/debian:latest"),
    _valid(16, "localhost/library/debian", "localhost/library/debian:latest"),
    _valid(17, "localhost/debian", "localhost/debian:latest"),
    _valid(18, "LOCALDOMAIN/library/debian", "LOCALDOMAIN/library/debian:latest"),
    _valid(19, "LOCALDOMAIN/debian", "LOCALDOMAIN/debian:latest"),
    _valid(20, "docker.io/docker/docker", "docker.io/docker/docker:latest"),
    _valid(21, "docker.io/library/debian", "docker.io/library/debian:latest"),
    _valid(22, "docker.io/debian", "docker.io/library/debian:latest"),
    _valid(23, "index.docker.io/docker/docker", "docker.io/docker/docker:latest"),
    _valid(24, "index.docker.io/library/debian", "docker.io/library/debian:latest"),
    _valid(25, "index.docker.io/debian", "docker.io/library/debian:latest"),
    _valid(26, "127.0.0.1:5000/docker/docker", "127.0.0.1:5000/docker/docker:latest"),
    _valid(27, "127.0.0.1:5000/library/debian", "127.0.0.1:5000/library/debian:latest"),
    _valid(28, "127.0.0.1:5000/debian", "127.0.0.1:5000/debian:latest"),
    _valid(29, "192.168.0.1", "docker.io/library/192.168.0.1:latest"),
    _valid(30, "192.168.0.1:80", "docker.io/library/192.168.0.1:80"),
    _valid(31, "192.168.0.1:8/debian", "192.168.0.1:8/debian:latest"),
    _valid(32, "192.168.0.2:25000/debian", "192.168.0.2:25000/debian:latest"),
    _valid(33, _SONG, f"docker.io/library/{_SONG}:latest"),
    _valid(34, "[fc00::1]:5000/docker", "[fc00::1]:5000/docker:latest"),
    _valid(35, "[fc00::1]:5000/docker/docker", "[fc00::1]:5000/docker/docker:latest"),
    _valid(
        36,
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest",
    ),
    _valid(41, f"docker.io/{_HEX_1A}", f"docker.io/library/{_HEX_1A}:latest"),
    _valid(42, "Docker/docker", "Docker/docker:latest"),
    _valid(43, "DOCKER/docker", "DOCKER/docker:latest"),
    _invalid(46, "https://github.com/docker/docker", FORMAT),
    _invalid(47, "docker/Docker", LOWERCASE),
    _invalid(48, "-docker", FORMAT),
    _invalid(49, "-docker/docker", FORMAT),
    _invalid(50, "-docker.io/docker/docker", FORMAT),
    _invalid(51, "docker///docker", FORMAT),
    _invalid(52, "docker.io/docker/Docker", LOWERCASE),
    _invalid(53, "docker.io/docker///docker", FORMAT),
    _invalid(54, "[fc00::1]", FORMAT),
    _invalid(55, "[fc00::1]:5000", FORMAT),
    _invalid(56, "fc00::1:5000/debian", FORMAT),
    _invalid(57, "[fe80::1%eth0]:5000/debian", FORMAT),
    _invalid(58, "[2001:db8:3:4::192.0.2.33]:5000/debian", FORMAT),
    _invalid(59, _HEX_1A, IDENTIFIER),
    _valid(81, "docker/docker", "docker.io/docker/docker:latest"),
    _valid(84, _SONG, f"docker.io/library/{_SONG}:latest"),
    _valid(87, "docker-rules/docker", "docker.io/docker-rules/docker:latest"),
    _valid(90, "docker---rules/docker", "docker.io/docker---rules/docker:latest"),
    _valid(93, "doc/docker", "docker.io/doc/docker:latest"),
    _valid(96, "d/docker", "docker.io/d/docker:latest"),
    _valid(97, "jess/t", "docker.io/jess/t:latest"),
    _valid(100, "dock__er/docker", "docker.io/dock__er/docker:latest"),
    _invalid(111, "docker/Docker", LOWERCASE),
    _invalid(114, "docker///docker", FORMAT),
    _invalid(117, _HEX_1A, IDENTIFIER),
    _invalid(120, "-docker/docker", FORMAT),
    _invalid(121, "docker-/docker", FORMAT),
    _invalid(122, "-docker-/docker", FORMAT),
    _invalid(125, "____/____", FORMAT),
    _invalid(127, "_docker/_docker", FORMAT),
    _invalid(130, "dock..er/docker", FORMAT),
    _invalid(131, "dock_.er/docker", FORMAT),
    _invalid(132, "dock-.er/docker", FORMAT),
    _invalid(135, "docker/", FORMAT),
    _invalid(138, f"{_LONG_NAMESPACE}/docker", TOO_LONG),
]


def _info(
    lines: tuple[int, ...], texts: tuple[str, ...], full: str, familiar: str, path: str
) -> list[Normalized]:
    domain = full.removesuffix(f"/{path}")
    return [
        Normalized(
            _n(line),
            text,
            f"{full}:latest",
            domain=domain,
            path=path,
            familiar_name=familiar,
        )
        for line, text in zip(lines, texts, strict=True)
    ]


# normalize_test.go TestParseRepositoryInfo: each case's familiar, full and (where given)
# ambiguous spelling must all parse to the same full name, domain, path and familiar name.
_REPOSITORY_INFO: list[Normalized] = [
    *_info(
        (156, 157, 158),
        ("localhost/fooo",) * 3,
        "localhost/fooo",
        "localhost/fooo",
        "fooo",
    ),
    *_info(
        (163, 164, 165),
        ("localhost/fooo/bar",) * 3,
        "localhost/fooo/bar",
        "localhost/fooo/bar",
        "fooo/bar",
    ),
    *_info(
        (170, 171, 172),
        ("LOCALDOMAIN/fooo",) * 3,
        "LOCALDOMAIN/fooo",
        "LOCALDOMAIN/fooo",
        "fooo",
    ),
    *_info(
        (177, 178, 179),
        ("LOCALDOMAIN/fooo/bar",) * 3,
        "LOCALDOMAIN/fooo/bar",
        "LOCALDOMAIN/fooo/bar",
        "fooo/bar",
    ),
    *_info(
        (184, 185, 186),
        ("fooo/bar", "docker.io/fooo/bar", "index.docker.io/fooo/bar"),
        "docker.io/fooo/bar",
        "fooo/bar",
        "fooo/bar",
    ),
    *_info(
        (191, 192, 193),
        ("ubuntu", "docker.io/library/ubuntu", "library/ubuntu"),
        "docker.io/library/ubuntu",
        "ubuntu",
        "library/ubuntu",
    ),
    *_info(
        (198, 199),
        ("nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu"),
        "docker.io/nonlibrary/ubuntu",
        "nonlibrary/ubuntu",
        "nonlibrary/ubuntu",
    ),
    *_info(
        (205, 206),
        ("other/library", "docker.io/other/library"),
        "docker.io/other/library",
        "other/library",
        "other/library",
    ),
    *_info(
        (212, 213),
        ("127.0.0.1:8000/private/moonbase",) * 2,
        "127.0.0.1:8000/private/moonbase",
        "127.0.0.1:8000/private/moonbase",
        "private/moonbase",
    ),
    *_info(
        (219, 220),
        ("127.0.0.1:8000/privatebase",) * 2,
        "127.0.0.1:8000/privatebase",
        "127.0.0.1:8000/privatebase",
        "privatebase",
    ),
    *_info(
        (226, 227),
        ("example.com/private/moonbase",) * 2,
        "example.com/private/moonbase",
        "example.com/private/moonbase",
        "private/moonbase",
    ),
    *_info(
        (233, 234),
        ("example.com/privatebase",) * 2,
        "example.com/privatebase",
        "example.com/privatebase",
        "privatebase",
    ),
    *_info(
        (240, 241),
        ("example.com:8000/private/moonbase",) * 2,
        "example.com:8000/private/moonbase",
        "example.com:8000/private/moonbase",
        "private/moonbase",
    ),
    *_info(
        (247, 248),
        ("example.com:8000/privatebasee",) * 2,
        "example.com:8000/privatebasee",
        "example.com:8000/privatebasee",
        "privatebasee",
    ),
    *_info(
        (254, 255, 256),
        (
            "ubuntu-12.04-base",
            "docker.io/library/ubuntu-12.04-base",
            "index.docker.io/library/ubuntu-12.04-base",
        ),
        "docker.io/library/ubuntu-12.04-base",
        "ubuntu-12.04-base",
        "library/ubuntu-12.04-base",
    ),
    *_info(
        (261, 262, 263),
        ("foo", "docker.io/library/foo", "docker.io/foo"),
        "docker.io/library/foo",
        "foo",
        "library/foo",
    ),
    *_info(
        (268, 269),
        ("library/foo/bar", "docker.io/library/foo/bar"),
        "docker.io/library/foo/bar",
        "library/foo/bar",
        "library/foo/bar",
    ),
    *_info(
        (275, 276),
        ("store/foo/bar", "docker.io/store/foo/bar"),
        "docker.io/store/foo/bar",
        "store/foo/bar",
        "store/foo/bar",
    ),
    *_info((282, 283), ("Foo/bar",) * 2, "Foo/bar", "Foo/bar", "bar"),
    *_info((289, 290), ("FOO/bar",) * 2, "FOO/bar", "FOO/bar", "bar"),
]

_ANY = "ParseAnyReference reads this as an image ID; ParseNormalizedNamed, which docker pull uses, "

# normalize_test.go: TestParseReferenceWithTagAndDigest, TestInvalidReferenceComponents,
# TestParseAnyReference, TestNormalizedSplitHostname, the references of TestMatch, and
# TestParseDockerRef.
_NORMALIZE_OTHERS: list[Normalized] = [
    Normalized(
        _n(338),
        f"busybox:latest@sha256:{_HEX_86}",
        f"docker.io/library/busybox:latest@sha256:{_HEX_86}",
        familiar=f"busybox:latest@sha256:{_HEX_86}",
    ),
    _invalid(360, "-foo", FORMAT),
    Normalized(_n(363), "busybox", "docker.io/library/busybox:latest"),
    # TestParseAnyReference: Equivalent is ParseNormalizedNamed's spelling; TagNameOnly
    # adds ":latest" to those with neither tag nor digest.
    Normalized(_n(409), "redis", "docker.io/library/redis:latest"),
    Normalized(_n(413), "redis:latest", "docker.io/library/redis:latest"),
    Normalized(_n(417), "docker.io/library/redis:latest", "docker.io/library/redis:latest"),
    Normalized(_n(421), f"redis@sha256:{_HEX_DB}", f"docker.io/library/redis@sha256:{_HEX_DB}"),
    Normalized(
        _n(425),
        f"docker.io/library/redis@sha256:{_HEX_DB}",
        f"docker.io/library/redis@sha256:{_HEX_DB}",
    ),
    Normalized(_n(429), "dmcgowan/myapp", "docker.io/dmcgowan/myapp:latest"),
    Normalized(_n(433), "dmcgowan/myapp:latest", "docker.io/dmcgowan/myapp:latest"),
    Normalized(_n(437), "docker.io/mcgowan/myapp:latest", "docker.io/mcgowan/myapp:latest"),
    Normalized(
        _n(441),
        f"dmcgowan/myapp@sha256:{_HEX_DB}",
        f"docker.io/dmcgowan/myapp@sha256:{_HEX_DB}",
    ),
    Normalized(
        _n(445),
        f"docker.io/dmcgowan/myapp@sha256:{_HEX_DB}",
        f"docker.io/dmcgowan/myapp@sha256:{_HEX_DB}",
    ),
    Normalized(_n(449), _HEX_DB, error=IDENTIFIER, note=_ANY + "refuses it"),
    Normalized(
        _n(454),
        f"sha256:{_HEX_DB}",
        f"docker.io/library/sha256:{_HEX_DB}",
        note=_ANY + "reads a name 'sha256' with a 64-character tag (no '/', so Docker Hub)",
    ),
    Normalized(_n(459), _HEX_DB[:63], f"docker.io/library/{_HEX_DB[:63]}:latest"),
    Normalized(_n(463), "dbcc1", "docker.io/library/dbcc1:latest"),
    # TestNormalizedSplitHostname: domain and path.
    Normalized(_n(504), "test.com/foo", domain="test.com", path="foo"),
    Normalized(_n(509), "test_com/foo", domain="docker.io", path="test_com/foo"),
    Normalized(_n(514), "docker/migrator", domain="docker.io", path="docker/migrator"),
    Normalized(_n(519), "test.com:8080/foo", domain="test.com:8080", path="foo"),
    Normalized(_n(524), "test-com:8080/foo", domain="test-com:8080", path="foo"),
    Normalized(_n(529), "foo", domain="docker.io", path="library/foo"),
    Normalized(_n(534), "xn--n3h.com/foo", domain="xn--n3h.com", path="foo"),
    Normalized(_n(539), "xn--n3h.com:18080/foo", domain="xn--n3h.com:18080", path="foo"),
    Normalized(_n(544), "docker.io/foo", domain="docker.io", path="library/foo"),
    Normalized(_n(549), "docker.io/library/foo", domain="docker.io", path="library/foo"),
    Normalized(_n(554), "docker.io/library/foo/bar", domain="docker.io", path="library/foo/bar"),
    # TestMatch: only the references (the glob patterns are not puller's); the familiar
    # forms at 628 and 638 follow from the exact patterns matching them.
    _valid(598, "foo", "docker.io/library/foo:latest"),
    _valid(603, "foo/any/bat", "docker.io/foo/any/bat:latest"),
    _valid(608, "foo/a/bar", "docker.io/foo/a/bar:latest"),
    _valid(613, "foo/b/baz", "docker.io/foo/b/baz:latest"),
    _valid(618, "foo/c/baz:tag", "docker.io/foo/c/baz:tag"),
    _valid(623, "foo/c/baz:tag", "docker.io/foo/c/baz:tag"),
    Normalized(_n(628), "foo/c/baz:tag", "docker.io/foo/c/baz:tag", familiar="foo/c/baz:tag"),
    _valid(633, "example.com/foo/c/baz:tag", "example.com/foo/c/baz:tag"),
    Normalized(
        _n(638),
        "example.com/foo/c/baz:tag",
        "example.com/foo/c/baz:tag",
        familiar_name="example.com/foo/c/baz",
    ),
    # TestParseDockerRef.
    Normalized(_n(671), "busybox", "docker.io/library/busybox:latest"),
    Normalized(_n(676), "busybox:latest", "docker.io/library/busybox:latest"),
    Normalized(_n(681), f"busybox@sha256:{_HEX_E6}", f"docker.io/library/busybox@sha256:{_HEX_E6}"),
    Normalized(_n(686), "library/busybox", "docker.io/library/busybox:latest"),
    Normalized(_n(691), "docker.io/busybox", "docker.io/library/busybox:latest"),
    Normalized(_n(696), "docker.io/library/busybox", "docker.io/library/busybox:latest"),
    Normalized(_n(701), "docker.io/busybox:latest", "docker.io/library/busybox:latest"),
    Normalized(_n(706), "library/busybox:latest", "docker.io/library/busybox:latest"),
    Normalized(_n(711), "docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
    Normalized(_n(716), "gcr.io/library/busybox", "gcr.io/library/busybox:latest"),
    Normalized(
        _n(721),
        f"gcr.io/library/busybox:latest@sha256:{_HEX_E6}",
        f"gcr.io/library/busybox:latest@sha256:{_HEX_E6}",
        note="ParseDockerRef then drops the tag; ParseNormalizedNamed keeps both, as puller does",
    ),
]

NORMALIZED: list[Normalized] = [*_VALIDATE_NAMES, *_REPOSITORY_INFO, *_NORMALIZE_OTHERS]


# reference_test.go TestReferenceParse, and the parse results of TestSerialization.
EXACT: list[Exact] = [
    Exact(_r(33), "test_com", "test_com"),
    Exact(_r(37), "test.com:tag", "test.com", tag="tag"),
    Exact(_r(42), "test.com:5000", "test.com", tag="5000"),
    Exact(_r(47), "test.com/repo:tag", "test.com/repo", "test.com", tag="tag"),
    Exact(_r(53), "test:5000/repo", "test:5000/repo", "test:5000"),
    Exact(_r(58), "test:5000/repo:tag", "test:5000/repo", "test:5000", tag="tag"),
    Exact(
        _r(64),
        f"test:5000/repo@sha256:{_F64}",
        "test:5000/repo",
        "test:5000",
        digest=f"sha256:{_F64}",
    ),
    Exact(
        _r(70),
        f"test:5000/repo:tag@sha256:{_F64}",
        "test:5000/repo",
        "test:5000",
        tag="tag",
        digest=f"sha256:{_F64}",
    ),
    Exact(_r(77), "test:5000/repo", "test:5000/repo", "test:5000"),
    Exact(_r(82), "", error=EMPTY),
    Exact(_r(86), ":justtag", error=FORMAT),
    Exact(_r(90), f"@sha256:{_F64}", error=FORMAT),
    Exact(_r(94), "repo@sha256:" + "f" * 34, error=DIGEST_INVALID),
    Exact(_r(98), f"validname@invaliddigest:{_F64}", error=DIGEST_UNSUPPORTED),
    Exact(_r(102), "Uppercase:tag", error=LOWERCASE),
    Exact(_r(112), "test:5000/Uppercase/lowercase:tag", error=LOWERCASE),
    Exact(_r(116), "lowercase:Uppercase", "lowercase", tag="Uppercase"),
    Exact(_r(121), "domain/" + "a" * 256 + ":tag", error=TOO_LONG),
    Exact(
        _r(125),
        "a/" * 127 + "a:tag-puts-this-over-max",
        "a/" * 127 + "a",
        "a",
        tag="tag-puts-this-over-max",
    ),
    Exact(_r(131), "aa/asdf$$^/aa", error=FORMAT),
    Exact(
        _r(135),
        "sub-dom1.foo.com/bar/baz/quux",
        "sub-dom1.foo.com/bar/baz/quux",
        "sub-dom1.foo.com",
    ),
    Exact(
        _r(140),
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        "sub-dom1.foo.com/bar/baz/quux",
        "sub-dom1.foo.com",
        tag="some-long-tag",
    ),
    Exact(
        _r(146),
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io/test.example.com/my-app",
        "b.gcr.io",
        tag="test.example.com",
    ),
    Exact(
        _r(152),
        "xn--n3h.com/myimage:xn--n3h.com",
        "xn--n3h.com/myimage",
        "xn--n3h.com",
        tag="xn--n3h.com",
    ),
    Exact(
        _r(158),
        f"xn--7o8h.com/myimage:xn--7o8h.com@sha512:{_F128}",
        "xn--7o8h.com/myimage",
        "xn--7o8h.com",
        tag="xn--7o8h.com",
        digest=f"sha512:{_F128}",
    ),
    Exact(_r(165), "foo_bar.com:8080", "foo_bar.com", tag="8080"),
    Exact(_r(170), "foo/foo_bar.com:8080", "foo/foo_bar.com", "foo", tag="8080"),
    Exact(_r(176), "192.168.1.1", "192.168.1.1"),
    Exact(_r(180), "192.168.1.1:tag", "192.168.1.1", tag="tag"),
    Exact(_r(185), "192.168.1.1:5000", "192.168.1.1", tag="5000"),
    Exact(_r(190), "192.168.1.1/repo", "192.168.1.1/repo", "192.168.1.1"),
    Exact(_r(195), "192.168.1.1:5000/repo", "192.168.1.1:5000/repo", "192.168.1.1:5000"),
    Exact(
        _r(200),
        "192.168.1.1:5000/repo:5050",
        "192.168.1.1:5000/repo",
        "192.168.1.1:5000",
        tag="5050",
    ),
    Exact(_r(206), "[2001:db8::1]", error=FORMAT),
    Exact(_r(210), "[2001:db8::1]:5000", error=FORMAT),
    Exact(_r(214), "[2001:db8::1]:tag", error=FORMAT),
    Exact(_r(218), "[2001:db8::1]/repo", "[2001:db8::1]/repo", "[2001:db8::1]"),
    Exact(
        _r(223),
        "[2001:db8:1:2:3:4:5:6]/repo:tag",
        "[2001:db8:1:2:3:4:5:6]/repo",
        "[2001:db8:1:2:3:4:5:6]",
        tag="tag",
    ),
    Exact(_r(229), "[2001:db8::1]:5000/repo", "[2001:db8::1]:5000/repo", "[2001:db8::1]:5000"),
    Exact(
        _r(234),
        "[2001:db8::1]:5000/repo:tag",
        "[2001:db8::1]:5000/repo",
        "[2001:db8::1]:5000",
        tag="tag",
    ),
    Exact(
        _r(240),
        f"[2001:db8::1]:5000/repo@sha256:{_F64}",
        "[2001:db8::1]:5000/repo",
        "[2001:db8::1]:5000",
        digest=f"sha256:{_F64}",
    ),
    Exact(
        _r(246),
        f"[2001:db8::1]:5000/repo:tag@sha256:{_F64}",
        "[2001:db8::1]:5000/repo",
        "[2001:db8::1]:5000",
        tag="tag",
        digest=f"sha256:{_F64}",
    ),
    Exact(_r(253), "[2001:db8::]:5000/repo", "[2001:db8::]:5000/repo", "[2001:db8::]:5000"),
    Exact(_r(258), "[::1]:5000/repo", "[::1]:5000/repo", "[::1]:5000"),
    Exact(_r(263), "[fe80::1%eth0]:5000/repo", error=FORMAT),
    Exact(_r(267), "[fe80::1%@invalidzone]:5000/repo", error=FORMAT),
    Exact(
        _r(271),
        "example.com/" + "a" * 255 + ":tag",
        "example.com/" + "a" * 255,
        "example.com",
        tag="tag",
    ),
    # TestSerialization (an empty value, then three that parse).
    Exact(_r(458), "", error=EMPTY),
    Exact(_r(463), "example.com:8000/named", "example.com:8000/named", "example.com:8000"),
    Exact(
        _r(468),
        "example.com:8000/named:tagged",
        "example.com:8000/named",
        "example.com:8000",
        tag="tagged",
    ),
    Exact(
        _r(474),
        "other.com/named@sha256:1234567890098765432112345667890098765432112345667890098765432112",
        "other.com/named",
        "other.com",
        digest="sha256:1234567890098765432112345667890098765432112345667890098765432112",
    ),
]

# reference_test.go TestParseNamed.
CANONICAL: list[Canonical] = [
    Canonical(_r(697), "test.com/foo", True, "test.com", "foo"),
    Canonical(_r(702), "test:8080/foo", True, "test:8080", "foo"),
    Canonical(_r(707), "test_com/foo", False),
    Canonical(_r(711), "test.com", False),
    Canonical(_r(715), "foo", False),
    Canonical(_r(719), "library/foo", False),
    Canonical(_r(723), "docker.io/library/foo", True, "docker.io", "library/foo"),
    Canonical(_r(729), "docker.io/foo", False),
]

# reference_test.go TestWithNameFailure and TestDomainAndPath.
NAME_SPLITS: list[NameSplit] = [
    NameSplit(_r(346), "", error=FORMAT),
    NameSplit(_r(350), ":justtag", error=FORMAT),
    NameSplit(_r(354), f"@sha256:{_F64}", error=FORMAT),
    NameSplit(_r(358), f"validname@invaliddigest:{_F64}", error=FORMAT),
    NameSplit(_r(362), "example.com/repo:tag", error=FORMAT),
    NameSplit(_r(366), "example.com/" + "a" * 256, error=TOO_LONG),
    NameSplit(_r(370), "aa/asdf$$^/aa", error=FORMAT),
    NameSplit(_r(394), "test.com/foo", "test.com", "foo"),
    NameSplit(_r(399), "test_com/foo", "", "test_com/foo"),
    NameSplit(_r(404), "test:8080/foo", "test:8080", "foo"),
    NameSplit(_r(409), "test.com:8080/foo", "test.com:8080", "foo"),
    NameSplit(_r(414), "test-com:8080/foo", "test-com:8080", "foo"),
    NameSplit(_r(419), "xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo"),
]

# reference_test.go TestWithTag and TestWithDigest (the digests there are checked
# against the grammar's shape only, so 39 hex digits pass).
COMPOSED: list[Compose] = [
    Compose(_r(579), "test.com/foo", "test.com/foo:tag", tag="tag"),
    Compose(_r(584), "foo", "foo:tag2", tag="tag2"),
    Compose(_r(589), "test.com:8000/foo", "test.com:8000/foo:tag4", tag="tag4"),
    Compose(_r(594), "test.com:8000/foo", "test.com:8000/foo:TAG5", tag="TAG5"),
    Compose(
        _r(599),
        "test.com:8000/foo",
        f"test.com:8000/foo:TAG5@sha256:{_HEX_39}",
        tag="TAG5",
        digest=f"sha256:{_HEX_39}",
    ),
    Compose(_r(641), "test.com/foo", f"test.com/foo@sha256:{_HEX_39}", digest=f"sha256:{_HEX_39}"),
    Compose(_r(646), "foo", f"foo@sha256:{_HEX_39}", digest=f"sha256:{_HEX_39}"),
    Compose(
        _r(651),
        "test.com:8000/foo",
        f"test.com:8000/foo@sha256:{_HEX_39}",
        digest=f"sha256:{_HEX_39}",
    ),
    Compose(
        _r(656),
        "test.com:8000/foo",
        f"test.com:8000/foo:latest@sha256:{_HEX_39}",
        tag="latest",
        digest=f"sha256:{_HEX_39}",
    ),
]


def _domain(line: int, text: str, match: bool) -> Match:
    return Match(_x(line), "domain", text, match)


def _name(line: int, text: str, *groups: str) -> Match:
    """A name the pattern matches, with (domain, path) when given; ``_no_name`` for misses."""
    return Match(_x(line), "name", text, True, groups or None)


def _no_name(line: int, text: str) -> Match:
    return Match(_x(line), "name", text, False)


def _ref(line: int, text: str, *groups: str) -> Match:
    return Match(_x(line), "reference", text, bool(groups), groups or None)


_BE = f"sha256:{_HEX_BE}"

MATCHES: list[Match] = [
    # normalize_test.go TestInvalidReferenceComponents: WithTag and WithDigest refuse these.
    Match(_n(367), "tag", "-foo", False),
    Match(_n(370), "digest", "foo", False),
    # regexp_test.go TestDomainRegexp.
    _domain(44, "test.com", True),
    _domain(48, "test.com:10304", True),
    _domain(52, "test.com:http", False),
    _domain(56, "localhost", True),
    _domain(60, "localhost:8080", True),
    _domain(64, "a", True),
    _domain(68, "a.b", True),
    _domain(72, "ab.cd.com", True),
    _domain(76, "a-b.com", True),
    _domain(80, "-ab.com", False),
    _domain(84, "ab-.com", False),
    _domain(88, "ab.c-om", True),
    _domain(92, "ab.-com", False),
    _domain(96, "ab.com-", False),
    _domain(100, "0101.com", True),
    _domain(104, "001a.com", True),
    _domain(108, "b.gbc.io:443", True),
    _domain(112, "b.gbc.io", True),
    _domain(116, "xn--n3h.com", True),
    _domain(120, "Asdf.com", True),
    _domain(124, "192.168.1.1:75050", True),
    _domain(128, "192.168.1.1:750050", True),
    _domain(132, "[fd00:1:2::3]:75050", True),
    _domain(136, "[fd00:1:2::3]75050", False),
    _domain(140, "[fd00:1:2::3]::75050", False),
    _domain(144, "[fd00:1:2::3%eth0]:75050", False),
    _domain(148, "[fd00123123123]:75050", True),
    _domain(152, "[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:75050", True),
    _domain(156, "[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:750505", True),
    _domain(160, "fd00:1:2::3:75050", False),
    # regexp_test.go TestFullNameRegexp: groups are (domain, path).
    _no_name(186, ""),
    _name(190, "short", "", "short"),
    _name(195, "simple/name", "simple", "name"),
    _name(200, "library/ubuntu", "library", "ubuntu"),
    _name(205, "docker/stevvooe/app", "docker", "stevvooe/app"),
    _name(
        210,
        "aa/aa/aa/aa/aa/aa/aa/aa/aa/bb/bb/bb/bb/bb/bb",
        "aa",
        "aa/aa/aa/aa/aa/aa/aa/aa/bb/bb/bb/bb/bb/bb",
    ),
    _name(215, "aa/aa/bb/bb/bb", "aa", "aa/bb/bb/bb"),
    _name(220, "a/a/a/a", "a", "a/a/a"),
    _no_name(225, "a/a/a/a/"),
    _no_name(229, "a//a/a"),
    _name(233, "a", "", "a"),
    _name(238, "a/aa", "a", "aa"),
    _name(243, "a/aa/a", "a", "aa/a"),
    _name(248, "foo.com", "", "foo.com"),
    _no_name(253, "foo.com/"),
    _name(257, "foo.com:8080/bar", "foo.com:8080", "bar"),
    _no_name(262, "foo.com:http/bar"),
    _name(266, "foo.com/bar", "foo.com", "bar"),
    _name(271, "foo.com/bar/baz", "foo.com", "bar/baz"),
    _name(276, "localhost:8080/bar", "localhost:8080", "bar"),
    _name(281, "sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux"),
    _name(286, "blog.foo.com/bar/baz", "blog.foo.com", "bar/baz"),
    _no_name(291, "a^a"),
    _no_name(295, "aa/asdf$$^/aa"),
    _no_name(299, "asdf$$^/aa"),
    _name(303, "aa-a/a", "aa-a", "a"),
    _name(308, "a/" * 128 + "a", "a", "a/" * 127 + "a"),
    _no_name(313, "a-/a/a/a"),
    _no_name(317, "foo.com/a-/a/a"),
    _no_name(321, "-foo/bar"),
    _no_name(325, "foo/bar-"),
    _no_name(329, "foo-/bar"),
    _no_name(333, "foo/-bar"),
    _no_name(337, "_foo/bar"),
    _name(341, "foo_bar", "", "foo_bar"),
    _name(346, "foo_bar.com", "", "foo_bar.com"),
    _no_name(351, "foo_bar.com:8080"),
    _no_name(355, "foo_bar.com:8080/app"),
    _name(359, "foo.com/foo_bar", "foo.com", "foo_bar"),
    _no_name(364, "____/____"),
    _no_name(368, "_docker/_docker"),
    _no_name(372, "docker_/docker_"),
    _name(376, "b.gcr.io/test.example.com/my-app", "b.gcr.io", "test.example.com/my-app"),
    _name(381, "xn--n3h.com/myimage", "xn--n3h.com", "myimage"),
    _name(386, "xn--7o8h.com/myimage", "xn--7o8h.com", "myimage"),
    _name(391, "example.com/xn--7o8h.com/myimage", "example.com", "xn--7o8h.com/myimage"),
    _name(
        396,
        "example.com/some_separator__underscore/myimage",
        "example.com",
        "some_separator__underscore/myimage",
    ),
    _no_name(401, "example.com/__underscore/myimage"),
    _no_name(405, "example.com/..dots/myimage"),
    _no_name(409, "example.com/.dots/myimage"),
    _no_name(413, "example.com/nodouble..dots/myimage"),
    _no_name(417, "example.com/nodouble..dots/myimage"),
    _no_name(421, "docker./docker"),
    _no_name(425, ".docker/docker"),
    _no_name(429, "docker-/docker"),
    _no_name(433, "-docker/docker"),
    _no_name(437, "do..cker/docker"),
    _no_name(441, "do__cker:8080/docker"),
    _name(445, "do__cker/docker", "", "do__cker/docker"),
    _name(450, "b.gcr.io/test.example.com/my-app", "b.gcr.io", "test.example.com/my-app"),
    _name(
        455,
        "registry.io/foo/project--id.module--name.ver---sion--name",
        "registry.io",
        "foo/project--id.module--name.ver---sion--name",
    ),
    _name(460, "Asdf.com/foo/bar"),
    _no_name(464, "Foo/FarB"),
    # regexp_test.go TestReferenceRegexp: groups are (name, tag, digest).
    _ref(486, "registry.com:8080/myapp:tag", "registry.com:8080/myapp", "tag", ""),
    _ref(491, f"registry.com:8080/myapp@{_BE}", "registry.com:8080/myapp", "", _BE),
    _ref(496, f"registry.com:8080/myapp:tag2@{_BE}", "registry.com:8080/myapp", "tag2", _BE),
    _ref(501, "registry.com:8080/myapp@sha256:badbadbadbad"),
    _ref(505, "registry.com:8080/myapp:invalid~tag"),
    _ref(509, "bad_hostname.com:8080/myapp:tag"),
    _ref(514, f"localhost:8080@{_BE}", "localhost", "8080", _BE),
    _ref(519, f"localhost:8080/name@{_BE}", "localhost:8080/name", "", _BE),
    _ref(524, f"localhost:http/name@{_BE}"),
    _ref(529, f"localhost@{_BE}", "localhost", "", _BE),
    _ref(534, "registry.com:8080/myapp@bad"),
    _ref(538, "registry.com:8080/myapp@2bad"),
    # regexp_test.go TestIdentifierRegexp.
    Match(
        _x(559),
        "identifier",
        "da304e823d8ca2b9d863a3c897baeb852ba21ea9a9f1414736394ae7fcaf9821",
        True,
    ),
    Match(
        _x(563),
        "identifier",
        "7EC43B381E5AEFE6E04EFB0B3F0693FF2A4A50652D64AEC573905F2DB5889A1C",
        False,
    ),
    Match(
        _x(567), "identifier", "da304e823d8ca2b9d863a3c897baeb852ba21ea9a9f1414736394ae7fcaf", False
    ),
    Match(
        _x(571),
        "identifier",
        "sha256:da304e823d8ca2b9d863a3c897baeb852ba21ea9a9f1414736394ae7fcaf9821",
        False,
    ),
    Match(
        _x(575),
        "identifier",
        "da304e823d8ca2b9d863a3c897baeb852ba21ea9a9f1414736394ae7fcaf98218482",
        False,
    ),
]
