"""What a client in another language can put on the wire and pamqp's encoder will not:
strings and header names with bytes that are not UTF-8 (given here as lone surrogates,
``"\\udcff"`` → byte ff) and timestamps beyond any calendar. For tests of the SAM's
tolerance of them; patches this process's encoder only while the context lasts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pamqp import common, encode

__all__ = ["raw_encoding"]


def _string(encoder: Any, value: str) -> bytes:
    data = value.encode("utf-8", "surrogateescape")
    return bytes(encoder.pack(len(data))) + data


def _table(value: common.FieldTable) -> bytes:
    if not value:
        return bytes(common.Struct.integer.pack(0))
    parts = []
    for key, item in sorted(value.items()):
        parts += [_string(common.Struct.byte, key), encode.encode_table_value(item)]
    payload = b"".join(parts)
    return bytes(common.Struct.integer.pack(len(payload))) + payload


def _far_timestamp(_: object) -> bytes:
    return encode.long_long_int(2**63 - 1)


@contextlib.contextmanager
def raw_encoding(*, far_timestamps: bool = False) -> Iterator[None]:
    """Encode lone surrogates as raw bytes; with ``far_timestamps``, every timestamp as
    2**63-1 seconds."""
    saved = (encode._string, encode.field_table, dict(encode.METHODS))
    encode._string = _string
    encode.field_table = _table
    encode.METHODS["table"] = _table
    if far_timestamps:
        encode.METHODS["timestamp"] = _far_timestamp
    try:
        yield
    finally:
        encode._string, encode.field_table = saved[0], saved[1]
        encode.METHODS.clear()
        encode.METHODS.update(saved[2])
