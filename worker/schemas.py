"""Generates the published contract in ``schemas/`` from the code: a JSON Schema per
request and reply body, the SAD claims, and the error-code catalogue. A test fails
when the committed files drift from what this produces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from worker.domain.authorization import SadClaims
from worker.domain.contract import (
    OPERATION_QUEUE,
    REQUEST_MODELS,
    ErrorReply,
    KeyPairDeleteReply,
    KeyPairReply,
    Operation,
    ProofOfPossessionReply,
    SignaturesReply,
)
from worker.errors import ErrorCode

__all__ = ["render", "write"]

_REPLIES: dict[Operation, type[BaseModel] | None] = {
    Operation.configurations_dynamic_put: None,
    Operation.configurations_dynamic_get: REQUEST_MODELS[Operation.configurations_dynamic_put],
    Operation.key_pairs_create: KeyPairReply,
    Operation.signers_key_pairs_assign: KeyPairReply,
    Operation.proofs_of_possession_create: ProofOfPossessionReply,
    Operation.key_pairs_update: KeyPairReply,
    Operation.key_pairs_delete: KeyPairDeleteReply,
    Operation.key_pairs_rewrap: KeyPairReply,
    Operation.signatures_create: SignaturesReply,
}
_STATUS = {
    Operation.configurations_dynamic_put: 204,
    Operation.key_pairs_create: 201,
}


def _schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = title
    return schema


def render() -> dict[str, bytes]:
    """File name → content of everything in ``schemas/``."""
    files: dict[str, Any] = {}
    operations = []
    for operation in Operation:
        files[f"{operation}.request.json"] = _schema(REQUEST_MODELS[operation], f"{operation} request body")
        reply = _REPLIES[operation]
        if reply is not None:
            files[f"{operation}.reply.json"] = _schema(reply, f"{operation} reply body")
        operations.append(
            {
                "type": str(operation),
                "routing_key": OPERATION_QUEUE[operation].value,
                "queue": OPERATION_QUEUE[operation].queue_name,
                "success_status": _STATUS.get(operation, 200),
                "request_schema": f"{operation}.request.json",
                "reply_schema": f"{operation}.reply.json" if reply is not None else None,
            }
        )
    files["operations.json"] = {"operations": operations}
    files["error.reply.json"] = _schema(ErrorReply, "error reply body (any operation)")
    files["sad.claims.json"] = _schema(
        SadClaims, "SAD claims (JWT payload signed by an authorization server)"
    )
    files["error-codes.json"] = {
        "error_codes": [
            {"code": code.name, "status": code.status, "meaning": code.meaning} for code in ErrorCode
        ]
    }
    return {
        name: orjson.dumps(content, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        for name, content in sorted(files.items())
    }


def write(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rendered = render()
    for stale in folder.glob("*.json"):
        if stale.name not in rendered:
            stale.unlink()
    for name, content in rendered.items():
        (folder / name).write_bytes(content)
    return sorted(rendered)
