"""The CSC API as the gateway speaks it — pure: request shapes (CSC v2 names, and the v1
names pyHanko still sends), response documents built from a stored credential, the
CSC errors and how a SAM refusal maps to one, and the idempotency key of a
``signatures/signHash`` call.

Every request is validated strictly: unknown members are ignored (CSC lets services
extend), known ones must have their JSON type, strings and lists are bounded, and the
two spellings of one parameter must agree when both are sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.domain.algorithms import RSASSA_PSS, SIGNATURE_ALGORITHMS

__all__ = [
    "CSC_SPECS",
    "CredentialDescription",
    "CredentialInfoRequest",
    "CredentialsListRequest",
    "CscError",
    "SignHashBody",
    "SignHashRequest",
    "credential_info",
    "error_for_sam_code",
    "parse",
    "sign_hash_message_id",
]

CSC_SPECS = "2.0.0.2"
_M = TypeVar("_M", bound=BaseModel)

# bounds on what a client may send (the SAM bounds digests per request on its own)
MAX_ID = 256
MAX_SAD = 16_384
MAX_HASHES = 10_000
MAX_HASH_B64 = 100  # a SHA-512 digest is 88 characters of base64


class CscError(Exception):
    """A CSC error reply: HTTP ``status``, ``error`` (a CSC / OAuth 2 code) and a
    description that names the parameter; ``request_id``: the SAM's, when it refused."""

    def __init__(self, status: int, error: str, description: str, request_id: str | None = None) -> None:
        super().__init__(description)
        self.status, self.error, self.description, self.request_id = status, error, description, request_id

    def body(self) -> dict[str, Any]:
        document: dict[str, Any] = {"error": self.error, "error_description": self.description}
        if self.request_id is not None:
            document["request_id"] = self.request_id
        return document


def invalid(description: str) -> CscError:
    return CscError(400, "invalid_request", description)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, populate_by_name=True)


class CredentialsListRequest(_Request):
    userID: str | None = Field(default=None, max_length=MAX_ID)
    credentialInfo: bool = False
    certificates: str = Field(default="single", pattern="^(none|single|chain)$")
    certInfo: bool = False
    authInfo: bool = False
    onlyValid: bool = False
    maxResults: int | None = Field(default=None, ge=1, le=1000)
    pageToken: str | None = Field(default=None, max_length=MAX_ID)


class CredentialInfoRequest(_Request):
    credentialID: str = Field(min_length=1, max_length=MAX_ID)
    certificates: str = Field(default="single", pattern="^(none|single|chain)$")
    certInfo: bool = False
    authInfo: bool = False


class SignHashBody(_Request):
    """The signHash body as sent: CSC v2 names, and v1 names pyHanko still sends."""

    credentialID: str = Field(min_length=1, max_length=MAX_ID)
    SAD: str = Field(min_length=1, max_length=MAX_SAD)
    hashes: list[str] | None = Field(default=None, min_length=1, max_length=MAX_HASHES)
    hash: list[str] | None = Field(default=None, min_length=1, max_length=MAX_HASHES)  # v1
    hashAlgorithmOID: str | None = Field(default=None, max_length=MAX_ID)
    hashAlgo: str | None = Field(default=None, max_length=MAX_ID)  # v1
    signAlgo: str = Field(min_length=1, max_length=MAX_ID)
    signAlgoParams: str | None = Field(default=None, max_length=4096)
    operationMode: str = Field(default="S", max_length=8)
    clientData: str | None = Field(default=None, max_length=4096)


@dataclass(frozen=True)
class SignHashRequest:
    """A ``signatures/signHash`` call, its two spellings merged and decoded."""

    credential_id: str
    sad: str
    hashes: tuple[bytes, ...]
    hash_algorithm_oid: str | None
    sign_algorithm: str
    sign_algorithm_parameters: bytes | None

    @classmethod
    def of(cls, document: dict[str, Any]) -> SignHashRequest:
        wire = parse(SignHashBody, document)
        if wire.operationMode != "S":
            raise invalid("operationMode: only synchronous signing (S) is offered")
        if not _COMPACT_JWS.fullmatch(wire.SAD):
            raise invalid("Invalid parameter SAD: not a compact JWT")
        hashes = _one_of("hashes", wire.hashes, "hash", wire.hash)
        if hashes is None:
            raise invalid("Missing (or invalid type) array parameter hashes")
        hash_oid = _one_of("hashAlgorithmOID", wire.hashAlgorithmOID, "hashAlgo", wire.hashAlgo)
        decoded = tuple(_base64(h, "hashes") for h in hashes)
        params = _base64(wire.signAlgoParams, "signAlgoParams") if wire.signAlgoParams else None
        if wire.signAlgo not in SIGNATURE_ALGORITHMS:
            raise invalid(f"Invalid parameter signAlgo: {wire.signAlgo[:64]!r} is not offered")
        if wire.signAlgo == RSASSA_PSS and params is None:
            raise invalid("Missing parameter signAlgoParams: RSASSA-PSS needs its parameters")
        named = _HASH_OF_SIGNATURE.get(wire.signAlgo)
        if hash_oid is not None and named is not None and hash_oid != named:
            raise invalid("Invalid parameter hashAlgorithmOID: not the hash signAlgo names")
        return cls(wire.credentialID, wire.SAD, decoded, hash_oid, wire.signAlgo, params)


