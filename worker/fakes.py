"""In-memory implementations of the ports (``worker.ports``), for unit tests of the
service and for anyone embedding it in tests of their own.

Each one does what the real adapter does, not merely something that passes: the
software HSM wraps keys with AES key wrap (with padding) under named KEKs, generates
every supported curve and RSA size, signs PKCS#1 v1.5 over a DigestInfo, RSASSA-PSS and
raw ECDSA with the hash the scheme names; the ledgers apply records with the real
reducers in log order; the audit sink chains and signs entries as the audit trail does.
``tests/contract`` holds them to the same suites as ``Pkcs11Hsm``, ``StreamLedger``
and ``AuditTrail``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from worker.domain.algorithms import HsmMechanism, KeySpec, KeyType, SignatureScheme
from worker.domain.audit import AuditEvent, AuditLog, ChainHead, chain_batch_signed_by, withheld_reply
from worker.domain.ledgers import Reducer, SadUseLog, Verdict
from worker.errors import ErrorCode, SamError
from worker.ports import GeneratedKeyPair, StoredResult, WrappedKey

__all__ = [
    "MarkedResultsIn",
    "MemoryAudit",
    "MemoryLedger",
    "MemoryResults",
    "ReplicaLedger",
    "SharedStream",
    "SoftwareHsm",
]

_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
}
_BY_SIZE: dict[int, type[hashes.HashAlgorithm]] = {32: hashes.SHA256, 48: hashes.SHA384, 64: hashes.SHA512}
WRAP_MECHANISM = "AES_KEY_WRAP_PAD"


def _raw_ecdsa(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """ECDSA over a hash, r‖s as PKCS#11 ``CKM_ECDSA`` returns it."""
    algorithm = _BY_SIZE[len(digest)]()
    r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(algorithm))))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def _public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class SoftwareHsm:
    """An ``Hsm`` in process memory. Private keys leave it only wrapped (AES key wrap
    with padding of the PKCS#8 encoding) under one of its KEKs, as with PKCS#11
    ``CKM_AES_KEY_WRAP_PAD``; ``add_kek`` rotates to a new current KEK."""

    def __init__(self, kek_label: str = "fake-kek") -> None:
        self.state_key = ec.generate_private_key(ec.SECP256R1())
        self.audit_key = ec.generate_private_key(ec.SECP256R1())
        self._factor_key = os.urandom(32)
        self._keks: dict[str, bytes] = {}
        self._current = kek_label
        self.add_kek(kek_label)
        self.calls = 0

    def add_kek(self, label: str) -> None:
        """A new KEK, current from now on; the older ones still unwrap."""
        self._keks[label] = os.urandom(32)
        self._current = label

    @property
    def current_kek_label(self) -> str:
        return self._current

    def state_public_pem(self) -> str:
        return _public_pem(self.state_key)

    def audit_public_pem(self) -> str:
        return _public_pem(self.audit_key)

    def _wrap(self, private: Any) -> bytes:
        der = private.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return keywrap.aes_key_wrap_with_padding(self._keks[self._current], der)

    def _unwrap(self, key: WrappedKey) -> Any:
        if key.wrap_mechanism != WRAP_MECHANISM:
            raise SamError(ErrorCode.key_pair_invalid, f"unknown wrap mechanism {key.wrap_mechanism!r}")
        kek = self._keks.get(key.kek_label)
        if kek is None:
            raise SamError(
                ErrorCode.hsm_unavailable, f"key encryption key {key.kek_label!r} is not in this HSM"
            )
        try:
            private = serialization.load_der_private_key(
                keywrap.aes_key_unwrap_with_padding(kek, key.wrapped), None
            )
        except (keywrap.InvalidUnwrap, ValueError) as exc:
            raise SamError(
                ErrorCode.key_pair_invalid, f"wrapped key does not unwrap ({type(exc).__name__})"
            ) from exc
        expected = rsa.RSAPrivateKey if key.spec.key_type is KeyType.RSA else ec.EllipticCurvePrivateKey
        if not isinstance(private, expected):
            raise SamError(ErrorCode.key_pair_invalid, "wrapped key is of another key type")
        return private

    async def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        self.calls += 1
        private: Any
        if spec.key_type is KeyType.RSA:
            private = rsa.generate_private_key(65537, spec.size or 2048)
        else:
            assert spec.curve is not None
            private = ec.generate_private_key(_CURVES[spec.curve.name])
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return GeneratedKeyPair(spki, self._wrap(private), self._current, WRAP_MECHANISM)

    async def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        self.calls += 1
        private = self._unwrap(key)
        algorithm = _HASHES[scheme.hash_name]()
        if scheme.mechanism is HsmMechanism.ECDSA:
            return [_raw_ecdsa(private, data) for data in inputs]
        if scheme.mechanism is HsmMechanism.RSA_PSS:
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=scheme.pss_salt_length or 0)
            return [private.sign(data, pss, Prehashed(algorithm)) for data in inputs]
        # CKM_RSA_PKCS signs the DigestInfo it is given; cryptography builds the same
        # DigestInfo from the hash, so the prefix must be the scheme's own.
        signatures = []
        for data in inputs:
            prefix, digest = data[: -scheme.digest_size], data[-scheme.digest_size :]
            if prefix != scheme.hash.digest_info_prefix:
                raise SamError(ErrorCode.hsm_unavailable, "RSA_PKCS input is not a DigestInfo of the scheme")
            signatures.append(private.sign(digest, padding.PKCS1v15(), Prehashed(algorithm)))
        return signatures

    async def rewrap(self, key: WrappedKey) -> WrappedKey:
        self.calls += 1
        return WrappedKey(key.spec, self._wrap(self._unwrap(key)), self._current, WRAP_MECHANISM)

    async def factor_mac(self, data: bytes) -> bytes:
        return hmac.new(self._factor_key, data, hashlib.sha256).digest()

    async def sign_with_state_key(self, data: bytes) -> bytes:
        return _raw_ecdsa(self.state_key, hashlib.sha256(data).digest())

    async def sign_audit_digest(self, digest: bytes) -> bytes:
        return _raw_ecdsa(self.audit_key, digest)


