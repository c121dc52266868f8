"""The message contract: operations, their queues, request and reply bodies.

These pydantic models are the single source of truth for the wire format; the JSON
Schemas in ``schemas/`` are generated from them (``sam-admin schemas``) and a test
fails when they drift.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

__all__ = [
    "HEADER_ANSWER_BY",
    "HEADER_REPEAT",
    "HEADER_REQUEST_JWS",
    "HEADER_SAD",
    "HEADER_STATUS",
    "OPERATION_QUEUE",
    "REQUEST_MODELS",
    "AlgorithmParameters",
    "AssignRequest",
    "AuthorizationServer",
    "DynamicConfiguration",
    "ErrorBody",
    "ErrorReply",
    "Identifier",
    "JsonInteger",
    "KeyPairBindRequest",
    "KeyPairCreateRequest",
    "KeyPairDeleteReply",
    "KeyPairDeleteRequest",
    "KeyPairObject",
    "KeyPairReply",
    "KeyPairRewrapRequest",
    "KeyPairStatus",
    "KeyPairUpdateRequest",
    "KeyTemplate",
    "Operation",
    "Pem",
    "ProofOfPossessionInput",
    "ProofOfPossessionReply",
    "ProofOfPossessionRequest",
    "QueueClass",
    "SamFactor",
    "Signature",
    "SignatureRequest",
    "SignaturesCreateRequest",
    "SignaturesReply",
    "Signer",
    "SigningServicePrivilegedUser",
]

HEADER_REQUEST_JWS = "sam-request-jws"
HEADER_SAD = "sam-sad"
HEADER_STATUS = "sam-status"
# on a reply: true when it is the stored result of an earlier attempt of the same request
HEADER_REPEAT = "sam-repeat"
# on a request (optional): epoch milliseconds after which its caller no longer waits; the
# SAM then releases no result of it (request_expired)
HEADER_ANSWER_BY = "sam-answer-by"

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Pem = Annotated[str, StringConstraints(min_length=1, max_length=8192)]


class Operation(StrEnum):
    """The operations a SAM answers; the value is the request's AMQP ``type`` (any other:
    ``unknown_operation``)."""

    configurations_dynamic_put = "configurations.dynamic.put"
    configurations_dynamic_get = "configurations.dynamic.get"
    key_pairs_create = "key_pairs.create"
    signers_key_pairs_assign = "signers.key_pairs.assign"
    proofs_of_possession_create = "proofs_of_possession.create"
    key_pairs_update = "key_pairs.update"
    key_pairs_delete = "key_pairs.delete"
    key_pairs_rewrap = "key_pairs.rewrap"
    key_pairs_bind = "key_pairs.bind"
    signatures_create = "signatures.create"


class QueueClass(StrEnum):
    """The work queues ``sam.<class>`` and their routing keys. ``admin`` operations are for
    administrators only, the others for SSAs only (``operation_not_permitted``)."""

    admin = "admin"
    keys = "keys"
    signatures = "signatures"

    @property
    def queue_name(self) -> str:
        return f"sam.{self.value}"


OPERATION_QUEUE: dict[Operation, QueueClass] = {
    Operation.configurations_dynamic_put: QueueClass.admin,
    Operation.configurations_dynamic_get: QueueClass.admin,
    Operation.key_pairs_create: QueueClass.keys,
    Operation.signers_key_pairs_assign: QueueClass.keys,
    Operation.proofs_of_possession_create: QueueClass.keys,
    Operation.key_pairs_update: QueueClass.keys,
    Operation.key_pairs_delete: QueueClass.keys,
    Operation.key_pairs_rewrap: QueueClass.keys,
    Operation.key_pairs_bind: QueueClass.admin,
    Operation.signatures_create: QueueClass.signatures,
}


def _json_integer(value: object) -> object:
    """A JSON number with no fraction (2048 or 2048.0, as JSON Schema's ``integer``);
    never a string ("2048") or a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a JSON integer")
        return int(value)
    return value


# Strict mode refuses what JSON Schema refuses ("2048" for an integer, "no" for a
# boolean) and this type accepts what it accepts (2048.0 is an integer there), so the
# published schemas and the parser agree on every document (tests/unit/test_wire_strict.py).
JsonInteger = Annotated[int, BeforeValidator(_json_integer)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- dynamic configuration -----------------------------------------------------------


class AuthorizationServer(_Strict):
    """An authorization server whose SADs and SKADs this SAM accepts: ``id`` is their JWS
    ``kid`` and ``iss``; others are refused as ``sad_issuer_unknown``."""

    id: Identifier
    public_key: Pem = Field(description="PEM SubjectPublicKeyInfo of the key that signs SADs")


class SigningServicePrivilegedUser(_Strict):
    """An SSA, which may call the key and signature operations and relay SADs only from the
    authorization servers it lists (others: ``sad_issuer_not_allowed``)."""

    id: Identifier = Field(description="The certificate CN the SSA connects with (= AMQP user_id)")
    public_key: Pem = Field(description="PEM SubjectPublicKeyInfo of the key that signs request JWS")
    allowed_authorization_servers: list[Identifier] = Field(max_length=64)
    trust_anchors: list[Pem] = Field(
        default_factory=list,
        max_length=64,
        description="PEM CA certificates this SSA's certificates may chain to, besides the global ones",
    )


class DynamicConfiguration(_Strict):
    """Body of ``configurations.dynamic.put``: the registered authorization servers and SSAs.
    Refused as ``configuration_version_conflict`` unless ``version`` is above the current
    one, as ``configuration_invalid`` for a duplicate id, an unknown server or a bad key."""

    version: JsonInteger = Field(ge=1, le=2**53)
    authorization_servers: list[AuthorizationServer] = Field(max_length=256)
    signing_service_privileged_users: list[SigningServicePrivilegedUser] = Field(max_length=1024)
    trust_anchors: list[Pem] = Field(
        default_factory=list,
        max_length=64,
        description="PEM CA certificates every SSA's key pair certificates may chain to",
    )


# --- key pairs -------------------------------------------------------------------------


class KeyTemplate(_Strict):
    """The key pair to generate: RSA of ``size`` 2048, 3072 or 4096, or ECDSA on ``named_curve``
    secp256r1, secp384r1 or secp521r1 (alias prime256v1, prime384v1, prime521v1); anything
    else is ``unsupported_algorithm``."""

    algorithm: Literal["RSA", "ECDSA"]
    size: JsonInteger | None = None
    named_curve: str | None = Field(default=None, max_length=32)


class KeyPairCreateRequest(_Strict):
    """Body of ``key_pairs.create``: a new key pair in the HSM, unassigned, sealed for the SSA."""

    key_template: KeyTemplate


class KeyPairStatus(_Strict):
    """Where a key pair stands. Assigned and certified are never undone
    (``status_transition_invalid``); only a certified, enabled key pair signs."""

    assigned: bool
    certified: bool
    enabled: bool


class SamFactor(_Strict):
    """A SAM-managed authentication factor (partially delegated scheme)."""

    type: Literal["pin"]
    value: Annotated[str, StringConstraints(min_length=4, max_length=64)]


class Signer(_Strict):
    """A signer, by the id its authorization server puts in the SAD ``sub`` (a SAD for another
    signer: ``sad_signer_mismatch``)."""

    id: Identifier


class KeyPairObject(_Strict):
    """A key pair as it travels between SAM and SSA.

    Only ``sealed`` counts: a compact JWS by the SAM's state key whose payload holds
    everything the SAM relies on. The other fields are a readable copy for the SSA's
    database; the SAM ignores them on input.
    """

    sealed: Annotated[str, StringConstraints(min_length=1, max_length=32768)]
    id: str | None = None
    algorithm: Literal["RSA", "ECDSA"] | None = None
    size: JsonInteger | None = None
    named_curve: str | None = None
    public_key: str | None = Field(default=None, description="base64 DER SubjectPublicKeyInfo")
    status: KeyPairStatus | None = None
    signer: Signer | None = None
    subject: str | None = None
    certificate: str | None = Field(default=None, description="base64 DER X.509 certificate")
    revision: JsonInteger | None = None
    owner: str | None = Field(default=None, description="the SSA the key pair belongs to")
    authorization_server: str | None = Field(
        default=None, description="the authorization server that speaks for its signer (from assignment on)"
    )
    kek: str | None = None
    sam_factor: Literal["pin"] | None = None


class KeyPairReply(_Strict):
    """Reply of an operation that creates or changes a key pair: its new copy, which
    supersedes every older one (older copies: ``key_pair_outdated``)."""

    key_pair: KeyPairObject


class AssignRequest(_Strict):
    """Body of ``signers.key_pairs.assign``: bind an unassigned key pair to a signer and subject
    for good (again: ``key_pair_already_assigned``), with the signer's SKAD when given or
    when the policy requires one."""

    key_pair: KeyPairObject
    signer: Signer
    subject: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="the signer's distinguished name, RFC 4514 (e.g. CN=Alice,O=Example,C=ES)"
    )
    sam_factor: SamFactor | None = Field(default=None, description="enrol a SAM-managed factor")
    authorization_server: Identifier | None = Field(
        default=None,
        description=(
            "the authorization server that speaks for the signer from now on; with a SKAD, its issuer; "
            "without one, required unless the SSA may use only one"
        ),
    )


class KeyPairUpdateRequest(_Strict):
    """Body of ``key_pairs.update``: the signer's own key pair (``signer_mismatch``) gets a new
    status; certifying it needs its certificate (``certificate_required``)."""

    key_pair: KeyPairObject
    signer: Signer
    status: KeyPairStatus
    certificate: Annotated[str, StringConstraints(min_length=1, max_length=65536)] | None = Field(
        default=None,
        description="canonical base64 (RFC 4648 §4, padded) DER X.509 certificate; required to certify",
    )
    certificate_chain: list[Annotated[str, StringConstraints(min_length=1, max_length=65536)]] = Field(
        default_factory=list,
        max_length=8,
        description="canonical base64 DER CA certificates between the certificate and a trust anchor",
    )


class KeyPairDeleteRequest(_Strict):
    """Body of ``key_pairs.delete``: delete a key pair for good. An assigned one needs its
    ``signer`` (``signer_mismatch``); a SAD, when given, must be the signer's deletion SAD."""

    key_pair: KeyPairObject
    signer: Signer | None = None


class KeyPairDeleteReply(_Strict):
    """Reply of ``key_pairs.delete``: every later request with the key pair is refused as
    ``key_pair_deleted``."""

    key_pair_id: str
    deleted: bool


class KeyPairRewrapRequest(_Strict):
    """Body of ``key_pairs.rewrap``: wrap the private key under the current KEK; a key pair
    already under it comes back unchanged."""

    key_pair: KeyPairObject


class KeyPairBindRequest(_Strict):
    """An administrator binds a key pair to an SSA: one sealed before key pairs had an
    owner, or one moved to another SSA. An assigned key pair keeps the authorization
    server that speaks for its signer (one sealed before binding names it here)."""

    key_pair: KeyPairObject
    owner: Identifier = Field(description="the registered SSA the key pair belongs to from now on")
    authorization_server: Identifier | None = Field(
        default=None, description="for an assigned key pair sealed without one: the AS of its signer"
    )


# --- signatures ------------------------------------------------------------------------

Oid = Annotated[str, StringConstraints(min_length=3, max_length=64, pattern=r"^[0-2](\.[0-9]+)+$")]


AlgorithmParameters = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class SignatureRequest(_Strict):
    """One DTBS/R to sign. Its own signature algorithm, if given, must be the request's
    (``unsupported_algorithm``); its length must fit the hash (``invalid_dtbs``)."""

    dtbs: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="canonical base64 (RFC 4648 §4, padded) of the DTBS/R (the hash to sign)"
    )
    signature_algorithm: Oid | None = Field(
        default=None, description="if given, must equal the request's: one SAD names one hash"
    )
    signature_algorithm_parameters: AlgorithmParameters | None = Field(
        default=None,
        description="canonical base64 DER parameters (RSASSA-PSS-params for 1.2.840.113549.1.1.10)",
    )


