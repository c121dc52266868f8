"""The small interface the service needs from an HSM.

Calls are synchronous on purpose: SoftHSM runs without locking under python-pkcs11,
and measurements (DESIGN.md §4) showed that calling it inline on the event-loop
thread, one session per process, beats executor threads. Implementations raise
``SamError`` only (``hsm_unavailable`` or ``key_pair_invalid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.domain.algorithms import KeySpec, SignatureScheme

__all__ = ["GeneratedKeyPair", "Hsm", "WrappedKey"]


@dataclass(frozen=True)
class GeneratedKeyPair:
    public_key_der: bytes  # SubjectPublicKeyInfo
    wrapped_private_key: bytes
    kek_label: str
    wrap_mechanism: str


@dataclass(frozen=True)
class WrappedKey:
    spec: KeySpec
    wrapped: bytes
    kek_label: str
    wrap_mechanism: str


class Hsm(Protocol):
    def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        """Generate in the HSM, wrap the private key under the current KEK, keep nothing."""
        ...

    def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        """Unwrap into a session object, sign each prepared input, destroy the object."""
        ...

    def rewrap(self, key: WrappedKey) -> WrappedKey:
        """Unwrap under the key's KEK and wrap again under the current one, inside the HSM."""
        ...

    @property
    def current_kek_label(self) -> str:
        """The KEK new and re-wrapped key pairs are wrapped under."""
        ...

    def factor_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 with the HSM factor key (verifiers of SAM-managed factors)."""
        ...

    def sign_with_state_key(self, data: bytes) -> bytes:
        """ES256 (raw r||s) over SHA-256(data) with the key-pair sealing key."""
        ...

    def sign_audit_digest(self, digest: bytes) -> bytes:
        """ECDSA P-256 (raw r||s) over a SHA-256 digest with the audit key."""
        ...
