"""What a publisher reads from the environment when its caller does not say: the broker, its
TLS files, the image policy and the memory for answers. The CLI and the HTTP API read the
same rows."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from publisher.replies import DEFAULT_ANSWER_MEMORY
from serving.settings import BrokerAndPolicy, Setting, read, setting, settings_of, whole_number

__all__ = ["SETTINGS", "PublisherSettings"]


@dataclass(frozen=True)
class PublisherSettings(BrokerAndPolicy):
    answer_memory_mb: int = setting(
        "PULLER_ANSWER_MEMORY_MB",
        whole_number,
        DEFAULT_ANSWER_MEMORY // 2**20,
        help="megabytes of nodes' answers a publisher keeps for its callers (estimated); past "
        "it the oldest requests no caller waits on are forgotten, and a waited-on request's "
        "further answers are kept as node and status only",
        minimum=1,
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PublisherSettings:
        """Raises :class:`serving.settings.InvalidSetting` naming the variable at fault.
        Whether the TLS files fit the URL is checked once the caller's own are known."""
        return read(cls, SETTINGS, os.environ if env is None else env)


SETTINGS: tuple[Setting, ...] = settings_of(PublisherSettings)
