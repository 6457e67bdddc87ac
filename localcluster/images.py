"""Images the test suite and docker-compose need, made on this machine.

Nothing can be pulled from a public registry here, so: a Debian base image is
built with mmdebstrap and imported; RabbitMQ is the public image when it can be
pulled and otherwise a stand-in built from that base; the worker image is built
from the project's own Dockerfile on that base.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
import structlog

from localcluster.engines import HOST_DOCKER_SOCKET

log = structlog.get_logger("localcluster.images")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "local/debian-python:bookworm"
PUBLIC_RABBITMQ_IMAGE = "rabbitmq:3-management"
STANDIN_RABBITMQ_IMAGE = "local/rabbitmq:3-standin"
WORKER_IMAGE = "local/puller-worker:dev"


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


WORKER_CONTEXT = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "contract",
    "worker",
    "publisher",
    "serving",
    "localcluster",
    "build-ca",
)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def build_worker_image(client: docker.DockerClient) -> str:
    """Builds the project's Dockerfile on the local base image (always: the code changes).

    The build context is a copy of the project with this machine's CA bundle in
    ``build-ca/``, so pip in the build trusts what this machine trusts.
    """
    with tempfile.TemporaryDirectory(prefix="puller-context-") as scratch:
        context = Path(scratch)
        for name in WORKER_CONTEXT:
            source = PROJECT_ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source, context / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, context / name)
        if HOST_CA_BUNDLE.exists():
            shutil.copy2(HOST_CA_BUNDLE, context / "build-ca" / "host-ca-bundle.crt")
        _build(client, context, WORKER_IMAGE)
    return WORKER_IMAGE


def _build(client: docker.DockerClient, context: Path, tag: str) -> None:
    ensure_base_image(client)
    log.info("building image", image=tag, context=str(context))
    try:
        client.images.build(
            path=str(context),
            tag=tag,
            buildargs={"BASE_IMAGE": BASE_IMAGE},
            network_mode="host",
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as error:
        output = "".join(
            str(chunk.get("stream", chunk.get("error", ""))) for chunk in error.build_log
        )
        raise RuntimeError(f"building {tag} failed: {error}\n{output[-4000:]}") from None
