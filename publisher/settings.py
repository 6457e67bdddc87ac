"""What a publisher reads from the environment when its caller does not say: the broker, its
TLS files and the image policy. The CLI and the HTTP API read the same rows."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from contract import DEFAULT_AMQP_URL
from serving.settings import BROKER_ROWS, POLICY_ROWS, Setting, check_table, read

__all__ = ["SETTINGS", "PublisherSettings"]


@dataclass(frozen=True)
class PublisherSettings:
    amqp_url: str = DEFAULT_AMQP_URL
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allowed_images: tuple[str, ...] = ()
    require_digest: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PublisherSettings:
        """Raises :class:`serving.settings.InvalidSetting` naming the variable at fault.
        Whether the TLS files fit the URL is checked once the caller's own are known."""
        return read(cls, SETTINGS, os.environ if env is None else env)


SETTINGS: tuple[Setting, ...] = (*BROKER_ROWS, *POLICY_ROWS)

check_table(PublisherSettings, SETTINGS)
