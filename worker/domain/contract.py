"""The message contract: operations, their queues, request and reply bodies.

These pydantic models are the single source of truth for the wire format; the JSON
Schemas in ``schemas/`` are generated from them (``sam-admin schemas``) and a test
fails when they drift.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "HEADER_REQUEST_JWS",
    "HEADER_SAD",
    "HEADER_STATUS",
    "OPERATION_QUEUE",
    "REQUEST_MODELS",
    "AssignRequest",
    "AuthorizationServer",
    "DynamicConfiguration",
    "ErrorBody",
    "ErrorReply",
    "KeyPairCreateRequest",
    "KeyPairObject",
    "KeyPairReply",
    "KeyPairStatus",
    "KeyTemplate",
    "Operation",
    "QueueClass",
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

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Pem = Annotated[str, StringConstraints(min_length=1, max_length=8192)]


class Operation(StrEnum):
    configurations_dynamic_put = "configurations.dynamic.put"
    configurations_dynamic_get = "configurations.dynamic.get"
    key_pairs_create = "key_pairs.create"
    signers_key_pairs_assign = "signers.key_pairs.assign"
    signatures_create = "signatures.create"


class QueueClass(StrEnum):
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
    Operation.signatures_create: QueueClass.signatures,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- dynamic configuration -----------------------------------------------------------


class AuthorizationServer(_Strict):
    id: Identifier
    public_key: Pem = Field(description="PEM SubjectPublicKeyInfo of the key that signs SADs")


class SigningServicePrivilegedUser(_Strict):
    id: Identifier = Field(description="The certificate CN the SSA connects with (= AMQP user_id)")
    public_key: Pem = Field(description="PEM SubjectPublicKeyInfo of the key that signs request JWS")
    allowed_authorization_servers: list[Identifier] = Field(max_length=64)


class DynamicConfiguration(_Strict):
    version: int = Field(ge=1, le=2**53)
    authorization_servers: list[AuthorizationServer] = Field(max_length=256)
    signing_service_privileged_users: list[SigningServicePrivilegedUser] = Field(max_length=1024)


# --- key pairs -------------------------------------------------------------------------


class KeyTemplate(_Strict):
    algorithm: Literal["RSA", "ECDSA"]
    size: int | None = None
    named_curve: str | None = Field(default=None, max_length=32)


class KeyPairCreateRequest(_Strict):
    key_template: KeyTemplate


class KeyPairStatus(_Strict):
    assigned: bool
    certified: bool
    enabled: bool


class Signer(_Strict):
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
    size: int | None = None
    named_curve: str | None = None
    public_key: str | None = Field(default=None, description="base64 DER SubjectPublicKeyInfo")
    status: KeyPairStatus | None = None
    signer: Signer | None = None
    subject: str | None = None


class KeyPairReply(_Strict):
    key_pair: KeyPairObject


class AssignRequest(_Strict):
    key_pair: KeyPairObject
    signer: Signer
    subject: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


# --- signatures ------------------------------------------------------------------------

Oid = Annotated[str, StringConstraints(min_length=3, max_length=64, pattern=r"^[0-2](\.[0-9]+)+$")]


class SignatureRequest(_Strict):
    dtbs: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        description="base64 of the DTBS/R (the hash to sign)"
    )
    signature_algorithm: Oid | None = Field(default=None, description="overrides the request's")


class SignaturesCreateRequest(_Strict):
    signature_algorithm: Oid
    requests: list[SignatureRequest] = Field(min_length=1)
    key_pair: KeyPairObject
    signer: Signer


class Signature(_Strict):
    signature: str = Field(description="base64; PKCS#1 v1.5 bytes or DER ECDSA-Sig-Value")
    signature_algorithm: Oid


class SignaturesReply(_Strict):
    signatures: list[Signature]


# --- errors ----------------------------------------------------------------------------


class ErrorBody(_Strict):
    code: str
    message: str
    request_id: str | None


class ErrorReply(_Strict):
    error: ErrorBody


class EmptyRequest(_Strict):
    pass


REQUEST_MODELS: dict[Operation, type[BaseModel]] = {
    Operation.configurations_dynamic_put: DynamicConfiguration,
    Operation.configurations_dynamic_get: EmptyRequest,
    Operation.key_pairs_create: KeyPairCreateRequest,
    Operation.signers_key_pairs_assign: AssignRequest,
    Operation.signatures_create: SignaturesCreateRequest,
}
