"""How one field of a message is written and checked.

Each message type in :mod:`contract.messages` lists its fields once, as a table of
:class:`Field` rows; encoding, decoding and the JSON a report prints are all driven by
that table. A codec turns a Python value into JSON and back, and says in one line what
is wrong with a value that breaks the contract (:class:`InvalidMessage`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from contract.errors import ErrorKind, InvalidMessage, NodeError
from contract.reference import ImageReference, parse_reference

T = TypeVar("T")
_E = TypeVar("_E", bound=StrEnum)

MAX_ID_LENGTH = 128
MAX_NODE_NAME_LENGTH = 253
MAX_ERROR_MESSAGE_LENGTH = 2000
MAX_TEXT_LENGTH = 1024

_MISSING: Any = object()
_LARGEST = sys.float_info.max


class Codec(Protocol[T]):
    def dump(self, value: T) -> object:
        """The value as JSON (a str, number, bool, None, dict or list)."""
        ...

    def load(self, fields: dict[str, Any], key: str) -> T:
        """The value of ``fields[key]``; raises :class:`InvalidMessage` saying what is wrong."""
        ...


@dataclass(frozen=True)
class Field(Generic[T]):
    """One row of a message's field table."""

    attribute: str
    """The dataclass attribute (and the key in the JSON a report prints)."""
    codec: Codec[T]
    wire: str | None = None
    """The key in the message body, when it differs from ``attribute``."""

    @property
    def key(self) -> str:
        return self.wire or self.attribute


def json_type(value: object) -> str:
    """What a JSON value is, in words, for error messages."""
    return {
        list: "an array",
        dict: "an object",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number")


@dataclass(frozen=True)
class Text:
    max_length: int = MAX_TEXT_LENGTH
    allow_empty: bool = False

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: str) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> str:
        value = fields.get(key)
        if type(value) is str and (value or self.allow_empty) and len(value) <= self.max_length:
            return value  # the common case, checked at once; anything else below
        value = _required(fields, key)
        if not isinstance(value, str):
            raise InvalidMessage(f"{key!r} must be a string, not {json_type(value)}")
        if not value and not self.allow_empty:
            raise InvalidMessage(f"{key!r} is empty")
        if len(value) > self.max_length:
            raise InvalidMessage(f"{key!r} is longer than {self.max_length} characters")
        return value


@dataclass(frozen=True)
class OptionalText:
    """A string, or ``null``/absent for ``None``."""

    max_length: int = MAX_TEXT_LENGTH

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: str | None) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> str | None:
        value = fields.get(key)
        if value is None:
            return None
        if type(value) is str and 0 < len(value) <= self.max_length:
            return value
        return _text(self.max_length).load(fields, key)


@dataclass(frozen=True)
class Identifier:
    """A request, marker or correlation id: 1 to 128 printable ASCII characters."""

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: str) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> str:
        value = _ID_TEXT.load(fields, key)
        if not value.isascii() or not value.isprintable():
            raise InvalidMessage(f"{key!r} must be printable ASCII")
        return value


@dataclass(frozen=True)
class OptionalIdentifier:
    """An identifier, or ``null``/absent for ``None``."""

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: str | None) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> str | None:
        if fields.get(key) is None:
            return None
        return _IDENTIFIER.load(fields, key)


