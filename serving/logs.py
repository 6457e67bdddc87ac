"""Logging for puller's programs: structlog to stdout, JSON unless a person is watching.

Applications (``puller-worker``, ``puller-http``) call :func:`configure_logging` once;
the libraries (``publisher``) only log through the standard ``logging`` module, so the
host application decides what is shown.

structlog's own lines (the programs' ``structlog.get_logger``) are rendered by structlog
and written straight to the handler's stream, under the handler's lock; only lines from
standard-library loggers (pika, docker, the publisher) make a ``LogRecord`` and go through
the handler's formatter. A worker writes a line for every request it answers, and the
standard library's way (a record, the caller's frame looked up, the record copied by the
formatter) cost about three times as much as rendering it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

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
    fields = dict(always or {})
    # Lines from standard-library loggers: structlog's own processors, one at a time.
    foreign: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _Always(fields),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    # structlog's own lines (the worker writes one per request): the same fields in one
    # step. No contextvars: puller binds none.
    own: list[Processor] = [_Stamp(fields)]
    renderer: Processor
    if as_json:
        # Tracebacks without the frames' local variables (structlog shows them by default):
        # a frame that holds a registry password or a broker URL must not put it in a log.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        foreign.append(tracebacks)
        own.append(tracebacks)
        renderer = structlog.processors.JSONRenderer(_LineEncoder().dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=foreign,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every connection step at INFO; its warnings and errors are what matter.
    logging.getLogger("pika").setLevel(logging.WARNING)
    # waitress warns for every request that waits for a free thread: a flood of requests
    # would flood the log.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    structlog.configure(
        processors=[*own, renderer],
        logger_factory=_LineWriters(handler),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )


class _LineEncoder:
    """``json.dumps`` for the JSON renderer, with its encoder kept: called with arguments,
    ``json.dumps`` builds an encoder for every line. The renderer passes structlog's own
    fallback as ``default`` each time; the encoder is made again only if that changes."""

    def __init__(self) -> None:
        self._default: Callable[[Any], Any] | None = None
        self._encoder = json.JSONEncoder()

    def dumps(
        self, event: object, default: Callable[[Any], Any] | None = None, **_rest: object
    ) -> str:
        if default is not self._default:
            self._default, self._encoder = default, json.JSONEncoder(default=default)
        return self._encoder.encode(event)


_LEVEL_NAMES = {"warn": "warning", "exception": "error"}


class _Stamp:
    """What ``_Always``, ``add_log_level``, ``add_logger_name`` and ``TimeStamper(fmt="iso",
    utc=True)`` add to a line, in that order and in their words, as one processor. The
    time's date and seconds are formatted once a second."""

    def __init__(self, always: dict[str, object]) -> None:
        self._always = tuple(always.items())
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        for key, value in self._always:
            event.setdefault(key, value)
        event["level"] = _LEVEL_NAMES.get(name, name)
        event["logger"] = getattr(logger, "name", None)
        now = time.time()
        second, prefix = self._second
        if int(now) != second:
            second = int(now)
            prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, prefix)
        event["timestamp"] = f"{prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


class _Always:
    def __init__(self, fields: dict[str, object]) -> None:
        self._fields = fields

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        for key, value in self._fields.items():
            event.setdefault(key, value)
        return event


class _LineWriter:
    """Where structlog's rendered lines go: the handler's stream, one write and a flush a
    line, under the handler's lock (as the handler writes its own lines, so the two never
    interleave). ``name`` is the logger's (``add_logger_name`` reads it)."""

    def __init__(self, handler: logging.StreamHandler[TextIO], name: str) -> None:
        self.name = name
        self._handler = handler

    def msg(self, line: str) -> None:
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(line + "\n")
            handler.stream.flush()
        except Exception:  # as the handler does: a log line never breaks the program
            handler.handleError(logging.makeLogRecord({"msg": line}))
        finally:
            handler.release()

    debug = info = warning = warn = error = critical = fatal = exception = msg


class _LineWriters:
    """structlog's logger factory: ``structlog.get_logger(name)`` writes through ``handler``."""

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self._handler = handler

    def __call__(self, *args: Any) -> _LineWriter:
        return _LineWriter(self._handler, str(args[0]) if args else "")