def _one_of(name: str, value: Any, v1_name: str, v1_value: Any) -> Any:
    if value is not None and v1_value is not None and value != v1_value:
        raise invalid(f"{name} and its v1 name {v1_name} disagree")
    return value if value is not None else v1_value


_SHA256, _SHA384, _SHA512 = "2.16.840.1.101.3.4.2.1", "2.16.840.1.101.3.4.2.2", "2.16.840.1.101.3.4.2.3"
# the hash each signature algorithm names (RSASSA-PSS names it in its parameters)
_HASH_OF_SIGNATURE = {
    "1.2.840.10045.4.3.2": _SHA256,
    "1.2.840.10045.4.3.3": _SHA384,
    "1.2.840.10045.4.3.4": _SHA512,
    "1.2.840.113549.1.1.11": _SHA256,
    "1.2.840.113549.1.1.12": _SHA384,
    "1.2.840.113549.1.1.13": _SHA512,
}
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
# a compact JWS: three base64url segments (the SAM checks the rest)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _base64(text: str, name: str) -> bytes:
    """Canonical base64 or base64url, never empty: no character is dropped on the way,
    so one value has one spelling's worth of meaning."""
    if len(text) > MAX_HASH_B64 and name == "hashes":
        raise invalid(f"Invalid parameter {name}: a value is too long for a hash")
    try:
        if _BASE64.fullmatch(text) and len(text) % 4 == 0:
            decoded = base64.b64decode(text, validate=True)
        elif _BASE64URL.fullmatch(text):
            decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        else:
            raise ValueError(name)
    except (binascii.Error, ValueError):
        raise invalid(f"Invalid parameter {name}: not base64") from None
    if not decoded:
        raise invalid(f"Invalid parameter {name}: empty")
    return decoded


def parse(model: type[_M], document: Any) -> _M:
    """``document`` as ``model``, or ``invalid_request`` naming the first bad parameter."""
    if not isinstance(document, dict):
        raise invalid("the request body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise invalid(f"Missing or invalid parameter {where}") from None


# --- responses --------------------------------------------------------------------------

_EC_KEY = "1.2.840.10045.2.1"
_RSA_KEY = "1.2.840.113549.1.1.1"
_CURVE_OIDS = {"secp256r1": "1.2.840.10045.3.1.7", "secp384r1": "1.3.132.0.34", "secp521r1": "1.3.132.0.35"}
_CURVE_BITS = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}
_EC_SIGNATURES = [oid for oid in SIGNATURE_ALGORITHMS if oid.startswith("1.2.840.10045.4.3.")]
_RSA_SIGNATURES = [oid for oid in SIGNATURE_ALGORITHMS if oid.startswith("1.2.840.113549.1.1.")]


@dataclass(frozen=True)
class CredentialDescription:
    """What ``credentials/info`` tells of a credential: its key (``algorithm`` RSA or
    ECDSA, RSA ``size`` or ``named_curve``), whether it is enabled, and its certificate
    chain (signer's certificate first, DER)."""

    credential_id: str
    algorithm: str
    size: int | None
    named_curve: str | None
    enabled: bool
    chain: tuple[bytes, ...]
    multisign: int
    description: str | None = None


