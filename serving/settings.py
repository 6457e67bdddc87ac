"""Settings from the environment, each declared once.

A program's settings are a frozen dataclass whose every field is declared with
:func:`setting`: the variable's name, its parser and bounds, the default, what it is for,
and whether it is a secret (which may then come from the file named by ``NAME_FILE``).
From those declarations come the program's settings (:func:`read`), ``--help``'s list
(:func:`environment_help`) and the tables of docs/configuration.md (:func:`markdown_table`;
``python -m serving.settings docs/configuration.md`` writes them, a test checks them).
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from contract import DEFAULT_AMQP_URL, Misconfigured
from contract.connection import BrokerTls, check_url
from contract.policy import ALLOWED_IMAGES as ALLOWED_IMAGES_ENV
from contract.policy import REQUIRE_DIGEST as REQUIRE_DIGEST_ENV
from contract.policy import ImagePolicy, allowed_prefixes

T = TypeVar("T")

DECLARATION = "puller.setting"
"""The key of a field's metadata that holds its :class:`Setting`."""


class InvalidSetting(Misconfigured):
    """An environment variable holds a value the program cannot use."""


@dataclass(frozen=True)
class Setting:
    """One environment variable: what :func:`setting` declares, with the field it fills."""

    env: str
    attribute: str
    help: str
    parse: Callable[[str], Any] = str
    minimum: float | None = None
    maximum: float | None = None
    secret: bool = False
    """A secret may also come from a file named by ``{env}_FILE`` (a mounted Kubernetes
    Secret), and its value is never repeated in an error."""
    unset: str | None = None
    """What the program does when the variable is unset, in words, where the default value
    says nothing (``None``, empty, or worked out at start)."""
    default: Any = None
    computed: bool = False
    """The default is worked out when the settings are made (``unset`` says what it is)."""

    @property
    def file_env(self) -> str:
        return f"{self.env}_FILE"

    @property
    def meaning(self) -> str:
        """The help, with the bounds and the ``_FILE`` form of a secret."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            bounds = f"; {low:g} to {high:g}"
        elif low is not None or high is not None:
            bounds = f"; at least {low:g}" if low is not None else f"; at most {high:g}"
        else:
            bounds = ""
        secret = f"; or `{self.file_env}`: a file holding it (a mounted Secret)"
        return self.help + bounds + (secret if self.secret else "")

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


def setting(
    env: str,
    parse: Callable[[str], T],
    default: T,
    *,
    help: str,
    unset: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
) -> T:
    """A settings dataclass's field, read from ``env`` with ``parse`` (``ValueError`` says what
    is wrong) within ``minimum`` and ``maximum``; ``default`` when unset or blank."""
    declared = Setting(env, "", help, parse, minimum, maximum, secret, unset, default)
    return field(default=default, repr=not secret, metadata={DECLARATION: declared})


def computed_setting(
    env: str, parse: Callable[[str], T], default: Callable[[], T], *, help: str, unset: str
) -> T:
    """As :func:`setting`, for a default worked out when the settings are made (``unset``
    says what it is, for ``--help`` and the docs)."""
    declared = Setting(env, "", help, parse, unset=unset, computed=True)
    return field(default_factory=default, metadata={DECLARATION: declared})


def settings_of(cls: type) -> tuple[Setting, ...]:
    """The declarations of ``cls``'s fields, in their order; every field needs one."""
    table = []
    for each in fields(cls):
        declared = each.metadata.get(DECLARATION)
        if declared is None:
            raise TypeError(f"{cls.__name__}.{each.name} is not declared with setting()")
        table.append(replace(declared, attribute=each.name))
    return tuple(table)


def read(cls: type[T], table: Sequence[Setting], env: Mapping[str, str]) -> T:
    """``cls`` built from ``env``: each variable that is set and not blank, else the default.
    Raises :class:`InvalidSetting` naming the variable and saying what is wrong."""
    values: dict[str, Any] = {}
    for declared in table:
        text = declared.text(env)
        if text:
            values[declared.attribute] = declared.read(text)
    return cls(**values)


def _unset(declared: Setting) -> bool:
    """Whether the default says nothing by itself (``unset`` says it in words)."""
    value = declared.default
    return declared.computed or value is None or value in ((), frozenset())


