"""Logging for puller's programs: structlog to stdout, JSON unless a person is watching.

Applications (``puller-worker``, ``puller-http``) call :func:`configure_logging` once;
the libraries (``publisher``) only log through the standard ``logging`` module, so the
host application decides what is shown.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger


def configure_logging(
    log_format: str = "auto",
    level: int = logging.INFO,
    always: Mapping[str, object] | None = None,
) -> None:
    """``auto`` renders for a terminal when stdout is one, JSON lines otherwise.

    ``always``: fields put on every line, whatever thread or library writes it (the
    worker's ``node``). Standard-library loggers (pika's, docker's, the publisher's) go
    through the same renderer.
    """
    as_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _Always(dict(always or {})),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if as_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every connection step at INFO; its warnings and errors are what matter.
    logging.getLogger("pika").setLevel(logging.WARNING)


class _Always:
    def __init__(self, fields: dict[str, object]) -> None:
        self._fields = fields

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        for key, value in self._fields.items():
            event.setdefault(key, value)
        return event
