"""The stateless key pair: what the SAM seals, hands to the SSA and trusts again.

A key pair leaves the SAM as a compact JWS signed by the HSM state key. Everything
the SAM relies on later — id, algorithm, public key, the KEK-wrapped private key,
signer binding and status — is read back from inside that signature; the readable
copy beside it is for the SSA only.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import orjson
from joserfc import jws
from pydantic import BaseModel, ConfigDict, ValidationError

from worker.domain.algorithms import CURVES, KeySpec, KeyType
from worker.domain.authorization import JOSE_FAILURES, b64url
from worker.domain.contract import KeyPairObject, KeyPairStatus, Signer
from worker.domain.keys import RegisteredKey
from worker.errors import ErrorCode, SamError

__all__ = ["KeyPairSealer", "SealedKeyPair"]

SEAL_TYPE = "sam-key-pair+jws"


class SealedKeyPair(BaseModel):
    """The payload of a sealed key pair (format version 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # 1: before tenant binding (no owner; refused until an administrator binds it)
    v: int = 2
    sam: str
    id: str
    owner: str | None = None  # the SSA that created it (or an administrator bound it to)
    authorization_server: str | None = None  # from assignment on: the AS that speaks for its signer
    algorithm: KeyType
    size: int | None = None
    named_curve: str | None = None
    public_key: str  # base64 DER SubjectPublicKeyInfo
    wrapped_private_key: str  # base64, KEK-wrapped
    kek: str  # label of the wrapping key in the HSM
    wrap_mechanism: str
    status: KeyPairStatus
    signer: str | None = None
    subject: str | None = None
    certificate: str | None = None  # base64 DER
    factor_type: str | None = None
    factor_verifier: str | None = None  # base64 HSM MAC; the factor itself is never kept
    # Every state change appends to sam.key-events with the next revision; a copy older
    # than the newest revision a worker has seen is refused (no rollback by replay).
    revision: int = 0
    created: int

    @property
    def key_spec(self) -> KeySpec:
        if self.algorithm is KeyType.RSA:
            return KeySpec(KeyType.RSA, size=self.size)
        return KeySpec(KeyType.EC, curve=CURVES[self.named_curve or ""])

    @property
    def wrapped_key_bytes(self) -> bytes:
        return base64.b64decode(self.wrapped_private_key)

    @property
    def public_key_der(self) -> bytes:
        return base64.b64decode(self.public_key)

    def next_revision(self, **changes: object) -> SealedKeyPair:
        return self.model_copy(update={**changes, "revision": self.revision + 1})

    def readable(self, sealed: str) -> KeyPairObject:
        return KeyPairObject(
            sealed=sealed,
            id=self.id,
            algorithm=self.algorithm.value,
            size=self.size,
            named_curve=self.named_curve,
            public_key=self.public_key,
            status=self.status,
            signer=Signer(id=self.signer) if self.signer else None,
            owner=self.owner,
            authorization_server=self.authorization_server,
            subject=self.subject,
            certificate=self.certificate,
            revision=self.revision,
            kek=self.kek,
            sam_factor="pin" if self.factor_type == "pin" else None,
        )


class KeyPairSealer:
    """Seals key pairs with the HSM state key and opens them with its public key.

    ``sign_es256`` returns the raw r||s ECDSA P-256 signature of SHA-256(input) — the
    JWS ES256 form, as PKCS#11 ``CKM_ECDSA`` returns it. ``open`` refuses a seal that does
    not verify, is no sealed key pair or comes from another SAM (``key_pair_invalid``).
    """

    def __init__(
        self,
        sam_id: str,
        state_key_label: str,
        state_public_key: RegisteredKey,
        sign_es256: Callable[[bytes], Awaitable[bytes]],
        cache_size: int = 4096,
    ) -> None:
        self._sam_id = sam_id
        self._public_key = state_public_key
        self._sign = sign_es256
        self._header = b64url(orjson.dumps({"alg": "ES256", "kid": state_key_label, "typ": SEAL_TYPE}))
        # Seals already verified, by their exact text: an SSA signing with one key pair
        # sends the same seal again and again. A seal is immutable, so its verdict is too.
        self._opened: OrderedDict[str, SealedKeyPair] = OrderedDict()
        self._cache_size = cache_size

    async def seal(self, key_pair: SealedKeyPair) -> str:
        signing_input = f"{self._header}.{b64url(key_pair.model_dump_json().encode())}"
        return f"{signing_input}.{b64url(await self._sign(signing_input.encode()))}"

    def open(self, sealed: str) -> SealedKeyPair:
        key_pair = self._opened.get(sealed)
        if key_pair is not None:
            self._opened.move_to_end(sealed)
            return key_pair
        key_pair = self._verify(sealed)
        self._opened[sealed] = key_pair
        if len(self._opened) > self._cache_size:
            self._opened.popitem(last=False)
        return key_pair

    def _verify(self, sealed: str) -> SealedKeyPair:
        try:
            verified = jws.deserialize_compact(sealed, self._public_key.jwk, algorithms=["ES256"])
        except JOSE_FAILURES as exc:
            raise SamError(
                ErrorCode.key_pair_invalid, f"key pair seal does not verify ({type(exc).__name__})"
            ) from exc
        if verified.headers().get("typ") != SEAL_TYPE:
            raise SamError(ErrorCode.key_pair_invalid, "not a sealed key pair")
        try:
            key_pair = SealedKeyPair.model_validate_json(verified.payload)
        except ValidationError as exc:
            raise SamError(ErrorCode.key_pair_invalid, "sealed key pair payload is malformed") from exc
        if key_pair.sam != self._sam_id:
            raise SamError(ErrorCode.key_pair_invalid, "key pair was sealed by another SAM")
        return key_pair
