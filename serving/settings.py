"""Settings from the environment, one table per program.

A program's settings are a frozen dataclass plus a table of :class:`Setting` rows (variable,
attribute, help, parser, bounds). :func:`read` builds the dataclass from the environment,
:func:`environment_help` writes ``--help``'s list; tests check the README's table and the
deployment manifests against the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from contract import PullerError

T = TypeVar("T")


class InvalidSetting(PullerError):
    """An environment variable holds a value the program cannot use."""


@dataclass(frozen=True)
class Setting:
    env: str
    attribute: str
    help: str
    parse: Callable[[str], Any] = str
    minimum: float | None = None
    maximum: float | None = None

    def read(self, text: str) -> Any:
        try:
            value = self.parse(text)
        except ValueError as error:
            raise InvalidSetting(f"{self.env}={text!r}: {error}") from None
        if self.minimum is not None and value < self.minimum:
            raise InvalidSetting(f"{self.env}={text!r} must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidSetting(f"{self.env}={text!r} must be at most {self.maximum:g}")
        return value


def read(cls: type[T], table: Sequence[Setting], env: Mapping[str, str]) -> T:
    """``cls`` built from ``env``: each variable that is set and not blank, else the default.
    Raises :class:`InvalidSetting` naming the variable and saying what is wrong."""
    values: dict[str, Any] = {}
    for setting in table:
        text = env.get(setting.env, "").strip()
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
