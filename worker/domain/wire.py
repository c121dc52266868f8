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
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from worker.errors import ErrorCode, SamError

__all__ = ["decode_base64", "parse_body"]

_M = TypeVar("_M", bound=BaseModel)


def _no_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate name")
    return result


def parse_body(model: type[_M], body: bytes) -> _M:
    """The body as ``model``; refused as ``malformed_message`` (not a JSON object: bad
    UTF-8, bad JSON, duplicate names, too deep) or ``schema_violation``."""
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SamError(ErrorCode.malformed_message, f"body is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(document, dict):
        raise SamError(ErrorCode.malformed_message, "body is not a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        # locations may hold the sender's own names (an extra field): bounded and quoted
        where = ", ".join(
            repr(".".join(map(str, e["loc"]))[:64]) if e["loc"] else "body" for e in exc.errors()[:5]
        )
        raise SamError(ErrorCode.schema_violation, f"schema violation at {where}") from exc


def decode_base64(text: str, code: ErrorCode, what: str) -> bytes:
    """Standard base64 with its alphabet checked; refused with ``code`` otherwise."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SamError(code, f"{what} is not base64") from exc
