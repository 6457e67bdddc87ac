"""The distribution reference grammar, and Docker's normalisation of it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract import ImageReference, InvalidReference, parse_reference


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
