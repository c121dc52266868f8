"""Audit chains: records link and sign; the verifier names what was damaged."""

from __future__ import annotations

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from worker.domain.audit import AuditChain, AuditEvent, AuditLog, Outcome, verify_records

KEY = ec.generate_private_key(ec.SECP256R1())


def sign_digest(digest: bytes) -> bytes:
    r, s = decode_dss_signature(KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def chain_lines(count: int, log: AuditLog = AuditLog.service) -> list[bytes]:
    chain = AuditChain("node-1", "w-1", log)
    event = AuditEvent(log, "signatures.create", Outcome.success, 200, actor="ssa-1", request_id="r")
    return [orjson.dumps(chain.append(event, 1_700_000_000_000 + n, sign_digest)) for n in range(count)]


def verify(lines: list[bytes]) -> list[str]:
    report = verify_records((("f", n, line) for n, line in enumerate(lines, 1)), KEY.public_key())
    return [f"{p.line}:{p.what}" for p in report.problems]


def test_intact_chain_verifies() -> None:
    lines = chain_lines(5)
    assert verify(lines) == []
    assert orjson.loads(lines[0])["prev"] == "0" * 64
    assert orjson.loads(lines[1])["prev"] == orjson.loads(lines[0])["hash"]


def _alter(lines: list[bytes]) -> list[bytes]:
    record = orjson.loads(lines[2])
    record["status"] = 500
    return [*lines[:2], orjson.dumps(record), *lines[3:]]


def _resign(lines: list[bytes]) -> list[bytes]:
    """Altered and re-hashed, but signed with another key."""
    other = ec.generate_private_key(ec.SECP256R1())
    record = orjson.loads(lines[2])
    chain = AuditChain("node-1", "w-1", AuditLog.service, record["seq"] - 1, record["prev"])

    def other_sign(digest: bytes) -> bytes:
        r, s = decode_dss_signature(other.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    forged = chain.append(AuditEvent(AuditLog.service, "x", Outcome.success, 200), 0, other_sign)
    return [*lines[:2], orjson.dumps(forged), *lines[3:]]


@pytest.mark.parametrize(
    ("damage", "first_problem"),
    [
        (_alter, "3:record altered (hash mismatch)"),
        (_resign, "3:signature does not verify"),
        (lambda ls: [*ls[:2], *ls[3:]], "3:expected seq 3: records 3..3 missing"),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], "2:expected seq 2: records 2..2 missing"),
        (lambda ls: [*ls, ls[-1]], "6:expected seq 6: out of order or repeated"),
        (lambda ls: [*ls[:2], b"not json", *ls[2:]], "3:not an audit record"),
    ],
    ids=["altered", "re-signed by another key", "removed", "swapped", "repeated", "garbage line"],
)
def test_damage_is_named(damage: object, first_problem: str) -> None:
    problems = verify(damage(chain_lines(5)))  # type: ignore[operator]
    assert problems and problems[0] == first_problem, problems


def test_chains_are_independent_per_log() -> None:
    service, admin = chain_lines(3), chain_lines(2, AuditLog.admin)
    assert verify([service[0], admin[0], service[1], admin[1], service[2]]) == []