class MemoryLedger:
    """A ``Ledger`` that applies records at once, in call order: one replica alone on
    its log (nothing else appends, so ``read_to`` never waits)."""

    def __init__(self, reducer: Reducer) -> None:
        self.reducer = reducer
        self.position = -1
        self.records: list[dict[str, Any]] = []

    async def append(self, data: dict[str, Any]) -> Verdict:
        self.position += 1
        self.records.append(data)
        return self.reducer.apply(data, self.position)

    async def read_to(self, position: int) -> None:
        if position > self.position:
            raise SamError(ErrorCode.ledger_unavailable, "nothing else appends to this log")


class MemoryResults:
    """A ``ResultStore`` in a dict; ``failing`` makes it refuse as a store that does not
    answer. A result is found only by the request and attempt it was stored for."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, int], StoredResult] = {}
        self.failing = False

    async def put(self, request: str, attempt: int, result: StoredResult) -> None:
        if self.failing:
            raise SamError(ErrorCode.ledger_unavailable, "sam.results refused a result")
        self.results[(request, attempt)] = result

    async def get(self, request: str, attempt: int, stored_at: int) -> StoredResult:
        found = self.results.get((request, attempt))
        if self.failing or found is None:
            raise SamError(ErrorCode.ledger_unavailable, "sam.results has no such result")
        return found


class MarkedResultsIn:
    """The ``MarkReader`` over a log's ``records`` (``MemoryLedger.records``,
    ``SharedStream.records``; a record's position is its index): the result of
    ``request``'s ``attempt`` in the mark at that position, as ``MarkedResults`` reads
    it."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    async def read(self, position: int, request: str, attempt: int) -> StoredResult:
        record = self.records[position] if 0 <= position < len(self.records) else {}
        result = SadUseLog.result_in(record, request, attempt)
        if result is not None:
            try:
                return StoredResult.from_record(result)
            except (KeyError, TypeError, ValueError):
                pass
        raise SamError(ErrorCode.ledger_unavailable, "sam.sad-use has no such result there")


class SharedStream:
    """One log's records, in order, shared by the replicas (``ReplicaLedger``) of a test."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []


class ReplicaLedger:
    """One replica's view of a ``SharedStream``: it applies records only when it reads
    (its own append's read-back, or ``read_to``), so a replica can lag behind another
    as a worker's stream tail does."""

    def __init__(self, stream: SharedStream, reducer: Reducer) -> None:
        self.stream, self.reducer = stream, reducer
        self.position = -1

    def _read(self, position: int) -> Verdict:
        verdict = None
        while self.position < position:
            self.position += 1
            verdict = self.reducer.apply(self.stream.records[self.position], self.position)
        return verdict

    async def append(self, data: dict[str, Any]) -> Verdict:
        self.stream.records.append(data)
        return self._read(len(self.stream.records) - 1)

    async def read_to(self, position: int) -> None:
        if position >= len(self.stream.records):
            raise SamError(ErrorCode.ledger_unavailable, f"the log has no offset {position}")
        self._read(position)


class MemoryAudit:
    """An ``AuditSink`` that chains and signs every record at once (one batch per call,
    as in the audit trail) and keeps the entries. ``failing`` makes every record fail
    as an unavailable sink does; as in the trail, a refused request's record is written
    once the sink is back, saying what its caller got (``audit_unavailable``)."""

    def __init__(
        self,
        sign_digest: Callable[[bytes], Awaitable[bytes]] | None = None,
        node: str = "node-1",
        instance: str = "memory",
    ) -> None:
        self._sign = sign_digest if sign_digest is not None else SoftwareHsm().sign_audit_digest
        self._node, self._instance = node, instance
        self._heads: dict[AuditLog, ChainHead] = {log: ChainHead() for log in AuditLog}
        self._withheld: list[tuple[AuditEvent, int]] = []
        self.entries: list[dict[str, Any]] = []
        self.lines: list[bytes] = []
        self.events: list[AuditEvent] = []
        self.failing = False

    async def record(self, event: AuditEvent) -> dict[str, Any]:
        time_ms = int(time.time() * 1000)
        if self.failing:
            self._withheld.append((withheld_reply(event, "the audit sink is failing"), time_ms))
            raise SamError(ErrorCode.audit_unavailable, "the audit sink is failing")
        withheld = [item for item in self._withheld if item[0].log == event.log]
        batch = [*withheld, (event, time_ms)]
        try:
            entries, head = await chain_batch_signed_by(
                self._sign,
                self._node,
                self._instance,
                event.log,
                self._heads[event.log],
                batch,
                time_ms,
            )
            lines = [orjson.dumps(entry) for entry in entries]  # as the trail writes them
        except (SamError, TypeError) as exc:
            raise SamError(ErrorCode.audit_unavailable, f"audit failed ({type(exc).__name__})") from exc
        self._withheld = [item for item in self._withheld if item[0].log != event.log]
        self._heads[event.log] = head
        self.events += [item[0] for item in batch]
        self.entries += entries
        self.lines += lines
        return entries[len(withheld)]
