"""The engine's error texts become error kinds a person can act on."""

from __future__ import annotations

import pytest

from contract import ErrorKind, parse_reference
from worker.engine import _classified, repository_digest

IMAGE = parse_reference("127.0.0.1:5000/demo/x:1")


@pytest.mark.parametrize(
    ("engine_message", "kind"),
    [
        ("manifest for 127.0.0.1:5000/demo/x:1 not found: manifest unknown", ErrorKind.NOT_FOUND),
        (
            "pull access denied for x, repository does not exist or may require 'docker login'",
            ErrorKind.NOT_FOUND,
        ),
        ("unauthorized: authentication required", ErrorKind.UNAUTHORIZED),
        (
            'Get "http://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused',
            ErrorKind.REGISTRY_UNREACHABLE,
        ),
        (
            "Get https://r.example/v2/: dial tcp: lookup r.example: no such host",
            ErrorKind.REGISTRY_UNREACHABLE,
        ),
        ("toomanyrequests: You have reached your pull rate limit", ErrorKind.REGISTRY_ERROR),
        ("received unexpected HTTP status: 503 Service Unavailable", ErrorKind.REGISTRY_ERROR),
        ("write /var/lib/docker/tmp/x: no space left on device", ErrorKind.NO_SPACE),
        ("something nobody has seen before", ErrorKind.ENGINE_ERROR),
    ],
)
def test_engine_messages_are_classified(engine_message: str, kind: ErrorKind) -> None:
    failure = _classified(engine_message, IMAGE)
    assert failure.kind is kind
    assert engine_message in failure.message
    assert str(IMAGE) in failure.message


HUB_DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("repo_digests", "image", "expected"),
    [
        # The engine lists Docker Hub names in their familiar spelling.
        ([f"busybox@{HUB_DIGEST}"], "busybox:1.36", HUB_DIGEST),
        ([f"team/app@{OTHER_DIGEST}", f"busybox@{HUB_DIGEST}"], "busybox:latest", HUB_DIGEST),
        ([f"docker.io/library/busybox@{HUB_DIGEST}"], "index.docker.io/busybox", HUB_DIGEST),
        ([f"127.0.0.1:5000/a@{OTHER_DIGEST}"], "127.0.0.1:5000/b:1", None),
        ([f"127.0.0.1:5000/a@{OTHER_DIGEST}"], f"127.0.0.1:5000/b@{HUB_DIGEST}", HUB_DIGEST),
        (None, "busybox", None),
        (["garbage", 7, f"Bad Name@{OTHER_DIGEST}"], "busybox", None),
    ],
)
def test_the_digest_is_the_asked_repositorys_own(
    repo_digests: object, image: str, expected: str | None
) -> None:
    assert repository_digest(repo_digests, parse_reference(image)) == expected
