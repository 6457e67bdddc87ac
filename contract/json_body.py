"""A message body as the contract reads it: size, strict JSON, nesting, version and type
checked before any field is (see :mod:`contract.messages`)."""

from __future__ import annotations

import json
from typing import Any

from contract.errors import InvalidMessage
from contract.fields import json_type

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024
MAX_JSON_DEPTH = 32
"""Deeper nesting than this is refused before it is parsed."""


def load_body(
    body: bytes, expected_type: str | None, max_bytes: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """The body's fields, checked for size (``max_bytes``), JSON, version and (unless
    ``None``) type.

    Strict JSON: ``NaN`` and ``Infinity`` are refused, and so is nesting deeper than
    :data:`MAX_JSON_DEPTH`, before it is parsed.
    """
    if not isinstance(body, bytes | bytearray):
        raise InvalidMessage(f"a message body must be bytes, not {type(body).__name__}")
    if len(body) > max_bytes:
        raise InvalidMessage(f"the message is {len(body)} bytes; at most {max_bytes} are allowed")
    try:
        text = (body if type(body) is bytes else bytes(body)).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("the message body is not UTF-8 text") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nesting(text) > MAX_JSON_DEPTH:
        raise InvalidMessage(f"the message body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        fields = _DECODER.decode(text)
    except _NotStrictJson as error:
        raise InvalidMessage(f"the message body is not JSON: {error} is not a JSON value") from None
    except json.JSONDecodeError:
        raise InvalidMessage("the message body is not JSON") from None
    except (ValueError, RecursionError):  # an integer of 4,300 digits or more
        raise InvalidMessage("the message body holds a number with too many digits") from None
    if not isinstance(fields, dict):
        raise InvalidMessage(f"the message body must be a JSON object, not {json_type(fields)}")
    version = fields.get("version")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise InvalidMessage(
            f"unsupported contract version {short(version)}; "
            f"this side speaks version {PROTOCOL_VERSION}"
        )
    if expected_type is not None and fields.get("type") != expected_type:
        raise InvalidMessage(
            f"expected a message of type {expected_type!r}, got {short(fields.get('type'))}"
        )
    return fields


class _NotStrictJson(ValueError):
    pass


def _refuse_constant(name: str) -> object:
    raise _NotStrictJson(name)


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
"""Strict JSON, made once (``json.loads`` with an argument builds a decoder per call)."""


def _nesting(text: str) -> int:
    """How deep arrays and objects nest (brackets inside strings are counted too: an
    over-estimate only refuses bodies no puller message comes close to)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def short(value: object) -> str:
    """``value``'s repr, cut to 40 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."
