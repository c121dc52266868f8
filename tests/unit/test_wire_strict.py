"""Strict parsing: the published JSON Schemas and the parser accept exactly the same
documents. One corpus per operation — a valid body and every leaf of it replaced in turn
by a hostile value (a number as a string, a boolean as a string, a float, null, a list,
an object, a huge string), every field removed in turn, one unknown field added — is fed
to both. Plus the other strict readers: duplicate names in JWS/JWT payloads, numeric
dates, base64 and base64url in their one canonical spelling."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from worker.domain.contract import REQUEST_MODELS, Operation
from worker.domain.wire import decode_base64, decode_base64_or_base64url, json_object, parse_body
from worker.errors import ErrorCode, SamError

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SEALED = {"sealed": "eyJhbGciOiJFUzI1NiJ9.e30.c2ln", "id": "kp-1", "size": 2048, "revision": 3}
B64 = base64.b64encode(bytes(32)).decode()
VALID: dict[Operation, dict[str, Any]] = {
    Operation.configurations_dynamic_put: {
        "version": 7,
        "authorization_servers": [{"id": "as-1", "public_key": "-----BEGIN PUBLIC KEY-----"}],
        "signing_service_privileged_users": [
            {"id": "ssa-1", "public_key": "pem", "allowed_authorization_servers": ["as-1"]}
        ],
    },
    Operation.configurations_dynamic_get: {},
    Operation.key_pairs_create: {"key_template": {"algorithm": "RSA", "size": 2048, "named_curve": None}},
    Operation.signers_key_pairs_assign: {
        "key_pair": SEALED,
        "signer": {"id": "alice"},
        "subject": "CN=alice",
        "sam_factor": {"type": "pin", "value": "123456"},
        "authorization_server": "as-1",
    },
    Operation.proofs_of_possession_create: {
        "key_pair": SEALED,
        "request": {"dtbs": B64, "signature_algorithm": "1.2.840.10045.4.3.2"},
    },
    Operation.key_pairs_update: {
        "key_pair": SEALED,
        "signer": {"id": "alice"},
        "status": {"assigned": True, "certified": True, "enabled": False},
        "certificate": B64,
    },
    Operation.key_pairs_delete: {"key_pair": SEALED, "signer": {"id": "alice"}},
    Operation.key_pairs_rewrap: {"key_pair": SEALED},
    Operation.key_pairs_bind: {"key_pair": SEALED, "owner": "ssa-2", "authorization_server": "as-1"},
    Operation.signatures_create: {
        "signature_algorithm": "1.2.840.10045.4.3.2",
        "requests": [{"dtbs": B64, "signature_algorithm": "1.2.840.10045.4.3.2"}],
        "key_pair": SEALED,
        "signer": {"id": "alice"},
        "sam_factor": {"type": "pin", "value": "123456"},
    },
}
HOSTILE: list[Any] = [
    "2048",
    "true",
    "no",
    2048,
    2048.0,
    2048.5,
    True,
    False,
    None,
    [],
    {},
    "",
    "x" * 5000,
    -1,
]
_DELETE = object()


def _paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(document, dict):
        return [
            p for key, value in document.items() for p in [(*prefix, key), *_paths(value, (*prefix, key))]
        ]
    if isinstance(document, list):
        return [p for i, value in enumerate(document) for p in [(*prefix, i), *_paths(value, (*prefix, i))]]
    return []


def _set(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    changed = copy.deepcopy(document)
    target = changed
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return changed


def _corpus(valid: dict[str, Any]) -> list[Any]:
    documents: list[Any] = [valid, {**valid, "unknown": 1}, [], "x", 3]
    for path in _paths(valid):
        documents += [_set(valid, path, value) for value in HOSTILE]
        if not isinstance(path[-1], int):
            documents.append(_set(valid, path, _DELETE))
    return documents


@pytest.mark.parametrize("operation", list(Operation), ids=str)
def test_the_schema_and_the_parser_accept_the_same_documents(operation: Operation) -> None:
    schema = json.loads((SCHEMAS / f"{operation}.request.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    model = REQUEST_MODELS[operation]
    corpus = _corpus(VALID[operation])
    disagreements = []
    for document in corpus:
        by_schema = validator.is_valid(document)
        try:
            parse_body(model, json.dumps(document).encode())
            by_parser = True
        except SamError:
            by_parser = False
        if by_schema != by_parser:
            disagreements.append((document, by_schema, by_parser))
    assert validator.is_valid(VALID[operation]), "the corpus starts from a valid body"
    assert not disagreements, disagreements[:3]
    assert len(corpus) > 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b'{"sub": "alice", "sub": "mallory"}', None),
        (b'{"a": {"b": 1, "b": 2}}', None),
        (b"[1]", None),
        (b"\xff", None),
        (b"[" * 100_000, None),
    ],
)
def test_jws_and_jwt_payloads_are_read_strictly(text: bytes, expected: dict[str, Any] | None) -> None:
    if expected is not None:
        assert json_object(text, ErrorCode.sad_invalid, "payload") == expected
        return
    with pytest.raises(SamError) as refused:
        json_object(text, ErrorCode.sad_invalid, "payload")
    assert refused.value.code is ErrorCode.sad_invalid


DIGEST = bytes([0xFB, 0xFF] * 16)  # "+", "/" in base64, "-", "_" in base64url
STANDARD = base64.b64encode(DIGEST).decode()
URLSAFE = base64.urlsafe_b64encode(DIGEST).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (STANDARD, True),
        (STANDARD.rstrip("="), False),  # standard base64 keeps its padding
        (STANDARD + "==", False),
        (" " + STANDARD, False),
        (STANDARD[:-2] + "\n=", False),
        ("*" + STANDARD[1:], False),
        ("AB==", False),  # unused bits not zero: a second spelling of one byte
        ("AA==", True),
    ],
)
def test_base64_in_its_one_canonical_spelling(text: str, valid: bool) -> None:
    if valid:
        assert base64.b64encode(decode_base64(text, ErrorCode.invalid_dtbs, "DTBS/R")).decode() == text
    else:
        with pytest.raises(SamError):
            decode_base64(text, ErrorCode.invalid_dtbs, "DTBS/R")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (STANDARD, DIGEST),
        (URLSAFE, DIGEST),
        (URLSAFE + "!", None),  # a character outside the alphabet is not dropped
        (URLSAFE[:10] + "." + URLSAFE[10:], None),
        (URLSAFE[:-1] + "B", None),  # non-canonical trailing bits
        (URLSAFE + "=", None),
        ("A", None),
    ],
)
def test_sad_digests_in_base64_or_unpadded_base64url_only(text: str, expected: bytes | None) -> None:
    assert decode_base64_or_base64url(text) == expected
