"""Audit records: what one is, how records chain, and how a chain is verified.

Every request yields one record. Records are chained per (node, instance, log): each
names the hash of the one before, and each record's hash is signed with the HSM audit
key. Records carry digests of what was signed, never secrets.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from worker.domain.authorization import b64url

__all__ = [
    "GENESIS",
    "AuditChain",
    "AuditEvent",
    "AuditLog",
    "ChainProblem",
    "Outcome",
    "record_hash",
    "verify_records",
]

GENESIS = "0" * 64


class AuditLog(StrEnum):
    service = "service"
    admin = "admin"


class Outcome(StrEnum):
    success = "success"
    failure = "failure"


@dataclass(frozen=True)
class AuditEvent:
    """What happened to one request (filled in as far as the request got)."""

    log: AuditLog
    operation: str
    outcome: Outcome
    status: int
    error_code: str | None = None
    actor: str | None = None
    request_id: str | None = None
    signer: str | None = None
    key_pair: str | None = None
    sad_jti: str | None = None
    dtbs_sha256: tuple[str, ...] = ()
    detail: str | None = None

    @property
    def routing_key(self) -> str:
        return f"{self.log}.{self.operation}.{self.outcome}"


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k not in ("hash", "sig")}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def record_hash(record: dict[str, Any]) -> bytes:
    return hashlib.sha256(_canonical(record)).digest()


@dataclass
class AuditChain:
    """The running chain of one (node, instance, log); not thread-safe by design."""

    node: str
    instance: str
    log: AuditLog
    seq: int = 0
    prev: str = GENESIS

    def append(
        self, event: AuditEvent, time_ms: int, sign_digest: Callable[[bytes], bytes]
    ) -> dict[str, Any]:
        """Make the next record, signed; the chain advances only on success."""
        record: dict[str, Any] = {
            "seq": self.seq + 1,
            "time_ms": time_ms,
            "node": self.node,
            "instance": self.instance,
            "log": str(self.log),
            "operation": event.operation,
            "outcome": str(event.outcome),
            "status": event.status,
            "error_code": event.error_code,
            "actor": event.actor,
            "request_id": event.request_id,
            "signer": event.signer,
            "key_pair": event.key_pair,
            "sad_jti": event.sad_jti,
            "dtbs_sha256": list(event.dtbs_sha256),
            "detail": event.detail,
            "prev": self.prev,
        }
        digest = record_hash(record)
        record["hash"] = digest.hex()
        record["sig"] = b64url(sign_digest(digest))
        self.seq = record["seq"]
        self.prev = record["hash"]
        return record


@dataclass(frozen=True)
class ChainProblem:
    source: str
    line: int
    chain: str
    seq: int | None
    what: str

    def __str__(self) -> str:
        seq = f" seq {self.seq}" if self.seq is not None else ""
        return f"{self.source}:{self.line}: {self.chain}{seq}: {self.what}"


@dataclass
class _ChainCursor:
    seq: int
    hash: str


@dataclass
class VerifyReport:
    records: int = 0
    chains: dict[str, tuple[int, int]] = field(default_factory=dict)  # chain -> (first, last)
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify_signature(public_key: ec.EllipticCurvePublicKey, digest: bytes, sig: str) -> bool:
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    half = len(raw) // 2
    der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    try:
        public_key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def verify_records(
    lines: Iterable[tuple[str, int, bytes]], public_key: ec.EllipticCurvePublicKey
) -> VerifyReport:
    """Verify (source, line number, raw line) triples in the order given.

    The first record seen of each chain anchors it; every later one must follow it
    by sequence and hash. Alterations show as a hash or signature mismatch, removals
    and reorderings as a broken link.
    """
    report = VerifyReport()
    cursors: dict[str, _ChainCursor] = {}
    for source, number, raw in lines:
        if not raw.strip():
            continue
        report.records += 1
        try:
            record = orjson.loads(raw)
            chain = f"{record['node']}/{record['instance']}/{record['log']}"
            seq, prev, claimed = int(record["seq"]), str(record["prev"]), str(record["hash"])
            sig = str(record["sig"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            report.problems.append(ChainProblem(source, number, "?", None, "not an audit record"))
            continue
        digest = record_hash(record)
        if digest.hex() != claimed:
            report.problems.append(ChainProblem(source, number, chain, seq, "record altered (hash mismatch)"))
            continue
        try:
            signed = _verify_signature(public_key, digest, sig)
        except (ValueError, TypeError):
            signed = False
        if not signed:
            report.problems.append(ChainProblem(source, number, chain, seq, "signature does not verify"))
            continue
        cursor = cursors.get(chain)
        if cursor is not None:
            if seq != cursor.seq + 1:
                what = (
                    f"expected seq {cursor.seq + 1}: records {cursor.seq + 1}..{seq - 1} missing"
                    if seq > cursor.seq + 1
                    else f"expected seq {cursor.seq + 1}: out of order or repeated"
                )
                report.problems.append(ChainProblem(source, number, chain, seq, what))
            elif prev != cursor.hash:
                report.problems.append(
                    ChainProblem(source, number, chain, seq, "link to previous record broken (fork)")
                )
        first = report.chains.get(chain, (seq, seq))[0]
        report.chains[chain] = (first, seq)
        cursors[chain] = _ChainCursor(seq, claimed)
    return report
