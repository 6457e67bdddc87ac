"""A real distribution registry (``docker-registry``) and a way to put images in it.

Images are written straight through the registry's HTTP API, so no Docker
Engine and no base image are needed to make one, and a layer can be any size.

A registry may require a login (HTTP basic auth against an htpasswd file of bcrypt
hashes, made by Debian's ``htpasswd`` from ``apache2-utils``); :func:`docker_config`
writes the docker ``config.json`` a client (a worker, through ``DOCKER_CONFIG``) logs
in with.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import requests

from localcluster.processes import LocalService, free_port, start_daemon, wait_until

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class Login:
    """A user name and password for a registry; the password is left out of ``repr``."""

    user: str
    password: str = field(repr=False)

    @property
    def basic(self) -> tuple[str, str]:
        """As ``requests`` takes basic auth."""
        return (self.user, self.password)


@dataclass
class Registry(LocalService):
    """``docker-registry serve`` on 127.0.0.1, storing blobs under ``root``.

    Docker Engines treat 127.0.0.0/8 registries as insecure by default, so
    plain HTTP pulls work with no daemon flag.

    ``login``: the registry then requires it (basic auth, bcrypt htpasswd) for every
    request, pulls included; this class's own pushes send it.
    """

    root: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    login: Login | None = None

    def start(self, timeout: float = 30.0) -> None:
        if self.port == 0:
            self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        settings: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.address},
        }
        if self.login is not None:
            htpasswd = self.root / "htpasswd"
            write_htpasswd(htpasswd, self.login)
            settings["auth"] = {"htpasswd": {"realm": "puller-localcluster", "path": str(htpasswd)}}
        config.write_text(json.dumps(settings))  # JSON is YAML, and needs no YAML library here
        log_path = self.root / "registry.log"
        self.process = start_daemon(["docker-registry", "serve", str(config)], log_path)
        wait_until(self._answers, "docker-registry", timeout, self.process, log_path)

    def _answers(self) -> bool:
        return requests.get(f"{self.url}/v2/", auth=self._auth, timeout=2).status_code == 200

    @property
    def _auth(self) -> tuple[str, str] | None:
        return None if self.login is None else self.login.basic

    def push_files(
        self, repository: str, tag: str, files: dict[str, bytes], manifest_indent: int | None = None
    ) -> str:
        """Pushes a one-layer image holding ``files``; returns ``ADDRESS/REPOSITORY:TAG``.
        ``manifest_indent`` spells the manifest differently: the same image (same id) then
        has another manifest digest."""
        push_image(self.url, repository, tag, [make_layer(files)], manifest_indent, self.login)
        return f"{self.address}/{repository}:{tag}"

    def manifest_digest(self, repository: str, tag: str) -> str:
        """The digest the registry gives ``repository:tag``'s manifest."""
        response = requests.head(
            f"{self.url}/v2/{repository}/manifests/{tag}",
            headers={"Accept": MANIFEST_V2},
            auth=self._auth,
            timeout=30,
        )
        response.raise_for_status()
        return response.headers["Docker-Content-Digest"]

    def push_blob(self, repository: str, blob: bytes) -> str:
        """Uploads ``blob`` into ``repository`` (no manifest: the blob is linked to that
        repository only); returns its digest."""
        with requests.Session() as session:
            if self.login is not None:
                session.auth = self.login.basic
            _upload_blob(session, self.url, repository, blob)
        return _sha256(blob)

    def push_index(
        self, repository: str, tag: str, platforms: list[tuple[str, str]]
    ) -> dict[str, str]:
        """Pushes an image index (OCI) with a one-layer image for each ``(architecture,
        variant)``, in that order; returns each platform's image id (its config's digest) by
        ``ARCHITECTURE/VARIANT``."""
        ids: dict[str, str] = {}
        entries = []
        with requests.Session() as session:
            session.auth = self._auth
            for architecture, variant in platforms:
                layer = make_layer({"platform": f"{architecture}/{variant}".encode()})
                named = {"os": "linux", "architecture": architecture}
                if variant:
                    named["variant"] = variant
                config = json.dumps(
                    {**named, "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}
                ).encode()
                for blob in (layer.compressed, config):
                    _upload_blob(session, self.url, repository, blob)
                manifest = json.dumps(
                    {
                        "schemaVersion": 2,
                        "mediaType": OCI_MANIFEST,
                        "config": {
                            "mediaType": OCI_CONFIG,
                            "size": len(config),
                            "digest": _sha256(config),
                        },
                        "layers": [
                            {
                                "mediaType": OCI_LAYER,
                                "size": len(layer.compressed),
                                "digest": layer.digest,
                            }
                        ],
                    }
                ).encode()
                _put_manifest(
                    session, self.url, repository, _sha256(manifest), manifest, OCI_MANIFEST
                )
                entries.append(
                    {
                        "mediaType": OCI_MANIFEST,
                        "size": len(manifest),
                        "digest": _sha256(manifest),
                        "platform": named,
                    }
                )
                ids[f"{architecture}/{variant}"] = _sha256(config)
            index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
            _put_manifest(session, self.url, repository, tag, index.encode(), OCI_INDEX)
        return ids

    def push_sized(self, repository: str, tag: str, layer_sizes: list[int]) -> str:
        """Pushes an image whose layers each hold one file of random bytes of the given size."""
        layers = [
            make_layer({f"blob{i}.bin": os.urandom(size)}) for i, size in enumerate(layer_sizes)
        ]
        push_image(self.url, repository, tag, layers, login=self.login)
        return f"{self.address}/{repository}:{tag}"


@dataclass(frozen=True)
class Layer:
    compressed: bytes
    diff_id: str  # sha256 of the uncompressed tar

    @property
    def digest(self) -> str:
        return _sha256(self.compressed)


def make_layer(files: dict[str, bytes]) -> Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    uncompressed = raw.getvalue()
    return Layer(
        compressed=gzip.compress(uncompressed, compresslevel=1, mtime=0),
        diff_id=_sha256(uncompressed),
    )


def push_image(
    registry_url: str,
    repository: str,
    tag: str,
    layers: list[Layer],
    manifest_indent: int | None = None,
    login: Login | None = None,
) -> str:
    """Uploads layers, config and a schema-2 manifest; returns the manifest digest.
    ``login``: sent with every request, for a registry that requires one."""
    config = json.dumps(
        {
            "architecture": _docker_architecture(),
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": "puller localcluster"} for _ in layers],
        }
    ).encode()
    with requests.Session() as session:
        if login is not None:
            session.auth = login.basic
        for layer in layers:
            _upload_blob(session, registry_url, repository, layer.compressed)
        _upload_blob(session, registry_url, repository, config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_V2,
                "config": {"mediaType": CONFIG_V1, "size": len(config), "digest": _sha256(config)},
                "layers": [
                    {
                        "mediaType": LAYER_TAR_GZIP,
                        "size": len(layer.compressed),
                        "digest": layer.digest,
                    }
                    for layer in layers
                ],
            },
            indent=manifest_indent,
        ).encode()
        response = session.put(
            f"{registry_url}/v2/{repository}/manifests/{tag}",
            data=manifest,
            headers={"Content-Type": MANIFEST_V2},
            timeout=60,
        )
        response.raise_for_status()
    return _sha256(manifest)


