"""Settings from the environment, one table per program.

A program's settings are a frozen dataclass plus a table of :class:`Setting` rows (variable,
attribute, help, parser, bounds). :func:`read` builds the dataclass from the environment,
:func:`environment_help` writes ``--help``'s list; tests check the README's table and the
deployment manifests against the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from contract import DEFAULT_AMQP_URL, Misconfigured
from contract.connection import BrokerTls, check_url
from contract.policy import ALLOWED_IMAGES as ALLOWED_IMAGES_ENV
from contract.policy import REQUIRE_DIGEST as REQUIRE_DIGEST_ENV
from contract.policy import ImagePolicy, allowed_prefixes

T = TypeVar("T")


class InvalidSetting(Misconfigured):
    """An environment variable holds a value the program cannot use."""


@dataclass(frozen=True)
class Setting:
    env: str
    attribute: str
    help: str
    parse: Callable[[str], Any] = str
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False
    """A secret may also come from a file named by ``{env}_FILE`` (a mounted Kubernetes
    Secret), and its value is never repeated in an error."""

    @property
    def file_env(self) -> str:
        return f"{self.env}_FILE"

    def read(self, text: str) -> Any:
        shown = "(hidden)" if self.secret else repr(text)
        try:
            value = self.parse(text)
        except ValueError as error:
            raise InvalidSetting(f"{self.env}={shown}: {error}") from None
        if self.minimum is not None and value < self.minimum:
            raise InvalidSetting(f"{self.env}={shown} must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidSetting(f"{self.env}={shown} must be at most {self.maximum:g}")
        return value

    def text(self, env: Mapping[str, str]) -> str:
        """The variable's text, or for a secret the content of its ``_FILE``; ``""`` when
        unset. Raises :class:`InvalidSetting` when both are set or the file cannot be read."""
        text = env.get(self.env, "").strip()
        if not self.secret:
            return text
        path = env.get(self.file_env, "").strip()
        if not path:
            return text
        if text:
            raise InvalidSetting(f"set {self.env} or {self.file_env}, not both")
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise InvalidSetting(f"{self.file_env}={path!r} cannot be read: {reason}") from None
        if not value:  # never the default instead: it would be another broker, as guest
            raise InvalidSetting(f"{self.file_env}={path!r} is empty")
        return value


def read(cls: type[T], table: Sequence[Setting], env: Mapping[str, str]) -> T:
    """``cls`` built from ``env``: each variable that is set and not blank, else the default.
    Raises :class:`InvalidSetting` naming the variable and saying what is wrong."""
    values: dict[str, Any] = {}
    for setting in table:
        text = setting.text(env)
        if text:
            values[setting.attribute] = setting.read(text)
    return cls(**values)


def check_table(cls: type, table: Sequence[Setting]) -> None:
    """Every field of ``cls`` has exactly one row (called where the table is defined)."""
    attributes = [s.attribute for s in table]
    if sorted(attributes) != sorted(f.name for f in fields(cls)):
        raise AssertionError(f"{cls.__name__}: every field needs exactly one row in its table")


def environment_help(table: Sequence[Setting], defaults: object) -> str:
    """The variables with their defaults, for ``--help``."""
    width = max(len(s.env) for s in table)
    lines = ["environment:"]
    for setting in table:
        default = getattr(defaults, setting.attribute)
        lines.append(f"  {setting.env:<{width}}  {setting.help.replace('`', '')} ({default})")
    return "\n".join(lines)


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not a whole number") from None


def boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected {', '.join(allowed[:-1])} or {allowed[-1]}")
        return text

    parse.__name__ = "choice"
    return parse


LOG_FORMATS = ("auto", "json", "console")
log_format = choice(*LOG_FORMATS)

LOG_FORMAT = Setting(
    "PULLER_LOG_FORMAT",
    "log_format",
    "`json`, `console`, or `auto` (console on a terminal, JSON lines otherwise)",
    log_format,
)
"""The same row in every program's table."""


# -- rows every program that talks to RabbitMQ shares ------------------------------------------


def amqp_url(text: str) -> str:
    """A URL pika can use, checked without ever repeating it (it holds a password)."""
    check_url(text)
    return text


AMQP_URL = Setting(
    "PULLER_AMQP_URL",
    "amqp_url",
    "RabbitMQ, `amqp://` or `amqps://` (TLS), or several nodes of one cluster, "
    "comma-separated; or a file with it in `PULLER_AMQP_URL_FILE`",
    amqp_url,
    secret=True,
)
TLS_CA_FILE = Setting(
    "PULLER_TLS_CA_FILE",
    "tls_ca_file",
    "for `amqps://`: the CA that signed RabbitMQ's certificate (unset: the system's CAs)",
    Path,
)
TLS_CERT_FILE = Setting(
    "PULLER_TLS_CERT_FILE",
    "tls_cert_file",
    "for `amqps://`: a client certificate, when RabbitMQ asks for one",
    Path,
)
TLS_KEY_FILE = Setting(
    "PULLER_TLS_KEY_FILE", "tls_key_file", "for `amqps://`: the client certificate's key", Path
)
BROKER_ROWS = (AMQP_URL, TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE)
"""Rows of :class:`BrokerAndPolicy`'s broker fields."""

ALLOWED_IMAGES = Setting(
    ALLOWED_IMAGES_ENV,
    "allowed_images",
    "comma-separated normalised prefixes of the images that may be pulled, e.g. "
    "`docker.io/cyberdojofoundation/`; unset: every image",
    allowed_prefixes,
)
REQUIRE_DIGEST = Setting(
    REQUIRE_DIGEST_ENV,
    "require_digest",
    "`true`: only `NAME@sha256:...` references may be pulled",
    boolean,
)
POLICY_ROWS = (ALLOWED_IMAGES, REQUIRE_DIGEST)
"""Rows of :class:`BrokerAndPolicy`'s policy fields."""


@dataclass(frozen=True)
class BrokerAndPolicy:
    """The fields of :data:`BROKER_ROWS` and :data:`POLICY_ROWS`: every program that talks to
    RabbitMQ builds its settings on these."""

    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)  # it holds a password
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allowed_images: tuple[str, ...] = ()
    """Normalised repository prefixes; empty: every image (see :mod:`contract.policy`)."""
    require_digest: bool = False


def broker_tls(settings: BrokerAndPolicy) -> BrokerTls:
    """The TLS files of ``settings``; raises :class:`InvalidSetting` when they do not fit the
    URL (TLS files with ``amqp://``, a missing file, a certificate without its key)."""
    tls = BrokerTls(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
    problem = tls.problem(settings.amqp_url)
    if problem is None and tls.configured:
        try:
            tls.context()  # unreadable or mismatched files: said at start, not at connect
        except ValueError as error:
            problem = str(error)
    if problem is not None:
        raise InvalidSetting(f"{AMQP_URL.env} / PULLER_TLS_*: {problem}")
    return tls


def image_policy(settings: BrokerAndPolicy) -> ImagePolicy:
    return ImagePolicy(settings.allowed_images, settings.require_digest)