def environment_help(cls: type) -> str:
    """The variables of ``cls`` with their defaults, for ``--help``."""
    table = settings_of(cls)
    width = max(len(s.env) for s in table)
    lines = ["environment:"]
    for declared in table:
        default = (declared.unset or "unset") if _unset(declared) else str(declared.default)
        text = f"{declared.meaning} ({default})".replace("`", "")
        lines += textwrap.wrap(
            text,
            width=100,
            initial_indent=f"  {declared.env:<{width}}  ",
            subsequent_indent=" " * (width + 4),
            break_on_hyphens=False,
        )
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A default as the docs show it."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple | frozenset):
        value = ",".join(map(str, value))
    return f"`{value}`"


def markdown_table(cls: type) -> str:
    """The variables of ``cls`` as the table of docs/configuration.md."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for declared in settings_of(cls):
        default = (declared.unset or "unset") if _unset(declared) else _shown(declared.default)
        meaning = declared.meaning.replace("|", "\\|")
        lines.append(f"| `{declared.env}` | {default} | {meaning} |")
    return "\n".join(lines)


TABLE = re.compile(
    r"(?P<head><!-- settings table of (?P<cls>[\w.]+:\w+)[^>]*-->\n)"
    r"(?P<table>.*?)(?P<end><!-- end of table -->)",
    re.DOTALL,
)
"""Where a document holds a generated table: between ``<!-- settings table of
MODULE:CLASS ... -->`` and ``<!-- end of table -->``."""


def with_tables(document: str) -> str:
    """``document`` with every marked table written afresh from its class."""

    def table(found: re.Match[str]) -> str:
        module, _, name = found["cls"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        return f"{found['head']}{markdown_table(cls)}\n{found['end']}"

    return TABLE.sub(table, document)


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


def log_format_setting() -> str:
    """The ``PULLER_LOG_FORMAT`` field every program has."""
    return setting(
        "PULLER_LOG_FORMAT",
        log_format,
        "auto",
        help="`json`, `console`, or `auto` (console on a terminal, JSON lines otherwise)",
    )


def amqp_url(text: str) -> str:
    """A URL pika can use, checked without ever repeating it (it holds a password)."""
    check_url(text)
    return text


@dataclass(frozen=True)
class BrokerAndPolicy:
    """RabbitMQ and the image policy: every program that talks to RabbitMQ builds its
    settings on these."""

    amqp_url: str = setting(
        "PULLER_AMQP_URL",
        amqp_url,
        DEFAULT_AMQP_URL,
        help="RabbitMQ, `amqp://` or `amqps://` (TLS); several nodes of one RabbitMQ cluster "
        "separated by commas: the first that answers is used (a worker tries them in its own "
        "order, `PULLER_BROKER_ORDER`), and a lost connection fails over to the next at once "
        "(the log says which broker)",
        secret=True,
    )
    tls_ca_file: Path | None = setting(
        "PULLER_TLS_CA_FILE",
        Path,
        None,
        help="for `amqps://`: the CA that signed RabbitMQ's certificate (its host name is "
        "checked too)",
        unset="the system's CAs",
    )
    tls_cert_file: Path | None = setting(
        "PULLER_TLS_CERT_FILE",
        Path,
        None,
        help="for `amqps://`: a client certificate, when RabbitMQ asks for one",
        unset="none",
    )
    tls_key_file: Path | None = setting(
        "PULLER_TLS_KEY_FILE",
        Path,
        None,
        help="for `amqps://`: the client certificate's key",
        unset="none",
    )
    allowed_images: tuple[str, ...] = setting(
        ALLOWED_IMAGES_ENV,
        allowed_prefixes,
        (),
        help="comma-separated normalised prefixes of the images that may be pulled, e.g. "
        "`docker.io/cyberdojofoundation/`; others are refused (`forbidden`)",
        unset="every image; a worker warns at start",
    )
    """Normalised repository prefixes; empty: every image (see :mod:`contract.policy`)."""
    require_digest: bool = setting(
        REQUIRE_DIGEST_ENV,
        boolean,
        False,
        help="`true`: only `NAME@sha256:...` references may be pulled; others are refused "
        "(`forbidden`)",
    )


BROKER_ROWS = settings_of(BrokerAndPolicy)[:4]
"""The broker's declarations: URL and TLS files."""
AMQP_URL = BROKER_ROWS[0]


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


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.settings FILE...``: writes the settings tables of each file afresh
    (``--check``: says which are stale, and exits 1)."""
    parser = argparse.ArgumentParser(prog="python -m serving.settings", description=main.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        fresh = with_tables(text)
        if fresh != text:
            stale.append(path)
            if not args.check:
                path.write_text(fresh, encoding="utf-8")
    for path in stale:
        print(f"{path}: {'stale' if args.check else 'written'}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