@dataclass(frozen=True)
class Seconds:
    """A finite number, 0 or more (a Unix time or a duration); optional with a default."""

    default: float | None = None

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: float) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> float:
        value = fields.get(key)
        if type(value) is float and 0.0 <= value <= _LARGEST:  # NaN and infinity fail
            return value
        if key not in fields and self.default is not None:
            return self.default
        value = _required(fields, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidMessage(f"{key!r} must be a number, not {json_type(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise InvalidMessage(f"{key!r} is too large a number") from None
        if not math.isfinite(number) or number < 0:
            raise InvalidMessage(f"{key!r} must be a finite, non-negative number")
        return number


@dataclass(frozen=True)
class Count:
    """A whole number, 0 or more; optional (absent from older peers) when it has a default."""

    default: int | None = None
    maximum: int = 2**63 - 1

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: int) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> int:
        if key not in fields and self.default is not None:
            return self.default
        value = _required(fields, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidMessage(f"{key!r} must be a whole number, 0 or more")
        if value > self.maximum:
            raise InvalidMessage(f"{key!r} is larger than {self.maximum}")
        return value


@dataclass(frozen=True)
class OptionalBool:
    """``true``, ``false``, or ``null``/absent for "unknown"."""

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: bool | None) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> bool | None:
        value = fields.get(key)
        if value is not None and not isinstance(value, bool):
            raise InvalidMessage(f"{key!r} must be true, false or null")
        return value


@dataclass(frozen=True)
class Flag:
    """``true`` or ``false``; absent (from older peers) is ``default``."""

    default: bool = False
    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: bool) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> bool:
        value = fields.get(key, self.default)
        if not isinstance(value, bool):
            raise InvalidMessage(f"{key!r} must be true or false")
        return value


@dataclass(frozen=True)
class OptionalSeconds:
    """A finite number, 0 or more, or ``null``/absent for ``None``."""

    dumps_as_is: ClassVar[bool] = True

    def dump(self, value: float | None) -> object:
        return value

    def load(self, fields: dict[str, Any], key: str) -> float | None:
        if fields.get(key) is None:
            return None
        return _SECONDS.load(fields, key)


@dataclass(frozen=True)
class Images:
    """A list of image references (normalised), at most ``max_items``; absent is empty."""

    max_items: int

    def dump(self, value: tuple[ImageReference, ...]) -> object:
        return [str(image) for image in value]

    def load(self, fields: dict[str, Any], key: str) -> tuple[ImageReference, ...]:
        value = fields.get(key, [])
        if not isinstance(value, list):
            raise InvalidMessage(f"{key!r} must be an array, not {json_type(value)}")
        if len(value) > self.max_items:
            raise InvalidMessage(f"{key!r} holds {len(value)} items; at most {self.max_items}")
        return tuple(_IMAGE.load({"item": item}, "item") for item in value)


@dataclass(frozen=True)
class Texts:
    """A list of strings, at most ``max_items``; absent is empty."""

    max_items: int
    max_length: int = MAX_TEXT_LENGTH

    def dump(self, value: tuple[str, ...]) -> object:
        return list(value)

    def load(self, fields: dict[str, Any], key: str) -> tuple[str, ...]:
        value = fields.get(key, [])
        if not isinstance(value, list):
            raise InvalidMessage(f"{key!r} must be an array, not {json_type(value)}")
        if len(value) > self.max_items:
            raise InvalidMessage(f"{key!r} holds {len(value)} items; at most {self.max_items}")
        text = _text(self.max_length)
        return tuple(text.load({key: item}, key) for item in value)


@dataclass(frozen=True)
class Records(Generic[T]):
    """A list of objects, each decoded by ``item`` (a message-like type with ``FIELDS``)."""

    item: Any
    max_items: int

    def dump(self, value: tuple[T, ...]) -> object:
        return [
            {f.key: f.codec.dump(getattr(record, f.attribute)) for f in self.item.FIELDS}
            for record in value
        ]

    def load(self, fields: dict[str, Any], key: str) -> tuple[T, ...]:
        value = fields.get(key, [])
        if not isinstance(value, list):
            raise InvalidMessage(f"{key!r} must be an array, not {json_type(value)}")
        if len(value) > self.max_items:
            raise InvalidMessage(f"{key!r} holds {len(value)} items; at most {self.max_items}")
        records = []
        for item in value:
            if not isinstance(item, dict):
                raise InvalidMessage(f"each item of {key!r} must be an object")
            records.append(
                self.item(**{f.attribute: f.codec.load(item, f.key) for f in self.item.FIELDS})
            )
        return tuple(records)


