"""Reading a request body and the binary values inside it, strictly.

Bodies are parsed by the standard library so duplicate names can be refused (two
readers of one body must never see different values), then validated against the
operation's pydantic model. Every refusal is a ``SamError`` with a stable code; no
library message reaches the wire.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from worker.errors import ErrorCode, SamError

__all__ = ["decode_base64", "decode_base64_or_base64url", "json_object", "parse_body"]

_M = TypeVar("_M", bound=BaseModel)


def _no_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate name")
    return result


def json_object(data: bytes, code: ErrorCode, what: str) -> dict[str, Any]:
    """``data`` as a JSON object, refused with ``code`` if it is not one: bad UTF-8, bad
    JSON, a name twice, too deep. Used for bodies and JWS/JWT payloads alike."""
    try:
        document = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SamError(code, f"{what} is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(document, dict):
        raise SamError(code, f"{what} is not a JSON object")
    return document


def parse_body(model: type[_M], body: bytes) -> _M:
    """The body as ``model``; refused as ``malformed_message`` (not a JSON object: bad
    UTF-8, bad JSON, duplicate names, too deep) or ``schema_violation``."""
    document = json_object(body, ErrorCode.malformed_message, "body")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        # locations may hold the sender's own names (an extra field): bounded and quoted
        where = ", ".join(
            repr(".".join(map(str, e["loc"]))[:64]) if e["loc"] else "body" for e in exc.errors()[:5]
        )
        raise SamError(ErrorCode.schema_violation, f"schema violation at {where}") from exc


_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def decode_base64(text: str, code: ErrorCode, what: str) -> bytes:
    """Standard base64 (RFC 4648 §4) in its one canonical spelling: its alphabet, its
    padding, no whitespace, unused bits zero; refused with ``code`` otherwise."""
    if not _BASE64.fullmatch(text):
        raise SamError(code, f"{what} is not canonical base64")
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SamError(code, f"{what} is not base64") from exc
    if base64.b64encode(decoded).decode() != text:
        raise SamError(code, f"{what} is not canonical base64")
    return decoded


def decode_base64_or_base64url(text: str) -> bytes | None:
    """A SAD's digest: canonical base64 (padded) or canonical unpadded base64url (as JOSE
    writes it); ``None`` — equal to no digest — for anything else."""
    if _BASE64URL.fullmatch(text) and len(text) % 4 != 1:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return decoded if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() == text else None
    try:
        return decode_base64(text, ErrorCode.sad_invalid, "digest")
    except SamError:
        return None
