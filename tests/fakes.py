"""Fakes for unit tests of pure logic: a software HSM, ledgers applied in memory and an
audit sink that keeps events. Integration tests use the real parts."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from worker.domain.algorithms import HsmMechanism, KeySpec, KeyType, SignatureScheme
from worker.domain.audit import AuditEvent
from worker.domain.ledgers import Reducer
from worker.errors import SamError
from worker.hsm.api import GeneratedKeyPair, WrappedKey


def _raw_ecdsa(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    algorithm = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}[len(digest)]
    r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(algorithm))))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


class SoftwareHsm:
    """Keys in process memory; 'wrapped' keys are handles into that memory."""

    current_kek_label = "fake-kek"

    def __init__(self) -> None:
        self.state_key = ec.generate_private_key(ec.SECP256R1())
        self.audit_key = ec.generate_private_key(ec.SECP256R1())
        self._factor_key = os.urandom(32)
        self._keys: dict[bytes, Any] = {}
        self.calls = 0

    def state_public_pem(self) -> str:
        return (
            self.state_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        self.calls += 1
        key: Any = (
            rsa.generate_private_key(65537, spec.size or 2048)
            if spec.key_type is KeyType.RSA
            else ec.generate_private_key(ec.SECP256R1())
        )
        handle = os.urandom(16)
        self._keys[handle] = key
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return GeneratedKeyPair(spki, handle, self.current_kek_label, "AES_KEY_WRAP_PAD")

    def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        self.calls += 1
        private = self._keys.get(key.wrapped)
        if private is None:
            from worker.errors import ErrorCode

            raise SamError(ErrorCode.key_pair_invalid, "unknown wrapped key")
        if scheme.mechanism is HsmMechanism.ECDSA:
            return [_raw_ecdsa(private, data) for data in inputs]
        assert scheme.mechanism is HsmMechanism.RSA_PKCS
        # inputs are DigestInfo || hash; sign the hash with the matching prehash
        return [
            private.sign(data[-scheme.digest_size :], padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            for data in inputs
        ]

    def rewrap(self, key: WrappedKey) -> WrappedKey:
        return key

    def factor_mac(self, data: bytes) -> bytes:
        return hmac.new(self._factor_key, data, hashlib.sha256).digest()

    def sign_with_state_key(self, data: bytes) -> bytes:
        return _raw_ecdsa(self.state_key, hashlib.sha256(data).digest())

    def sign_audit_digest(self, digest: bytes) -> bytes:
        return _raw_ecdsa(self.audit_key, digest)


class MemoryLedger:
    """Applies records at once, in call order (one replica's view of the stream)."""

    def __init__(self, reducer: Reducer) -> None:
        self.reducer = reducer
        self.position = -1

    async def append(self, data: dict[str, Any]) -> SamError | None:
        self.position += 1
        return self.reducer.apply(data)

    async def read_to(self, position: int) -> None:
        assert position <= self.position, "nothing else appends to this log"


class SharedStream:
    """One stream's records, in log order, shared by the replicas of a test."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []


class ReplicaLedger:
    """One replica's view of a ``SharedStream``: it applies records only when it reads
    (its own append's read-back, or ``read_to``), so a replica can lag behind another."""

    def __init__(self, stream: SharedStream, reducer: Reducer) -> None:
        self.stream, self.reducer = stream, reducer
        self.position = -1

    def _read(self, position: int) -> SamError | None:
        verdict = None
        while self.position < position:
            self.position += 1
            verdict = self.reducer.apply(self.stream.records[self.position])
        return verdict

    async def append(self, data: dict[str, Any]) -> SamError | None:
        self.stream.records.append(data)
        return self._read(len(self.stream.records) - 1)

    async def read_to(self, position: int) -> None:
        assert position < len(self.stream.records), "a mark never points past the log"
        self._read(position)


class MemoryAudit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def record(self, event: AuditEvent) -> dict[str, Any]:
        self.events.append(event)
        return {}
