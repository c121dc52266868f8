"""Generates the published contract in ``schemas/`` from the code: a JSON Schema per
request and reply body, the key pair, the SAD/SKAD claims and the audit entries, the
error-code catalogue, and the AsyncAPI 3.0 document. A test fails when the committed
files drift from what this produces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel

from worker.asyncapi import asyncapi
from worker.csc.openapi import openapi
from worker.domain.audit import AuditCheckpointEntry, AuditRecordEntry
from worker.domain.authorization import SAD_TYPE_DELETION, SAD_TYPE_SIGNATURE, SKAD_TYPE_ASSIGNMENT, SadClaims
from worker.domain.contract import (
    OPERATION_QUEUE,
    REQUEST_MODELS,
    ErrorReply,
    KeyPairDeleteReply,
    KeyPairObject,
    KeyPairReply,
    Operation,
    ProofOfPossessionReply,
    SignaturesReply,
)
from worker.domain.key_pair import SealedKeyPair
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
    Operation.key_pairs_bind: KeyPairReply,
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
        SadClaims,
        "SAD / SKAD claims (JWT payload signed by an authorization server); authorization_details "
        f"type: {SAD_TYPE_SIGNATURE!r} to sign, {SKAD_TYPE_ASSIGNMENT!r} to assign, "
        f"{SAD_TYPE_DELETION!r} to delete",
    )
    files["key_pair.json"] = _schema(KeyPairObject, "a key pair as SAM and SSA exchange it")
    files["key_pair.sealed-payload.json"] = _schema(
        SealedKeyPair, "payload of key_pair.sealed (a JWS by the SAM state key); the only part the SAM trusts"
    )
    files["audit.record.json"] = _schema(AuditRecordEntry, "audit record (one per request)")
    files["audit.checkpoint.json"] = _schema(
        AuditCheckpointEntry, "audit checkpoint (closes a batch, HSM-signed)"
    )
    files["error-codes.json"] = {
        "error_codes": [
            {"code": code.name, "status": code.status, "meaning": code.meaning} for code in ErrorCode
        ]
    }
    rendered = {
        name: orjson.dumps(content, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
        for name, content in sorted(files.items())
    }
    document = asyncapi(_REPLIES, _STATUS)
    rendered["asyncapi.yaml"] = yaml.safe_dump(document, sort_keys=False, width=100).encode()
    rendered["csc-openapi.yaml"] = yaml.safe_dump(openapi(), sort_keys=False, width=100).encode()
    return rendered


def write(folder: Path) -> list[str]:
    """Write everything ``render`` produces into ``folder`` and delete the ``*.json`` and
    ``*.yaml`` there that it no longer produces; returns the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    rendered = render()
    for stale in [*folder.glob("*.json"), *folder.glob("*.yaml")]:
        if stale.name not in rendered:
            stale.unlink()
    for name, content in rendered.items():
        (folder / name).write_bytes(content)
    return sorted(rendered)
