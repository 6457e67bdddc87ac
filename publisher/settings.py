"""What a publisher reads from the environment when its caller does not say: the broker, its
TLS files and the image policy. The CLI and the HTTP API read the same rows."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from serving.settings import BrokerAndPolicy, Setting, read, settings_of

__all__ = ["SETTINGS", "PublisherSettings"]


@dataclass(frozen=True)
class PublisherSettings(BrokerAndPolicy):
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PublisherSettings:
        """Raises :class:`serving.settings.InvalidSetting` naming the variable at fault.
        Whether the TLS files fit the URL is checked once the caller's own are known."""
        return read(cls, SETTINGS, os.environ if env is None else env)


SETTINGS: tuple[Setting, ...] = settings_of(PublisherSettings)
