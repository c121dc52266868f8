"""Decoding AMQP frames so that no field a client chose can cost the connection.

pamqp (the codec under aiormq and aio-pika) raises while decoding a content header
whose short strings (``type``, ``app_id``, ``message_id``, … and every header name) are
not UTF-8, whose timestamp is out of ``datetime``'s range, or whose headers nest
deeper than the interpreter's recursion limit. aiormq then closes the whole connection:
one message from any SSA would restart the worker, be redelivered and restart the next
one, until the delivery limit dead-letters it. Upstream fixed long strings only (they
come back as ``bytes``).

``install`` replaces those decoders with ones that never fail on content the broker let
through: bytes that are not UTF-8 are decoded with ``surrogateescape`` (so the value
carries lone surrogates, which the envelope gate refuses, see
``worker.domain.envelope``), a timestamp out of range decodes as ``None``, and tables or
arrays nested deeper than ``MAX_DEPTH`` decode as the ``TOO_DEEP`` marker. The message
then reaches the consumer, which refuses it with a reply and an audit record.
"""

from __future__ import annotations

import datetime
import struct
from typing import Any

from pamqp import common, decode

__all__ = ["MAX_DEPTH", "TOO_DEEP", "install", "undecodable"]

MAX_DEPTH = 16
TOO_DEEP = "\udcff(too deep)"  # a lone surrogate: refused wherever it is read
_depth = 0


def _short_str(value: bytes) -> tuple[int, str]:
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", "surrogateescape")


def _timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    try:
        return _original_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if len(value) < 8:
            raise
        return 8, None


def _nested(original: Any) -> Any:
    def decode_nested(value: bytes) -> tuple[int, Any]:
        global _depth
        if _depth >= MAX_DEPTH:
            try:
                length = common.Struct.integer.unpack(value[0:4])[0]
            except (struct.error, TypeError) as err:
                raise ValueError("Could not unpack data") from err
            return length + 4, TOO_DEEP
        _depth += 1
        try:
            return original(value)  # type: ignore[no-any-return]
        finally:
            _depth -= 1

    return decode_nested


def _field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's ``field_table`` with header names decoded as short strings are here."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", "surrogateescape")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


_original_timestamp = decode.timestamp
_installed = False


def install() -> None:
    """Put the tolerant decoders in place of pamqp's (idempotent; process-wide)."""
    global _installed
    if _installed:
        return
    table, array = _nested(_field_table), _nested(decode.field_array)
    decode.short_str = _short_str
    decode.timestamp = _timestamp  # type: ignore[assignment]  # None for a time out of range
    decode.field_table = table
    decode.field_array = array
    decode.METHODS.update(shortstr=_short_str, timestamp=_timestamp, table=table, array=array)
    decode.TABLE_MAPPING.update({b"T": _timestamp, b"F": table, b"A": array})
    _installed = True


def undecodable(value: object, _depth: int = 0) -> bool:
    """Whether a decoded value holds anything the tolerant decoders marked: lone
    surrogates (bytes that were not UTF-8) or a table nested too deep."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if _depth > MAX_DEPTH:
        return True
    if isinstance(value, dict):
        return any(undecodable(k, _depth + 1) or undecodable(v, _depth + 1) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(undecodable(v, _depth + 1) for v in value)
    return False