class SignaturesCreateRequest(_Strict):
    """Body of ``signatures.create``: DTBS/R for the signer's certified, enabled key pair, with a
    SAD for exactly these hashes (``sad_*`` codes) and the SAM-managed factor if one is enrolled."""

    signature_algorithm: Oid
    signature_algorithm_parameters: AlgorithmParameters | None = None
    requests: list[SignatureRequest] = Field(min_length=1)
    key_pair: KeyPairObject
    signer: Signer
    sam_factor: SamFactor | None = None


class ProofOfPossessionInput(_Strict):
    """What a proof of possession signs: only a CertificationRequestInfo for the key pair's own
    public key and its signer's subject (``pop_*`` codes)."""

    dtbs: Annotated[str, StringConstraints(min_length=1, max_length=16384)] = Field(
        description="canonical base64 DER CertificationRequestInfo (PKCS#10) for the key pair's public key"
    )
    signature_algorithm: Oid
    signature_algorithm_parameters: AlgorithmParameters | None = None


class ProofOfPossessionRequest(_Strict):
    """Body of ``proofs_of_possession.create``: only for an assigned key pair not certified yet
    (``key_pair_not_assigned``, ``key_pair_certified``)."""

    key_pair: KeyPairObject
    request: ProofOfPossessionInput


