"""Registry logins: what a worker logs in to a registry with, from a docker client
``config.json``, whichever image store pulls.

The Docker Engine takes a login as its ``X-Registry-Auth`` header (:attr:`RegistryLogin.header`);
containerd's ``ctr`` takes a user name and a password (:attr:`RegistryLogin.basic`). The file
is read again at every pull, so a rotated Kubernetes Secret is used from the next pull on.
No credential ever goes into a message, a log line or a ``repr``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docker.auth import AuthConfig

MAX_CONFIG_BYTES = 1024 * 1024
"""The largest config.json read (a Kubernetes Secret holds at most 1 MiB); it is read at
every pull."""


@dataclass(frozen=True)
class BasicLogin:
    """A user name and a password; the password is left out of ``repr`` (and so out of a
    traceback's view of a frame that holds one)."""

    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RegistryLogin:
    """What the worker has to log in to one registry with, as one pull uses it. Its ``repr``
    and every text made from it leave the credentials out."""

    registry: str
    header: str | None = field(repr=False)
    """The engine's ``X-Registry-Auth`` value; ``None``: pull without a login."""
    source: str
    """Where it was looked for, for messages: ``PATH (DOCKER_CONFIG=DIR)`` or
    ``PATH (DOCKER_CONFIG unset)``."""
    problem: str | None = None
    """Why there is none (``header`` is ``None``): no file, no entry, an unreadable file."""
    basic: BasicLogin | None = field(default=None, repr=False)
    """The user name and password, for a client that logs in itself (``ctr``); ``None``
    for no login, or one that is an identity token (``basic_problem`` says so)."""

    @property
    def basic_problem(self) -> str | None:
        """Why a client that can only send a user name and password has no login here."""
        if self.basic is not None:
            return None
        if self.header is not None:
            return (
                f"the login for {self.registry} is an identity token, and containerd's ctr "
                "can only send a user name and password"
            )
        return self.problem


class DockerConfig:
    """A docker client ``config.json`` (``auths``, or ``credsStore``/``credHelpers`` as the
    docker SDK supports them) that the worker logs in to registries with.

    ``directory``: the ``DOCKER_CONFIG`` directory; ``None``: ``~/.docker``, as the docker
    CLI and SDK look when it is unset. The file is read at every pull (a few kilobytes at
    most, nothing beside a pull), so credentials mounted or rotated after the worker
    started (a Kubernetes Secret) are used from the next pull on, with no restart. A file
    that cannot be read counts as no login, and messages say why.
    """

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        # As the docker SDK looks; Path.home() would raise for a user with no home at all.
        home = Path(os.path.expanduser("~"))
        self.path = (directory or home / ".docker") / "config.json"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> DockerConfig:
        """From ``DOCKER_CONFIG`` (unset or empty: ``~/.docker``)."""
        directory = (os.environ if environ is None else environ).get("DOCKER_CONFIG")
        return cls(Path(directory) if directory else None)

    def describe(self) -> str:
        """The file and how it was chosen, for messages."""
        if self._directory is None:
            return f"{self.path} (DOCKER_CONFIG unset)"
        return f"{self.path} (DOCKER_CONFIG={self._directory})"

    def login(self, registry: str) -> RegistryLogin:
        """The login for ``registry`` (``HOST[:PORT]``, as image names spell it); never
        raises."""
        try:
            auths = _read_docker_config(self.path)
            helper = auths.get_credential_store(registry)
            if helper and shutil.which(f"docker-credential-{helper}") is None:
                raise _UnusableConfig(
                    f"its credential helper docker-credential-{helper} is not on PATH"
                )
            found = auths.resolve_authconfig(registry)
        except _UnusableConfig as unusable:
            return RegistryLogin(registry, None, self.describe(), str(unusable))
        except Exception as error:  # a credential helper failed
            problem = f"its credential helper failed ({type(error).__name__})"
            return RegistryLogin(registry, None, self.describe(), problem)
        if not found:
            return RegistryLogin(registry, None, self.describe(), f"no login for {registry}")
        from docker.auth import encode_header  # noqa: PLC0415 (see _read_docker_config)

        header = encode_header(found).decode("ascii")
        return RegistryLogin(registry, header, self.describe(), basic=_user_and_password(found))


def _user_and_password(found: Mapping[str, object]) -> BasicLogin | None:
    """The user name and password of a login as the docker SDK resolves it (``auths``
    entries say ``username``, credential helpers ``Username``); ``None`` for an identity
    token, or a login with no user name."""
    user = found.get("username", found.get("Username"))
    password = found.get("password", found.get("Password"))
    if not isinstance(user, str) or not user or not isinstance(password, str):
        return None
    return BasicLogin(user, password)


class _UnusableConfig(Exception):
    """Why a docker config.json gives no logins. Never quotes the file: it holds secrets."""


def _read_docker_config(path: Path) -> AuthConfig:
    """The logins in ``path``; raises :class:`_UnusableConfig`. The reasons name an
    exception's type only: its text could quote the file, credentials and all. The docker
    SDK (8 MB of a worker's memory, with requests) is imported only once there is a file."""
    try:
        # Not blocking: a FIFO or a device put there must not hang the pull that reads it.
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _UnusableConfig("no such file") from None
    except OSError as error:
        raise _UnusableConfig(f"it cannot be read ({type(error).__name__})") from None
    try:
        with os.fdopen(handle, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise _UnusableConfig("it is not a regular file")
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise _UnusableConfig(f"it cannot be read ({type(error).__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise _UnusableConfig(f"it is larger than {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        content = json.loads(raw)
    except (ValueError, RecursionError):
        raise _UnusableConfig("it is not JSON") from None
    if not isinstance(content, dict):
        raise _UnusableConfig("it is not a JSON object")
    from docker.auth import AuthConfig, load_config  # noqa: PLC0415
    from docker.errors import DockerException  # noqa: PLC0415

    if not content:  # the SDK would go and look for another file
        return AuthConfig({})
    try:
        return load_config(config_dict=content)
    except (DockerException, ValueError, TypeError, AttributeError) as error:
        raise _UnusableConfig(
            f"its auths are not docker logins ({type(error).__name__}; each needs "
            '"auth": base64 of USER:PASSWORD)'
        ) from None


def login_advice(registry: str, login: RegistryLogin | None, *, basic_only: bool = False) -> str:
    """What to do about a registry that wants a login, from what the worker sent it.
    ``basic_only``: the client can send only a user name and password (``ctr``)."""
    sent = login is not None and (login.basic if basic_only else login.header) is not None
    if login is not None and sent:
        return (
            f"registry {registry} refused the worker's login from {login.source}, or that "
            f"login may not pull this repository: correct the credentials for {registry} "
            "there (read again at each pull)"
        )
    advice = (
        f"registry {registry} needs a login: give the worker a docker config.json with "
        f"credentials for it (DOCKER_CONFIG=dir; read again at each pull)"
    )
    if login is None:
        return advice
    problem = login.basic_problem if basic_only else login.problem
    return f"{advice}; the worker looked in {login.source}: {problem}"