def credential_info(credential: CredentialDescription, certificates: str, cert_info: bool) -> dict[str, Any]:
    """The ``credentials/info`` response (CSC v2 §11.5) for ``credential``."""
    ec = credential.algorithm == "ECDSA"
    key: dict[str, Any] = {
        "status": "enabled" if credential.enabled else "disabled",
        # the key's own algorithm and the signature algorithms it signs with: clients
        # (pyHanko among them) check the mechanism they chose against this list
        "algo": [_EC_KEY, *_EC_SIGNATURES] if ec else [_RSA_KEY, *_RSA_SIGNATURES],
        "len": _CURVE_BITS.get(credential.named_curve or "", 0) if ec else credential.size,
    }
    if ec and credential.named_curve in _CURVE_OIDS:
        key["curve"] = _CURVE_OIDS[credential.named_curve or ""]
    cert: dict[str, Any] = {"status": "valid" if credential.chain else "not_yet_issued"}
    if certificates != "none" and credential.chain:
        chosen = credential.chain if certificates == "chain" else credential.chain[:1]
        cert["certificates"] = [base64.b64encode(der).decode() for der in chosen]
    if cert_info and credential.chain:
        certificate = x509.load_der_x509_certificate(credential.chain[0])
        cert |= {
            "issuerDN": certificate.issuer.rfc4514_string(),
            "serialNumber": format(certificate.serial_number, "x"),
            "subjectDN": certificate.subject.rfc4514_string(),
            "validFrom": certificate.not_valid_before_utc.strftime("%Y%m%d%H%M%SZ"),
            "validTo": certificate.not_valid_after_utc.strftime("%Y%m%d%H%M%SZ"),
        }
    document: dict[str, Any] = {
        "key": key,
        "cert": cert,
        "auth": {"mode": "oauth2code"},
        "SCAL": "2",
        "multisign": credential.multisign,
        "lang": "en",
    }
    if credential.description:
        document["description"] = credential.description
    return document


# --- errors -----------------------------------------------------------------------------

# A SAM refusal as the CSC client sees it. SAD problems are the signer's authorization:
# invalid_request naming the SAD, as CSC's signHash errors do; an outage is 503
# temporarily_unavailable, which clients may retry (with the same call: see
# sign_hash_message_id); anything else the gateway or the SAM got wrong is a 500.
_SAD_CODES = {
    "sad_missing": "Missing (or invalid type) string parameter SAD",
    "sad_expired": "SAD expired",
    "sad_replayed": "SAD already used",
}
_UNAVAILABLE = {"audit_unavailable", "ledger_unavailable", "hsm_unavailable", "request_expired"}
_REQUEST_CODES = {
    "too_many_digests": "Invalid parameter hashes: more than the credential's multisign",
    "invalid_dtbs": "Invalid parameter hashes: a hash's length does not match its algorithm",
    "unsupported_algorithm": "Invalid parameter signAlgo",
    "algorithm_key_mismatch": "Invalid parameter signAlgo: not for this credential's key",
    "invalid_algorithm_parameters": "Invalid parameter signAlgoParams",
    "key_pair_disabled": "The credential is disabled",
    "key_pair_not_certified": "The credential has no certificate yet",
    "key_pair_deleted": "Invalid parameter credentialID",
}


# Refusals that mean the gateway itself is misconfigured (its SSA account, key or
# permissions), not that the client asked wrongly: the client cannot mend them
_GATEWAY_FAULTS = {
    "missing_user_id",
    "unknown_user",
    "request_signature_missing",
    "request_signature_invalid",
    "operation_not_permitted",
    "reply_to_not_permitted",
    "wrong_queue",
    "key_pair_not_owned",
    "internal_error",
}


def error_for_sam_code(code: str, status: int, request_id: str | None) -> CscError:
    """The CSC error for a SAM refusal: its stable ``code`` and HTTP-like ``status``."""
    if code in _SAD_CODES:
        return CscError(400, "invalid_request", _SAD_CODES[code], request_id)
    if code.startswith("sad_"):  # the SAD does not authorize this: another signer, hash, key...
        return CscError(400, "invalid_request", f"Invalid parameter SAD ({code})", request_id)
    if code in _GATEWAY_FAULTS:
        return CscError(500, "server_error", f"the signing service refused the gateway ({code})", request_id)
    if code in _UNAVAILABLE or status == 503:
        return CscError(
            503, "temporarily_unavailable", f"the signing service is unavailable ({code})", request_id
        )
    if code in _REQUEST_CODES:
        return CscError(400, "invalid_request", _REQUEST_CODES[code], request_id)
    if 400 <= status < 500:  # what the client sent, as the SAM saw it
        return CscError(
            400, "invalid_request", f"the signing service refused the request ({code})", request_id
        )
    return CscError(500, "server_error", f"the signing service failed ({code})", request_id)


def sign_hash_message_id(issuer: str, user: str, request: SignHashRequest) -> str:
    """The SAM ``message_id`` of a signHash call: the same for the same user, credential,
    SAD, hashes and algorithm, so a client that retries after a lost response meets the
    SAM's repeat and gets the first call's signatures, not ``sad_replayed``."""
    digest = hashlib.sha256()
    parts = (
        issuer,
        user,
        request.credential_id,
        request.sad,
        request.sign_algorithm,
        request.hash_algorithm_oid or "",
        base64.b64encode(request.sign_algorithm_parameters or b"").decode(),
    )
    for part in parts:
        digest.update(part.encode() + b"\0")
    for value in request.hashes:
        digest.update(hashlib.sha256(value).digest())
    return str(uuid.UUID(bytes=digest.digest()[:16], version=4))
