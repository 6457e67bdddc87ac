"""The engine's error texts become error kinds a person can act on."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from contract import ErrorKind, parse_reference
from localcluster.registry import docker_config
from worker.stores.docker.records import repository_digest
from worker.stores.failures import classified
from worker.stores.registry_logins import BasicLogin, DockerConfig, RegistryLogin

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
        (  # dockerd 20.10 pulling from a registry that wants a login, sent none
            'Head "http://127.0.0.1:5000/v2/demo/x/manifests/1": no basic auth credentials',
            ErrorKind.UNAUTHORIZED,
        ),
        (
            "denied: requested access to the resource is denied",
            ErrorKind.UNAUTHORIZED,
        ),
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
        (
            "failed to register layer: Error processing tar file(signal: terminated):",
            ErrorKind.ENGINE_UNAVAILABLE,
        ),
        (
            "error creating lease: grpc: the client connection is closing: context canceled",
            ErrorKind.ENGINE_UNAVAILABLE,
        ),
        (
            "error creating lease: transport is closing: unavailable",
            ErrorKind.ENGINE_UNAVAILABLE,
        ),
    ],
)
def test_engine_messages_are_classified(engine_message: str, kind: ErrorKind) -> None:
    failure = classified(engine_message, IMAGE)
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


REGISTRY = "127.0.0.1:5000"
NO_CREDENTIALS = f'Head "http://{REGISTRY}/v2/demo/x/manifests/1": no basic auth credentials'
REFUSED = "unauthorized: authentication required"  # dockerd 20.10, wrong user or password
PASSWORD = "pa55-w0rd-never-shown"  # noqa: S105 - a made-up one, looked for in messages


def test_a_missing_login_names_the_registry_what_to_do_and_where_the_worker_looked() -> None:
    login = RegistryLogin(REGISTRY, None, "/cfg/config.json (DOCKER_CONFIG=/cfg)", "no such file")

    failure = classified(NO_CREDENTIALS, IMAGE, login)

    assert failure.kind is ErrorKind.UNAUTHORIZED
    assert f"registry {REGISTRY} needs a login" in failure.message
    assert "give the worker a docker config.json with credentials for it" in failure.message
    assert "DOCKER_CONFIG=dir" in failure.message
    assert "looked in /cfg/config.json (DOCKER_CONFIG=/cfg): no such file" in failure.message


def test_a_refused_login_says_which_file_to_correct_and_never_shows_the_login(
    tmp_path: Path,
) -> None:
    docker_config(tmp_path, REGISTRY, "ci", PASSWORD)
    login = DockerConfig(tmp_path).login(REGISTRY)
    assert login.header is not None

    failure = classified(REFUSED, IMAGE, login)

    assert failure.kind is ErrorKind.UNAUTHORIZED
    assert f"registry {REGISTRY} refused the worker's login" in failure.message
    assert str(tmp_path / "config.json") in failure.message
    assert PASSWORD not in failure.message
    assert login.header not in failure.message
    assert PASSWORD not in repr(login)
    assert login.header not in repr(login)


def header_login(login: RegistryLogin) -> dict[str, str]:
    """What the engine would get in ``X-Registry-Auth``."""
    assert login.header is not None, login
    decoded: dict[str, str] = json.loads(base64.urlsafe_b64decode(login.header))
    return decoded


def test_docker_config_gives_the_login_localcluster_wrote(tmp_path: Path) -> None:
    assert docker_config(tmp_path, REGISTRY, "ci", PASSWORD) == tmp_path
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o600

    login = DockerConfig(tmp_path).login(REGISTRY)

    assert header_login(login) | {"email": None} == {
        "username": "ci",
        "password": PASSWORD,
        "serveraddress": REGISTRY,
        "email": None,
    }
    assert DockerConfig(tmp_path).login("127.0.0.1:5001").header is None


def test_the_file_is_read_at_each_login_so_a_rotated_secret_counts_at_once(
    tmp_path: Path,
) -> None:
    config = DockerConfig(tmp_path)
    assert config.login(REGISTRY).problem == "no such file"

    for password in ("first-password", "second-pass", "third-password"):  # same sizes too
        docker_config(tmp_path, REGISTRY, "ci", password)
        assert header_login(config.login(REGISTRY))["password"] == password

    (tmp_path / "config.json").unlink()
    assert config.login(REGISTRY).header is None


def test_a_credential_helper_named_by_the_config_gives_the_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text(
        '#!/bin/sh\nread server\necho "{\\"Username\\": \\"ci\\", \\"Secret\\": \\"$server\\"}"\n'
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:/usr/bin:/bin")
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {REGISTRY: "fake"}}))

    found = DockerConfig(tmp_path).login(REGISTRY)
    login = header_login(found)

    assert (login["Username"], login["Password"]) == ("ci", REGISTRY)
    assert found.basic == BasicLogin("ci", REGISTRY)  # for ctr, on containerd nodes


def test_docker_hub_logins_are_found_in_any_spelling(tmp_path: Path) -> None:
    docker_config(tmp_path, "https://index.docker.io/v1/", "hubuser", PASSWORD)

    assert header_login(DockerConfig(tmp_path).login("docker.io"))["username"] == "hubuser"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f'{{"auths": {{"{REGISTRY}": {{"auth": "{PASSWORD}', "it is not JSON"),
        (json.dumps([PASSWORD]), "it is not a JSON object"),
        (json.dumps({"auths": {REGISTRY: PASSWORD}}), "its auths are not docker logins"),
        (json.dumps({"auths": {REGISTRY: {"auth": PASSWORD}}}), "its auths are not docker"),
        (
            json.dumps(
                {"auths": {REGISTRY: {"auth": base64.b64encode(PASSWORD.encode()).decode()}}}
            ),
            "its auths are not docker logins",
        ),
        ("{}", f"no login for {REGISTRY}"),
        (
            json.dumps({"auths": {}, "credsStore": "not-installed-here"}),
            "its credential helper docker-credential-not-installed-here is not on PATH",
        ),
    ],
)
def test_an_unusable_config_is_no_login_and_says_why_without_quoting_it(
    tmp_path: Path, content: str, problem: str
) -> None:
    (tmp_path / "config.json").write_text(content)

    login = DockerConfig(tmp_path).login(REGISTRY)
    failure = classified(NO_CREDENTIALS, IMAGE, login)

    assert login.header is None
    assert login.problem is not None
    assert problem in login.problem
    assert PASSWORD not in failure.message
    assert f"{tmp_path / 'config.json'} (DOCKER_CONFIG={tmp_path}): {problem}" in failure.message


@pytest.mark.parametrize("environ", [{}, {"DOCKER_CONFIG": ""}])
def test_without_docker_config_the_worker_looks_where_docker_does(
    environ: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))

    config = DockerConfig.from_environment(environ)

    assert config.path == tmp_path / ".docker" / "config.json"
    assert config.login(REGISTRY).source == f"{config.path} (DOCKER_CONFIG unset)"


def test_docker_config_names_the_directory_holding_config_json() -> None:
    config = DockerConfig.from_environment({"DOCKER_CONFIG": "/etc/puller/docker"})

    assert config.path == Path("/etc/puller/docker/config.json")
    assert config.describe() == "/etc/puller/docker/config.json (DOCKER_CONFIG=/etc/puller/docker)"