@dataclass(frozen=True)
class OptionalRecord(Generic[T]):
    """One object decoded by ``item`` (a message-like type with ``FIELDS``), or ``null``/absent."""

    item: Any

    def dump(self, value: T | None) -> object:
        if value is None:
            return None
        return {f.key: f.codec.dump(getattr(value, f.attribute)) for f in self.item.FIELDS}

    def load(self, fields: dict[str, Any], key: str) -> T | None:
        value = fields.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidMessage(f"{key!r} must be an object, not {json_type(value)}")
        loaded: T = self.item(**{f.attribute: f.codec.load(value, f.key) for f in self.item.FIELDS})
        return loaded


@dataclass(frozen=True)
class Choice(Generic[_E]):
    """One of an enum's values; ``allowed`` narrows which ones may be sent."""

    enum: type[_E]
    allowed: tuple[_E, ...] | None = None
    default: _E | None = None
    unknown: _E | None = None
    """What a value this side does not know decodes to (sent by a newer peer); without it,
    such a value is an error."""

    def dump(self, value: _E) -> object:
        return value.value

    @cached_property
    def _members(self) -> dict[str, _E]:
        return {member.value: member for member in self.allowed or tuple(self.enum)}

    def load(self, fields: dict[str, Any], key: str) -> _E:
        if key not in fields and self.default is not None:
            return self.default
        text = _CHOICE_TEXT.load(fields, key)
        member = self._members.get(text)
        if member is not None:
            return member
        if self.unknown is not None:
            return self.unknown
        names = ", ".join(self._members)
        raise InvalidMessage(f"{key!r} is {text!r}; expected one of: {names}")


@dataclass(frozen=True)
class Image:
    """An image reference, normalised (see :mod:`contract.reference`)."""

    def dump(self, value: ImageReference) -> object:
        return str(value)

    def load(self, fields: dict[str, Any], key: str) -> ImageReference:
        value = _required(fields, key)
        try:
            return parse_reference(value)
        except ValueError as error:
            raise InvalidMessage(f"invalid image reference: {error}") from None


@dataclass(frozen=True)
class Failure:
    """Why a node failed: ``{"kind": ..., "message": ...}``, or ``null``."""

    def dump(self, value: NodeError | None) -> object:
        if value is None:
            return None
        return {"kind": value.kind.value, "message": value.message}

    def load(self, fields: dict[str, Any], key: str) -> NodeError | None:
        value = fields.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidMessage(f"{key!r} must be an object with 'kind' and 'message'")
        kind = _ERROR_KIND.load(value, "kind")
        message = _ERROR_MESSAGE.load(value, "message")
        if kind is ErrorKind.UNKNOWN and value["kind"] != ErrorKind.UNKNOWN.value:
            message = f"({value['kind']}) {message}"  # a newer peer's kind: keep its name
        return NodeError(kind=kind, message=message)


# Codecs other codecs use, made once (a codec is immutable).
_ID_TEXT = Text(MAX_ID_LENGTH)
_IDENTIFIER = Identifier()
_SECONDS = Seconds()
_IMAGE = Image()
_CHOICE_TEXT = Text(64)
_ERROR_KIND = Choice(ErrorKind, unknown=ErrorKind.UNKNOWN)
_ERROR_MESSAGE = Text(MAX_ERROR_MESSAGE_LENGTH)
_TEXTS = {MAX_TEXT_LENGTH: Text()}


def _text(max_length: int) -> Text:
    text = _TEXTS.get(max_length)
    if text is None:
        text = _TEXTS[max_length] = Text(max_length)
    return text


def _required(fields: dict[str, Any], key: str) -> Any:
    value = fields.get(key, _MISSING)
    if value is _MISSING:
        raise InvalidMessage(f"the message has no {key!r} field")
    return value
