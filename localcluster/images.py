"""Images the test suite and docker-compose need, made on this machine.

Nothing can be pulled from a public registry here, so: a Debian base image is
built with mmdebstrap and imported; RabbitMQ and the registry are the public images
when they are here (RabbitMQ's is pulled if it can be) and otherwise stand-ins built
from that base (tests/images/); so is a node's Docker Engine for docker-compose.yml;
and puller's two images (the Dockerfile's ``worker`` and ``http`` targets) are built
from the project's own Dockerfile on that base.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import docker
import structlog

from localcluster.engines import HOST_DOCKER_SOCKET

log = structlog.get_logger("localcluster.images")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "local/debian-python:bookworm"
PUBLIC_RABBITMQ_IMAGE = "rabbitmq:3-management"
STANDIN_RABBITMQ_IMAGE = "local/rabbitmq:3-standin"
PUBLIC_REGISTRY_IMAGE = "registry:2"
STANDIN_REGISTRY_IMAGE = "local/registry:2-standin"
ENGINE_IMAGE = "local/docker-engine:bookworm"
WORKER_IMAGE = "cyberdojo/puller-worker:local"
HTTP_IMAGE = "cyberdojo/puller-http:local"
"""The project's Dockerfile's two targets, ``worker`` and ``http``, built here."""


def host_client() -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{HOST_DOCKER_SOCKET}", timeout=600)


def has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_base_image(client: docker.DockerClient) -> str:
    """A Debian bookworm root with python3 and venv, built by mmdebstrap and imported."""
    if has_image(client, BASE_IMAGE):
        return BASE_IMAGE
    log.info("building base image", image=BASE_IMAGE)
    with tempfile.TemporaryDirectory(prefix="puller-base-") as scratch:
        tarball = Path(scratch) / "base.tar"
        subprocess.run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=apt",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(tarball),
            ],
            check=True,
        )
        repository, tag = BASE_IMAGE.rsplit(":", 1)
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)
    return BASE_IMAGE


def ensure_rabbitmq_image(client: docker.DockerClient) -> str:
    """The public RabbitMQ image if it is here or can be pulled; else a local stand-in."""
    for name in (PUBLIC_RABBITMQ_IMAGE, STANDIN_RABBITMQ_IMAGE):
        if has_image(client, name):
            return name
    try:
        client.images.pull(PUBLIC_RABBITMQ_IMAGE)
    except docker.errors.DockerException as error:
        log.info("public RabbitMQ image cannot be pulled; building a stand-in", reason=str(error))
    else:
        return PUBLIC_RABBITMQ_IMAGE
    _build(client, PROJECT_ROOT / "tests" / "images" / "rabbitmq", STANDIN_RABBITMQ_IMAGE)
    return STANDIN_RABBITMQ_IMAGE


PROJECT_CONTEXT = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "contract",
    "worker",
    "publisher",
    "serving",
    "gateway",
    "blob_cache",
    "build-ca",
)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class PullerImages:
    worker: str
    http: str
    version: str
    revision: str
    """The build arguments they were labelled with (VERSION and SHA): empty when the project
    is not a git checkout."""


def ensure_registry_image(client: docker.DockerClient) -> str:
    """The public registry image if it is here; else a stand-in with Debian's registry.

    No pull is tried: the stand-in is a cached build, quicker than a pull that cannot
    succeed, and it serves the same port (5000) and path (/var/lib/registry).
    """
    if has_image(client, PUBLIC_REGISTRY_IMAGE):
        return PUBLIC_REGISTRY_IMAGE
    _build(client, PROJECT_ROOT / "tests" / "images" / "registry", STANDIN_REGISTRY_IMAGE)
    return STANDIN_REGISTRY_IMAGE


def build_engine_image(client: docker.DockerClient) -> str:
    """A node's Docker Engine in a container (tests/images/docker-engine), for compose."""
    _build(client, PROJECT_ROOT / "tests" / "images" / "docker-engine", ENGINE_IMAGE)
    return ENGINE_IMAGE


def build_puller_images(client: docker.DockerClient) -> PullerImages:
    """Builds both targets of the project's Dockerfile on the local base image (always:
    the code changes; docker's layer cache makes an unchanged build take seconds, and
    the two targets share the one build stage).

    The build context is a copy of the project with this machine's CA bundle in
    ``build-ca/``, so pip in the build trusts what this machine trusts.
    """
    with tempfile.TemporaryDirectory(prefix="puller-context-") as scratch:
        context = Path(scratch)
        for name in PROJECT_CONTEXT:
            source = PROJECT_ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source, context / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, context / name)
        if HOST_CA_BUNDLE.exists():
            shutil.copy2(HOST_CA_BUNDLE, context / "build-ca" / "host-ca-bundle.crt")
        version, revision = project_version(), project_commit()
        labels = {"VERSION": version, "SHA": revision}
        # http first: it comes before worker in the Dockerfile, and the classic builder
        # builds every stage up to its target, so the second build is all cache hits.
        _build(client, context, HTTP_IMAGE, target="http", buildargs=labels)
        _build(client, context, WORKER_IMAGE, target="worker", buildargs=labels)
    return PullerImages(worker=WORKER_IMAGE, http=HTTP_IMAGE, version=version, revision=revision)


def project_version() -> str:
    """The version in pyproject.toml: what the images' programs answer to ``--version``."""
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as pyproject:
        return str(tomllib.load(pyproject)["project"]["version"])


def project_commit() -> str:
    """The checked-out commit, for the images' revision label and ``/sha``; empty when
    there is none (not a git checkout)."""
    done = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def _build(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    target: str | None = None,
    buildargs: dict[str, str] | None = None,
) -> None:
    ensure_base_image(client)
    log.info("building image", image=tag, target=target, context=str(context))
    before = _image_id(client, tag)
    try:
        client.images.build(
            path=str(context),
            tag=tag,
            target=target,
            buildargs={"BASE_IMAGE": BASE_IMAGE, **(buildargs or {})},
            network_mode="host",
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as error:
        output = "".join(
            str(chunk.get("stream", chunk.get("error", ""))) for chunk in error.build_log
        )
        raise RuntimeError(f"building {tag} failed: {error}\n{output[-4000:]}") from None
    if before is not None and before != _image_id(client, tag):
        _remove_if_untagged(client, before)


def _image_id(client: docker.DockerClient, name: str) -> str | None:
    try:
        return str(client.images.get(name).id)
    except docker.errors.ImageNotFound:
        return None


def _remove_if_untagged(client: docker.DockerClient, image_id: str) -> None:
    """The image a rebuild took a tag from, unless another tag or a container holds it:
    each build of changed code would otherwise leave one behind."""
    try:
        if client.images.get(image_id).tags:
            return
        client.images.remove(image_id, noprune=False)
    except docker.errors.APIError as error:  # in use by a container, or gone already
        log.info("old image kept", image=image_id, reason=str(error))
