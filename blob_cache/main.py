"""``puller-blob-cache``: the command line."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from blob_cache.server import CacheSettings, RunningCache
from blob_cache.upstream import upstream_base
from contract import puller_version
from serving.logs import configure_logging
from serving.program import raise_open_file_limit, stop_on_signals

log = structlog.get_logger("blob_cache")
T = TypeVar("T")

_SIZE = re.compile(r"([0-9]+)([KMGT]i?)?B?", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def byte_size(text: str) -> int:
    """``10G``, ``512Mi``, ``1000000``: a number of bytes (K/M/G/T are powers of 1000, Ki, Mi,
    Gi, Ti of 1024); raises ``ValueError``."""
    matched = _SIZE.fullmatch(text.strip())
    if matched is None:
        raise ValueError(f"{text!r} is not a size (e.g. 10G, 512Mi, 1000000)")
    unit = (matched[2] or "").lower()
    scale = 1024 ** (" kmgt".index(unit[0])) if unit.endswith("i") else _UNITS[unit]
    return int(matched[1]) * scale


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:5001`` for IPv6); raises ``ValueError``."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:5001)")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puller-blob-cache",
        description="A pull-through cache for one registry's blobs: each blob crosses the "
        "uplink once, however many nodes ask for it (docs/blob-cache.md).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {puller_version()}")
    parser.add_argument(
        "--upstream", required=True, type=_checked(upstream_base), help="http[s]://HOST[:PORT]"
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:5001",
        type=_checked(listen_address),
        help="HOST:PORT to serve on (default 127.0.0.1:5001; 0.0.0.0:5001 in a pod)",
    )
    parser.add_argument(
        "--dir", required=True, type=Path, help="where blobs are kept (the only place written)"
    )
    parser.add_argument(
        "--max-bytes",
        default="10G",
        type=_checked(byte_size),
        help="evict least recently used blobs beyond this many bytes (default 10G)",
    )
    parser.add_argument(
        "--idle-timeout",
        default=30,
        type=_checked(_positive),
        help="seconds a connection may sit idle, or a client leave a blob unread (default 30)",
    )
    parser.add_argument(
        "--request-timeout",
        default=30,
        type=_checked(_positive),
        help="seconds a request may take to arrive, first byte to last (default 30; then 408)",
    )
    parser.add_argument(
        "--max-connections",
        default=128,
        type=_checked(_positive),
        help="connections held at once, and as many threads; past it the oldest idle one is "
        "closed for each new one (default 128; up to about 0.6 MiB of memory each)",
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse type whose ``ValueError`` message is shown as is."""

    def checked(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return checked


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    host, port = args.listen
    settings = CacheSettings(
        upstream=args.upstream,
        directory=args.dir,
        host=host,
        port=port,
        max_bytes=args.max_bytes,
        idle_timeout=args.idle_timeout,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
    )
    configure_logging(args.log_format)
    stopping = stop_on_signals()
    raise_open_file_limit()
    try:
        cache = RunningCache(settings)
    except OSError as error:
        print(f"puller-blob-cache: cannot start: {error}", file=sys.stderr)
        return 2
    cache.start()
    log.info(
        "blob cache serving",
        upstream=args.upstream,
        listen=f"{host}:{cache.port}",
        dir=str(args.dir),
        max_bytes=args.max_bytes,
        max_connections=cache.max_connections,
        version=puller_version(),
    )
    stopping.wait()
    log.info("blob cache stopping")  # blobs being fetched are fetched again after a restart
    cache.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