def _upload_blob(
    session: requests.Session, registry_url: str, repository: str, blob: bytes
) -> None:
    digest = _sha256(blob)
    if (
        session.head(f"{registry_url}/v2/{repository}/blobs/{digest}", timeout=30).status_code
        == 200
    ):
        return
    started = session.post(f"{registry_url}/v2/{repository}/blobs/uploads/", timeout=30)
    started.raise_for_status()
    location = urljoin(registry_url, started.headers["Location"])
    separator = "&" if "?" in location else "?"
    finished = session.put(
        f"{location}{separator}digest={digest}",
        data=blob,
        headers={"Content-Type": "application/octet-stream"},
        timeout=300,
    )
    finished.raise_for_status()


def _put_manifest(
    session: requests.Session,
    registry_url: str,
    repository: str,
    reference: str,
    manifest: bytes,
    media_type: str,
) -> None:
    response = session.put(
        f"{registry_url}/v2/{repository}/manifests/{reference}",
        data=manifest,
        headers={"Content-Type": media_type},
        timeout=60,
    )
    response.raise_for_status()


def write_htpasswd(path: Path, login: Login) -> None:
    """Writes an htpasswd file with ``login``'s bcrypt hash (the one hash the registry
    takes), made by ``htpasswd`` from Debian's ``apache2-utils``. The password goes in on
    stdin, never on a command line."""
    made = subprocess.run(
        ["htpasswd", "-B", "-i", "-n", login.user],
        input=login.password.encode(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    if made.returncode != 0:
        raise RuntimeError(
            f"htpasswd failed (exit {made.returncode}): {made.stderr.decode(errors='replace')}"
        )
    path.write_bytes(b"")
    path.chmod(0o600)
    path.write_bytes(made.stdout)


def docker_config(directory: Path, registry_address: str, user: str, password: str) -> Path:
    """Writes ``directory/config.json``, a docker client configuration holding a login for
    ``registry_address`` (``HOST:PORT``, as image names spell it), readable by its owner
    only; returns ``directory``, the value for ``DOCKER_CONFIG``. Writes the file whole
    (a new file renamed into place), so a reader never sees half of it."""
    directory.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    content = json.dumps({"auths": {registry_address: {"auth": token}}}, indent=2)
    partial = directory / ".config.json.new"
    partial.write_bytes(b"")
    partial.chmod(0o600)
    partial.write_text(content)
    partial.replace(directory / "config.json")
    return directory


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _docker_architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
