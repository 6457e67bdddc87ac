"""The distribution reference grammar, and Docker's normalisation of it.

The vectors in :mod:`tests.unit.reference_vectors` are Docker's own test cases (the
distribution reference package, v0.6.0); the tests after them pin each place where
puller's parser used to disagree with Docker.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import ImageReference, InvalidReference, parse_reference
from contract.reference import (
    DIGEST_PATTERN,
    DOMAIN_PATTERN,
    IDENTIFIER_PATTERN,
    NAME_PATTERN,
    REFERENCE_PATTERN,
    TAG_PATTERN,
    parse_exact,
    split_name,
)
from tests.unit.reference_vectors import (
    CANONICAL,
    COMPOSED,
    DIGEST_INVALID,
    DIGEST_UNSUPPORTED,
    EMPTY,
    EXACT,
    FORMAT,
    IDENTIFIER,
    LOWERCASE,
    MATCHES,
    NAME_SPLITS,
    NORMALIZED,
    TOO_LONG,
    Canonical,
    Compose,
    Exact,
    Match,
    NameSplit,
    Normalized,
)

# What a refusal of each kind says (FORMAT's reasons name whichever piece is wrong).
_REASONS = {
    FORMAT: ".",
    LOWERCASE: "lowercase",
    IDENTIFIER: "64-digit hexadecimal",
    TOO_LONG: "longer than 255",
    EMPTY: "empty",
    DIGEST_UNSUPPORTED: "unsupported digest algorithm",
    DIGEST_INVALID: "lowercase hex digits",
}
_PATTERNS: dict[str, re.Pattern[str]] = {
    "domain": DOMAIN_PATTERN,
    "name": NAME_PATTERN,
    "reference": REFERENCE_PATTERN,
    "identifier": IDENTIFIER_PATTERN,
    "tag": TAG_PATTERN,
    "digest": DIGEST_PATTERN,
}
_HEX = "0123456789abcdef" * 8


def _source(case: Normalized | Exact | Canonical | NameSplit | Compose | Match) -> str:
    return case.source


def _suffix(reference: ImageReference) -> str:
    tag = f":{reference.tag}" if reference.tag is not None else ""
    return tag + (f"@{reference.digest}" if reference.digest is not None else "")


@pytest.mark.parametrize("case", NORMALIZED, ids=_source)
def test_docker_normalisation_vectors(case: Normalized) -> None:
    if case.error is not None:
        with pytest.raises(InvalidReference, match=_REASONS[case.error]):
            parse_reference(case.text)
        return
    parsed = parse_reference(case.text)
    if case.expected is not None:
        assert str(parsed) == case.expected
    if case.domain is not None:
        assert parsed.domain == case.domain
    if case.path is not None:
        assert parsed.path == case.path
    if case.familiar_name is not None:
        assert parsed.familiar == case.familiar_name + _suffix(parsed)
    if case.familiar is not None:
        assert parsed.familiar == case.familiar
    assert parse_reference(str(parsed)) == parsed


@pytest.mark.parametrize("case", EXACT, ids=_source)
def test_docker_grammar_vectors(case: Exact) -> None:
    if case.error is not None:
        with pytest.raises(InvalidReference, match=_REASONS[case.error]):
            parse_exact(case.text)
        return
    parsed = parse_exact(case.text)
    assert str(parsed) == case.text
    assert (parsed.repository, parsed.domain) == (case.name, case.domain)
    assert (parsed.tag, parsed.digest) == (case.tag, case.digest)


@pytest.mark.parametrize("case", CANONICAL, ids=_source)
def test_docker_canonical_name_vectors(case: Canonical) -> None:
    parsed = parse_reference(case.text)
    assert (parsed.repository == case.text) is case.canonical
    if case.canonical:
        assert (parsed.domain, parsed.path) == (case.domain, case.path)


@pytest.mark.parametrize("case", NAME_SPLITS, ids=_source)
def test_docker_name_split_vectors(case: NameSplit) -> None:
    if case.error is not None:
        with pytest.raises(InvalidReference, match=_REASONS[case.error]):
            split_name(case.text)
        return
    assert split_name(case.text) == (case.domain, case.path)


@pytest.mark.parametrize("case", COMPOSED, ids=_source)
def test_docker_composition_vectors(case: Compose) -> None:
    domain, path = split_name(case.name)
    assert case.tag is None or TAG_PATTERN.fullmatch(case.tag)
    assert case.digest is None or DIGEST_PATTERN.fullmatch(case.digest)
    assert str(ImageReference(domain, path, case.tag, case.digest)) == case.combined


@pytest.mark.parametrize("case", MATCHES, ids=_source)
def test_docker_regexp_vectors(case: Match) -> None:
    match = _PATTERNS[case.pattern].fullmatch(case.text)
    assert (match is not None) is case.match
    if match is not None and case.groups is not None:
        assert tuple(group or "" for group in match.groups()) == case.groups


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gcc_assert", "docker.io/library/gcc_assert:latest"),
        (
            "cyberdojofoundation/gcc_assert:93eefc6",
            "docker.io/cyberdojofoundation/gcc_assert:93eefc6",
        ),
        ("docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("localhost/x", "localhost/x:latest"),
        ("localhost:5000/a/b/c:v1.2-rc_3", "localhost:5000/a/b/c:v1.2-rc_3"),
        ("127.0.0.1:5000/demo/hello:1", "127.0.0.1:5000/demo/hello:1"),
        ("ghcr.io/org/image-name__x.y", "ghcr.io/org/image-name__x.y:latest"),
        ("a---b", "docker.io/library/a---b:latest"),
        ("Registry.Example.com/x", "Registry.Example.com/x:latest"),
        ("[::1]:5000/x:2", "[::1]:5000/x:2"),
        (
            "busybox@sha256:" + "a" * 64,
            "docker.io/library/busybox@sha256:" + "a" * 64,
        ),
        (
            "busybox:1.36@sha256:" + "b" * 64,
            "docker.io/library/busybox:1.36@sha256:" + "b" * 64,
        ),
    ],
)
def test_valid_references_normalise_like_docker(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


def test_familiar_form_drops_the_default_domain_and_library() -> None:
    assert parse_reference("gcc_assert").familiar == "gcc_assert:latest"
    assert parse_reference("cyberdojofoundation/x:1").familiar == "cyberdojofoundation/x:1"
    assert parse_reference("127.0.0.1:5000/x:1").familiar == "127.0.0.1:5000/x:1"


def test_parts_are_split_at_the_right_colon() -> None:
    reference = parse_reference("localhost:5000/team/app:2.0")
    assert reference == ImageReference("localhost:5000", "team/app", "2.0", None)
    assert reference.repository == "localhost:5000/team/app"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "white space"),
        ("busybox ", "white space"),
        ("Busybox", "lowercase"),
        ("team/App", "lowercase"),
        ("a//b", "empty path component"),
        ("a/", "empty path component"),
        ("-a", "not a valid path component"),
        ("a_", "not a valid path component"),
        ("a...b", "not a valid path component"),
        ("busybox:", "not a valid tag"),
        ("busybox:-x", "not a valid tag"),
        ("busybox:" + "t" * 129, "not a valid tag"),
        ("busybox:a/b", "not a valid"),
        ("busybox@sha256:abc", "digest"),
        ("busybox@sha256:" + "A" * 64, "64 lowercase hex"),
        ("busybox@" + "a" * 64, "not a digest"),
        ("@sha256:" + "a" * 64, "no repository"),
        (":tag", "no repository"),
        ("bad_host.com:port/x", "registry host"),
        ("x" * 2000, "1024 are allowed"),
        ("a/" * 130 + "b", "longer than 255"),
    ],
)
def test_invalid_references_say_why(text: str, reason: str) -> None:
    with pytest.raises(InvalidReference, match=reason):
        parse_reference(text)


@pytest.mark.parametrize("value", [None, 42, ["busybox"], {"image": "x"}, b"busybox"])
def test_a_reference_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidReference, match="must be a string"):
        parse_reference(value)


@given(st.text(max_size=300))
def test_any_text_parses_or_fails_with_invalid_reference(text: str) -> None:
    try:
        parsed = parse_reference(text)
    except InvalidReference:
        return
    assert parse_reference(str(parsed)) == parsed  # normalising twice changes nothing


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
# A first component with a '.' would name a registry host, as it does for Docker.
_first_component = st.from_regex(r"[a-z0-9]{1,8}(?:[_-][a-z0-9]{1,8}){0,2}", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(_first_component, st.lists(_component, max_size=3), st.one_of(st.none(), _tag))
def test_generated_valid_references_round_trip(
    first: str, rest: list[str], tag: str | None
) -> None:
    components = [first, *rest]
    text = "/".join(components) + (f":{tag}" if tag else "")
    parsed = parse_reference(text)
    assert parsed.tag == (tag or "latest")
    assert parsed.path.endswith("/".join(components[1:]) if len(components) > 1 else components[0])
    assert parse_reference(str(parsed)) == parsed


@given(st.text(max_size=300))
def test_the_plain_grammar_prints_back_what_it_read(text: str) -> None:
    try:
        parsed = parse_exact(text)
    except InvalidReference:
        return
    assert str(parsed) == text


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.from_regex(REFERENCE_PATTERN, fullmatch=True))
def test_grammatical_references_normalise_to_a_fixed_point(text: str) -> None:
    try:
        exact = parse_exact(text)
    except InvalidReference:
        pass  # too long, or a digest Docker does not support
    else:
        assert str(exact) == text
    try:
        parsed = parse_reference(text)
    except InvalidReference:
        return
    assert parse_reference(str(parsed)) == parsed


# Regression tests: each place where puller's parser used to disagree with Docker's.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("index.docker.io/x", "docker.io/library/x:latest"),
        ("index.docker.io/library/x:1", "docker.io/library/x:1"),
        ("index.docker.io/team/x", "docker.io/team/x:latest"),
        # Only the exact lowercase spelling is Docker Hub; others are registries of their own.
        ("INDEX.docker.io/x", "INDEX.docker.io/x:latest"),
        ("Docker.io/x", "Docker.io/x:latest"),
    ],
)
def test_index_docker_io_is_spelt_docker_io(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


def test_a_bare_image_id_is_refused() -> None:
    with pytest.raises(InvalidReference, match="64-digit hexadecimal"):
        parse_reference("a" * 64)
    # With a tag, a host, or one digit fewer it is an ordinary name.
    assert str(parse_reference("a" * 64 + ":1")) == f"docker.io/library/{'a' * 64}:1"
    assert parse_reference("docker.io/" + "a" * 64).path == "library/" + "a" * 64
    assert parse_reference("a" * 63).path == "library/" + "a" * 63
    assert parse_reference("A" * 63 + "/x").domain == "A" * 63


@pytest.mark.parametrize(
    ("digest", "reason"),
    [
        ("md5:" + _HEX[:32], "unsupported digest algorithm 'md5'"),
        ("sha1:" + _HEX[:40], "unsupported digest algorithm"),
        ("sha256+b64:" + _HEX[:64], "unsupported digest algorithm"),
        ("sha256:" + _HEX[:63], "exactly 64 lowercase hex digits"),
        ("sha256:" + _HEX[:65], "exactly 64 lowercase hex digits"),
        ("sha384:" + _HEX[:64], "exactly 96 lowercase hex digits"),
        ("sha384:" + _HEX[:96].upper(), "exactly 96 lowercase hex digits"),
        ("sha512:" + _HEX[:96], "exactly 128 lowercase hex digits"),
        ("sha512:" + _HEX[:128].upper(), "exactly 128 lowercase hex digits"),
        ("sha256:" + _HEX[:31], "not a digest"),
    ],
)
def test_digests_need_a_known_algorithm_and_the_exact_hex(digest: str, reason: str) -> None:
    for text in (f"busybox@{digest}", f"busybox:1@{digest}"):
        with pytest.raises(InvalidReference, match=re.escape(reason)):
            parse_reference(text)


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_each_known_digest_algorithm_is_accepted(algorithm: str) -> None:
    digest = f"{algorithm}:{_HEX[: {'sha256': 64, 'sha384': 96, 'sha512': 128}[algorithm]]}"
    assert parse_reference(f"busybox@{digest}").digest == digest
    assert str(parse_reference(f"busybox:1@{digest}")) == f"docker.io/library/busybox:1@{digest}"


def test_a_digest_algorithm_in_capitals_is_refused() -> None:
    # With no tag Docker meets the capitals in its lowercase check of the name...
    with pytest.raises(InvalidReference, match="algorithm 'SHA256' must be lowercase"):
        parse_reference("busybox@SHA256:" + _HEX[:64])
    # ...and with one, in the digest library.
    with pytest.raises(InvalidReference, match="not a valid digest algorithm"):
        parse_reference("busybox:1@SHA256:" + _HEX[:64])


@pytest.mark.parametrize("tag", ["é", "v1é", "ß", "\u0663", "\uff561", "1.0\u2028"])
def test_tags_are_ascii_only(tag: str) -> None:
    with pytest.raises(InvalidReference, match=r"not a valid tag|white space"):
        parse_reference(f"busybox:{tag}")


def test_tags_may_use_capitals_digits_and_word_punctuation() -> None:
    tag = "V1.2_rc-3" + "x" * 119
    assert parse_reference(f"busybox:{tag}").tag == tag
    with pytest.raises(InvalidReference, match="not a valid tag"):
        parse_reference(f"busybox:{tag}x")


def test_the_length_limit_counts_the_path_without_the_domain() -> None:
    # 255 characters of path, on a long domain: the domain does not count...
    long_domain = "registry." + "d" * 80 + ".example.com"
    assert parse_reference(f"{long_domain}/{'a' * 255}").path == "a" * 255
    with pytest.raises(InvalidReference, match="longer than 255"):
        parse_reference(f"{long_domain}/{'a' * 256}")
    # ...but "library/" does: 247 + 8 = 255 is the longest official name.
    assert parse_reference("a" * 247).path == "library/" + "a" * 247
    with pytest.raises(InvalidReference, match="longer than 255"):
        parse_reference("a" * 248)
    with pytest.raises(InvalidReference, match="longer than 255"):
        parse_reference("docker.io/" + "a" * 248)


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("docker.io/library/a/b", "library/a/b:latest"),
        ("library/a/b:1", "library/a/b:1"),
        ("docker.io/library/a", "a:latest"),
        ("index.docker.io/library/a@sha256:" + _HEX[:64], "a@sha256:" + _HEX[:64]),
        ("docker.io/team/a:1", "team/a:1"),
        ("example.com/library/a", "example.com/library/a:latest"),
        # For display only, as in Docker: this one would read back with the host foo.com.
        ("docker.io/foo.com/a", "foo.com/a:latest"),
    ],
)
def test_familiar_keeps_library_on_nested_paths(text: str, familiar: str) -> None:
    assert parse_reference(text).familiar == familiar


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost", "docker.io/library/localhost:latest"),
        ("localhost:5000", "docker.io/library/localhost:5000"),
        ("example.com", "docker.io/library/example.com:latest"),
        ("example.com:5000", "docker.io/library/example.com:5000"),
        ("127.0.0.1:5000", "docker.io/library/127.0.0.1:5000"),
        ("localhost/x", "localhost/x:latest"),
        ("example.com/x", "example.com/x:latest"),
    ],
)
def test_a_single_component_is_always_a_docker_hub_name(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


@pytest.mark.parametrize("text", ["Foo", "LOCALHOST", "Example.com:5000"])
def test_a_single_component_in_capitals_is_refused(text: str) -> None:
    with pytest.raises(InvalidReference, match="lowercase"):
        parse_reference(text)


def test_a_first_component_with_capitals_is_a_registry_host() -> None:
    assert parse_reference("Foo/bar") == ImageReference("Foo", "bar", "latest", None)
    assert parse_reference("Uppercase/lowercase:tag").domain == "Uppercase"
    assert parse_reference("LOCALHOST:5000/a/b").repository == "LOCALHOST:5000/a/b"


@pytest.mark.parametrize(
    "text", ["foo/Bar", "Foo/Bar", "docker.io/Foo", "localhost/a/B:1", "FOO_bar/x", "Foo_Bar/x"]
)
def test_capitals_in_the_repository_path_are_refused(text: str) -> None:
    with pytest.raises(InvalidReference, match="must be lowercase"):
        parse_reference(text)


def test_a_dotted_first_component_that_is_no_host_stays_in_the_path() -> None:
    # Docker takes "my_host.com" for a domain (it has a '.'), then its grammar reads it
    # as a path component because '_' is no host character: the domain is empty.
    parsed = parse_reference("my_host.com/app")
    assert parsed == ImageReference("", "my_host.com/app", "latest", None)
    assert str(parsed) == parsed.repository + ":latest" == "my_host.com/app:latest"
    assert parsed.familiar == "my_host.com/app:latest"
    assert parse_reference(str(parsed)) == parsed
    with pytest.raises(InvalidReference, match="registry host"):
        parse_reference("my_host.com:5000/app")


def test_a_tag_and_a_digest_are_both_kept() -> None:
    text = "gcr.io/library/busybox:latest@sha256:" + _HEX[:64]
    parsed = parse_reference(text)
    assert (parsed.tag, parsed.digest) == ("latest", "sha256:" + _HEX[:64])
    assert str(parsed) == text