class ProofOfPossessionReply(_Strict):
    """Reply of ``proofs_of_possession.create``: the signature that completes the PKCS#10 request."""

    signature: str = Field(description="base64 signature over the CertificationRequestInfo")
    signature_algorithm: Oid


class Signature(_Strict):
    """One signature, in the place of its DTBS/R in the request."""

    signature: str = Field(description="base64; PKCS#1 v1.5 bytes or DER ECDSA-Sig-Value")
    signature_algorithm: Oid


class SignaturesReply(_Strict):
    """Reply of ``signatures.create``: one signature per DTBS/R, in request order."""

    signatures: list[Signature]


# --- errors ----------------------------------------------------------------------------


class ErrorBody(_Strict):
    """A refusal: ``code`` is stable (error-codes.json), ``message`` is for people,
    ``request_id`` is the request's message_id."""

    code: str
    message: str
    request_id: str | None


class ErrorReply(_Strict):
    """Reply of any operation that was refused or failed; the ``sam-status`` header carries
    the code's status."""

    error: ErrorBody


class EmptyRequest(_Strict):
    """Body of ``configurations.dynamic.get``: an empty JSON object."""


REQUEST_MODELS: dict[Operation, type[BaseModel]] = {
    Operation.configurations_dynamic_put: DynamicConfiguration,
    Operation.configurations_dynamic_get: EmptyRequest,
    Operation.key_pairs_create: KeyPairCreateRequest,
    Operation.signers_key_pairs_assign: AssignRequest,
    Operation.proofs_of_possession_create: ProofOfPossessionRequest,
    Operation.key_pairs_update: KeyPairUpdateRequest,
    Operation.key_pairs_delete: KeyPairDeleteRequest,
    Operation.key_pairs_rewrap: KeyPairRewrapRequest,
    Operation.key_pairs_bind: KeyPairBindRequest,
    Operation.signatures_create: SignaturesCreateRequest,
}
