"""Who may ask, and whether the signer authorized exactly this.

Two checks live here, both pure: the request JWS that binds an AMQP message to its
sender's registered key, and the SAD (a JWT from a registered authorization server)
that binds the signer, the key pair and the exact DTBS/R. Single use of the SAD's
``jti`` needs the cluster-wide ledger and is decided by the service, not here.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from dataclasses import dataclass

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.domain.configuration import DynamicState, SadPolicy
from worker.domain.contract import JsonInteger
from worker.domain.keys import RegisteredKey
from worker.domain.wire import decode_base64_or_base64url, json_object
from worker.errors import ErrorCode, SamError

__all__ = [
    "JOSE_FAILURES",
    "SAD_TYPE_DELETION",
    "SAD_TYPE_SIGNATURE",
    "SKAD_TYPE_ASSIGNMENT",
    "RequestBinding",
    "SadClaims",
    "SadExpectation",
    "b64url",
    "request_jws_payload",
    "verify_request_jws",
    "verify_sad",
]

# What joserfc raises for tokens it cannot read: besides its own errors, a header whose
# values have the wrong JSON type (``"crit": [1]``) surfaces as TypeError or KeyError.
JOSE_FAILURES: tuple[type[Exception], ...] = (JoseError, ValueError, TypeError, KeyError, AttributeError)

SAD_TYPE_SIGNATURE = "credential"
SKAD_TYPE_ASSIGNMENT = "sam_key_assignment"
SAD_TYPE_DELETION = "sam_key_deletion"


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class RequestBinding:
    """What a request JWS must bind: the message as the broker delivered it."""

    body: bytes
    message_id: str
    operation: str
    user_id: str


def request_jws_payload(binding: RequestBinding, iat: int) -> bytes:
    """The payload an SSA or administrator signs for one message (the SDK uses this)."""
    return orjson.dumps(
        {
            "body_sha256": b64url(hashlib.sha256(binding.body).digest()),
            "message_id": binding.message_id,
            "type": binding.operation,
            "user_id": binding.user_id,
            "iat": iat,
        },
        option=orjson.OPT_SORT_KEYS,
    )


def verify_request_jws(
    token: str | None,
    key: RegisteredKey,
    binding: RequestBinding,
    now: int | None,
    max_age: int,
) -> None:
    """Raise unless ``token`` is a JWS by ``key`` over exactly this message.

    ``now=None`` skips the freshness check: used when replaying the configuration
    stream, where the record was checked fresh when it was first accepted.
    """
    if not token:
        raise SamError(ErrorCode.request_signature_missing)
    try:
        verified = jws.deserialize_compact(token, key.jwk, algorithms=key.algorithms)
    except JOSE_FAILURES as exc:
        raise SamError(
            ErrorCode.request_signature_invalid, f"request JWS rejected ({type(exc).__name__})"
        ) from exc
    if "crit" in verified.headers():  # no critical header parameter is understood here
        raise SamError(ErrorCode.request_signature_invalid, "request JWS header has crit")
    claims = json_object(verified.payload, ErrorCode.request_signature_invalid, "request JWS payload")
    expected = orjson.loads(request_jws_payload(binding, 0))
    for name in ("body_sha256", "message_id", "type", "user_id"):
        if claims.get(name) != expected[name]:
            raise SamError(ErrorCode.request_signature_invalid, f"request JWS does not bind this {name}")
    iat = claims.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise SamError(ErrorCode.request_signature_invalid, "request JWS has no integer iat")
    if now is not None and abs(now - iat) > max_age:
        raise SamError(ErrorCode.request_signature_invalid, "request JWS is too old or from the future")


# --- SAD -------------------------------------------------------------------------------


class _Claims(BaseModel):
    # other claims are the AS's business; those the SAM reads have exactly their JSON type
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class DocumentDigest(_Claims):
    """One authorized DTBS/R: canonical padded base64 or canonical unpadded base64url of
    the hash; any other spelling authorizes nothing."""

    hash: str
    label: str | None = None


class AuthorizationDetail(_Claims):
    """One RAR ``authorization_details`` entry: what the signer authorized for which key pair."""

    type: str
    credentialID: str
    hashAlgorithmOID: str | None = None
    documentDigests: list[DocumentDigest] = Field(default_factory=list, max_length=10_000)
    numSignatures: JsonInteger | None = None


class SadClaims(_Claims):
    """The claims of a SAD or SKAD, shaped like a CSC v2 / OAuth 2 RAR access token."""

    iss: str
    aud: str | list[str]
    sub: str
    iat: JsonInteger
    exp: JsonInteger
    nbf: JsonInteger | None = None
    jti: str = Field(min_length=8, max_length=256)
    amr: list[str] = Field(default_factory=list)
    acr: str | None = None
    authorization_details: list[AuthorizationDetail] = Field(min_length=1, max_length=16)


@dataclass(frozen=True)
class SadExpectation:
    """What the request asks for; the SAD must authorize exactly this."""

    ssa: str
    signer: str
    key_pair_id: str
    hash_oid: str | None = None  # None: the SAD authorizes no digests (SKAD, deletion)
    digests: tuple[bytes, ...] = ()
    detail_type: str = SAD_TYPE_SIGNATURE
    # the AS bound to the key pair's signer: a signer is (AS, subject), so only its own
    # AS speaks for it (None: any AS the SSA may use — a SKAD before the binding)
    issuer: str | None = None


def verify_sad(
    token: str | None,
    state: DynamicState,
    audience: str,
    policy: SadPolicy,
    expected: SadExpectation,
    now: int,
) -> SadClaims:
    """Check a SAD end to end except ``jti`` single use; return its claims.

    In order: signed by a registered authorization server that this SSA may use (and
    the one bound to the key pair's signer, if any), for
    this SAM, alive now within the policy's lifetime, for this signer, with exactly one
    authorization detail of the expected type for this key pair and these DTBS/R, and
    with enough authentication factors. Each refusal has its own ``sad_*`` code."""
    if not token:
        raise SamError(ErrorCode.sad_missing)
    claims = _verified_claims(token, state, expected.ssa, expected.issuer)
    audiences = [claims.aud] if isinstance(claims.aud, str) else claims.aud
    if audience not in audiences:
        raise SamError(ErrorCode.sad_audience_mismatch)
    _check_lifetime(claims, policy, now)
    if claims.sub != expected.signer:
        raise SamError(ErrorCode.sad_signer_mismatch)
    _check_detail(claims, expected)
    if len(set(claims.amr)) < policy.min_authentication_factors:
        raise SamError(ErrorCode.sad_authentication_insufficient)
    return claims


def _verified_claims(token: str, state: DynamicState, ssa_id: str, bound: str | None) -> SadClaims:
    """The claims of a SAD signed by a registered AS that ``ssa_id`` may use and, when
    the key pair's signer is ``bound`` to one, by that one."""
    try:
        header = jws.extract_compact(token.encode()).headers()
    except JOSE_FAILURES as exc:
        raise SamError(ErrorCode.sad_invalid, f"SAD is not a compact JWS ({type(exc).__name__})") from exc
    if "crit" in header:  # this SAM understands no critical header parameter (RFC 7515 §4.1.11)
        raise SamError(ErrorCode.sad_invalid, "SAD header has crit")
    issuer = header.get("kid")
    if not isinstance(issuer, str) or issuer not in state.authorization_servers:
        raise SamError(ErrorCode.sad_issuer_unknown, "SAD kid names no registered authorization server")
    ssa = state.ssa(ssa_id)
    if ssa is None or issuer not in ssa.allowed_authorization_servers:
        raise SamError(ErrorCode.sad_issuer_not_allowed, f"{ssa_id} may not use {issuer}")
    if bound is not None and issuer != bound:
        raise SamError(ErrorCode.sad_issuer_mismatch, f"this key pair's signer is spoken for by {bound}")
    key = state.authorization_servers[issuer]
    if header.get("alg") not in key.algorithms:
        alg = str(header.get("alg"))[:16]  # the sender's text: bounded, and quoted by repr
        raise SamError(ErrorCode.sad_invalid, f"SAD alg {alg!r} is not allowed for {issuer}")
    try:
        payload = jws.deserialize_compact(token, key.jwk, algorithms=key.algorithms).payload
    except JOSE_FAILURES as exc:
        raise SamError(
            ErrorCode.sad_signature_invalid, f"SAD signature rejected ({type(exc).__name__})"
        ) from exc
    document = json_object(payload, ErrorCode.sad_invalid, "SAD payload")  # a name twice: refused
    try:
        claims = SadClaims.model_validate(document)
    except ValidationError as exc:
        raise SamError(ErrorCode.sad_invalid, "SAD claims do not match the SAD schema") from exc
    if claims.iss != issuer:
        raise SamError(ErrorCode.sad_invalid, "SAD iss differs from its kid")
    return claims


def _check_lifetime(claims: SadClaims, policy: SadPolicy, now: int) -> None:
    skew = policy.clock_skew_seconds
    if claims.iat > now + skew or claims.exp <= now - skew:
        raise SamError(ErrorCode.sad_expired)
    if claims.nbf is not None and claims.nbf > now + skew:
        raise SamError(ErrorCode.sad_expired, "SAD is not valid yet (nbf)")
    if claims.exp - claims.iat > policy.max_lifetime_seconds:
        raise SamError(ErrorCode.sad_expired, "SAD lifetime exceeds the policy maximum")


def _check_detail(claims: SadClaims, expected: SadExpectation) -> None:
    """Exactly one detail of the expected type, for this key pair and, for a signature,
    exactly these DTBS/R (as a multiset) under this hash algorithm."""
    details = [d for d in claims.authorization_details if d.type == expected.detail_type]
    if len(details) != 1:
        raise SamError(ErrorCode.sad_invalid, f"SAD needs exactly one {expected.detail_type!r} detail")
    detail = details[0]
    if detail.credentialID != expected.key_pair_id:
        raise SamError(ErrorCode.sad_key_pair_mismatch)
    if expected.hash_oid is None:
        if detail.documentDigests:
            raise SamError(ErrorCode.sad_invalid, f"a {expected.detail_type} SAD authorizes no digests")
        return
    if detail.hashAlgorithmOID != expected.hash_oid:
        raise SamError(ErrorCode.sad_digest_mismatch, "SAD authorizes another hash algorithm")
    authorized = Counter(decode_base64_or_base64url(d.hash) for d in detail.documentDigests)
    if authorized != Counter(expected.digests):
        raise SamError(ErrorCode.sad_digest_mismatch)
    if detail.numSignatures is not None and detail.numSignatures != len(expected.digests):
        raise SamError(ErrorCode.sad_digest_mismatch, "SAD numSignatures differs from the request")
