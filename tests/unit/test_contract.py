"""The published contract in ``schemas/`` matches the code, and every error code is
documented with a status."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import jsonschema
import yaml

from worker.domain.audit import (
    AuditCheckpointEntry,
    AuditEvent,
    AuditLog,
    AuditRecordEntry,
    ChainHead,
    Outcome,
    chain_batch,
)
from worker.errors import ErrorCode
from worker.schemas import render

ROOT = Path(__file__).resolve().parents[2]


def test_schemas_do_not_drift() -> None:
    rendered = render()
    committed = {
        p.name: p.read_bytes() for p in (ROOT / "schemas").iterdir() if p.suffix in (".json", ".yaml")
    }
    assert set(committed) == set(rendered), "run: sam-admin schemas --out schemas"
    for name, content in rendered.items():
        assert committed[name] == content, f"schemas/{name} drifted; run: sam-admin schemas --out schemas"


def test_every_code_the_worker_raises_is_catalogued() -> None:
    """Every ``ErrorCode.<name>`` used in the worker exists (so it is in the catalogue)."""
    used = set()
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "ErrorCode"
            ):
                used.add(node.attr)
    known = {code.name for code in ErrorCode}
    assert used - {"value", "status", "meaning"} <= known
    assert all(400 <= code.status < 600 for code in ErrorCode)


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    schema = json.loads((ROOT / "ops" / "reference" / "asyncapi-3.0.0.schema.json").read_text())
    document = yaml.safe_load((ROOT / "schemas" / "asyncapi.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(document)
    assert {"signatures_create", "key_pairs_create", "receive_audit"} <= set(document["operations"])
    binding = document["channels"]["requests-signatures"]["bindings"]["amqp"]
    assert binding["x-queue"]["arguments"]["x-delivery-limit"] >= 1
    # every schema file the document refers to exists
    refs = {value for value in _leaves(document) if isinstance(value, str) and value.startswith("./")}
    assert refs and all((ROOT / "schemas" / ref[2:]).exists() for ref in refs)


def _leaves(node: object) -> list[object]:
    if isinstance(node, dict):
        return [value for child in node.values() for value in _leaves(child)]
    if isinstance(node, list):
        return [value for child in node for value in _leaves(child)]
    return [node]


def test_audit_entries_match_their_published_schema() -> None:
    event = AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, dtbs_sha256=("ab" * 32,))
    entries, _ = chain_batch("n", "i", AuditLog.service, ChainHead(), [(event, 1)], 2, lambda _: bytes(64))
    AuditRecordEntry.model_validate(entries[0])
    AuditCheckpointEntry.model_validate(entries[1])


def test_the_csc_gateway_document_is_valid_openapi_3_1() -> None:
    from openapi_spec_validator import validate

    document = yaml.safe_load((ROOT / "schemas" / "csc-openapi.yaml").read_text())
    validate(document)
    assert document["openapi"] == "3.1.0"
    offered = {"info", "credentials/list", "credentials/info", "signatures/signHash"}
    assert {f"/csc/{v}/{name}" for v in ("v1", "v2") for name in offered} == set(document["paths"])
    sign_hash = document["components"]["schemas"]["SignHashBody"]["properties"]
    assert {"hashes", "hash", "hashAlgorithmOID", "hashAlgo", "SAD", "credentialID"} <= set(sign_hash)
