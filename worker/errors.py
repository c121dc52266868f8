"""The one error tree of sam-worker.

Every refusal the worker can send has a stable ``ErrorCode`` with its status and a
one-line meaning; the catalogue in ``schemas/error-codes.json`` is generated from
this module. Library exceptions are translated into a ``SamError`` where the library
is called, so their messages never reach the wire.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

__all__ = ["ErrorCode", "SamError"]


class _Code(NamedTuple):
    status: int
    meaning: str


class ErrorCode(Enum):
    """Stable error codes; the value is (status, meaning)."""

    # 400 — the request itself is malformed
    malformed_message = _Code(
        400, "The body is not a JSON object (bad UTF-8, bad JSON, duplicate keys, too deep)."
    )
    schema_violation = _Code(400, "The body does not match the operation's schema.")
    message_too_large = _Code(400, "The body is larger than the configured limit.")
    unknown_operation = _Code(400, "The AMQP `type` names no operation.")
    invalid_properties = _Code(
        400,
        "An AMQP property or header is of the wrong type, too long, outside its charset or not UTF-8.",
    )
    missing_properties = _Code(
        400, "A required AMQP property (message_id, reply_to, correlation_id) is missing."
    )
    invalid_dtbs = _Code(400, "A DTBS/R is not base64 or its length does not match the hash algorithm.")
    too_many_digests = _Code(400, "More DTBS/R in one request than the configured cap.")
    invalid_subject = _Code(400, "The subject is not an RFC 4514 distinguished name.")
    unsupported_algorithm = _Code(422, "The key template or signature algorithm is not supported.")
    invalid_algorithm_parameters = _Code(
        422, "The signature algorithm parameters are malformed or weak (RSASSA-PSS-params)."
    )
    algorithm_key_mismatch = _Code(422, "The signature algorithm does not fit the key pair's key type.")
    # 401 — who is asking could not be established
    missing_user_id = _Code(401, "The message has no broker-validated user_id.")
    unknown_user = _Code(401, "The user_id is not a registered SSA or administrator.")
    request_signature_missing = _Code(401, "The request carries no sam-request-jws header.")
    request_signature_invalid = _Code(401, "The request JWS does not verify or does not bind this message.")
    # 403 — known, but not allowed
    wrong_queue = _Code(
        400, "The operation was published to another queue class than its own (see operations.json)."
    )
    reply_to_not_permitted = _Code(
        403, "reply_to is not the caller's own reply queue (<user_id>.replies.…): no reply is sent."
    )
    operation_not_permitted = _Code(
        403, "This user may not call this operation (e.g. an admin operation from an SSA)."
    )
    sad_missing = _Code(403, "The operation needs a SAD and none was given.")
    sad_invalid = _Code(403, "The SAD is not a well-formed JWT with an allowed algorithm.")
    sad_issuer_unknown = _Code(403, "The SAD is not signed by a registered authorization server.")
    sad_issuer_not_allowed = _Code(403, "The SAD's authorization server is not allowed for this SSA.")
    sad_signature_invalid = _Code(403, "The SAD's signature does not verify.")
    sad_audience_mismatch = _Code(403, "The SAD is not addressed to this SAM.")
    sad_expired = _Code(403, "The SAD is expired, not yet valid, or lives longer than the policy allows.")
    sad_signer_mismatch = _Code(403, "The SAD is for another signer.")
    sad_key_pair_mismatch = _Code(403, "The SAD authorizes another key pair.")
    sad_digest_mismatch = _Code(
        403, "The DTBS/R, their count or their hash algorithm differ from what the SAD authorizes."
    )
    sad_replayed = _Code(403, "The SAD's jti was already used, by another request.")
    sad_authentication_insufficient = _Code(403, "The SAD's authentication does not meet the policy.")
    # 404 / 409 / 422 — key pair state
    key_pair_invalid = _Code(422, "The key pair's seal does not verify (altered, or from another SAM).")
    key_pair_not_assigned = _Code(409, "The key pair is not assigned to a signer.")
    key_pair_already_assigned = _Code(409, "The key pair is already assigned to a signer.")
    key_pair_outdated = _Code(409, "A newer revision of this key pair exists; send the latest copy.")
    key_pair_deleted = _Code(404, "The key pair was deleted.")
    key_pair_not_certified = _Code(409, "The key pair is not certified yet.")
    key_pair_disabled = _Code(409, "The key pair is disabled.")
    key_pair_certified = _Code(409, "The key pair is certified: no more proofs of possession.")
    status_transition_invalid = _Code(422, "That status change is not allowed (e.g. un-certifying).")
    certificate_required = _Code(422, "Certifying a key pair needs its certificate.")
    certificate_invalid = _Code(422, "The certificate is not a DER X.509 certificate.")
    certificate_key_mismatch = _Code(422, "The certificate is for another public key.")
    certificate_subject_mismatch = _Code(422, "The certificate's subject is not the signer's subject.")
    certificate_untrusted = _Code(
        422,
        "The certificate does not chain to a trust anchor configured for this SSA, or a signature on "
        "the way does not verify.",
    )
    certificate_usage_invalid = _Code(
        422, "The certificate's key usage does not allow signing (digitalSignature or nonRepudiation)."
    )
    certificate_expired = _Code(409, "The certificate (or one on its chain) is past its notAfter.")
    certificate_not_yet_valid = _Code(409, "The certificate (or one on its chain) is before its notBefore.")
    pop_not_a_certification_request = _Code(
        422, "A proof of possession signs only a DER CertificationRequestInfo."
    )
    pop_public_key_mismatch = _Code(422, "The CertificationRequestInfo is for another public key.")
    pop_subject_mismatch = _Code(422, "The CertificationRequestInfo's subject is not the signer's subject.")
    sam_factor_missing = _Code(403, "The key pair needs its SAM-managed factor and none was given.")
    sam_factor_invalid = _Code(403, "The SAM-managed factor is wrong.")
    sam_factor_unavailable = _Code(
        422, "This SAM has no factor key, so it cannot enrol a SAM-managed factor."
    )
    signer_mismatch = _Code(403, "The signer does not own this key pair.")
    key_pair_not_owned = _Code(403, "The key pair belongs to another SSA.")
    key_pair_unbound = _Code(
        409,
        "The key pair was sealed before key pairs were bound to their SSA; an administrator binds it "
        "(key_pairs.bind).",
    )
    sad_issuer_mismatch = _Code(
        403, "The SAD (or SKAD) is not from the authorization server bound to this key pair's signer."
    )
    authorization_server_required = _Code(
        422, "Assigning without a SKAD needs the authorization_server that speaks for the signer."
    )
    binding_invalid = _Code(
        422,
        "The key pair cannot be bound so: not a registered SSA, an authorization server that SSA may not "
        "use, or another authorization server for an assigned signer.",
    )
    request_id_reused = _Code(
        409,
        "This caller used this message_id for another request (operation, body or SAD) not long ago: "
        "a repeat must be the very same request.",
    )
    request_taken_over = _Code(
        409,
        "A repeat of this request took it over while this attempt was slow; nothing of this attempt "
        "was released, and the answer to the repeat is the one that counts.",
    )
    configuration_version_conflict = _Code(
        409, "The dynamic configuration version is not above the current one."
    )
    configuration_invalid = _Code(
        422, "The dynamic configuration is inconsistent (unknown AS, bad key, duplicate id)."
    )
    configuration_missing = _Code(404, "No dynamic configuration has been set yet.")
    # 5xx — the SAM cannot serve now; the caller may retry
    hsm_unavailable = _Code(503, "The HSM failed or is unreachable.")
    audit_unavailable = _Code(
        503,
        "The audit record could not be made durable in time; no result was released (a repeat of the "
        "request gets it, if one was made).",
    )
    request_expired = _Code(
        503,
        "The request expired in its queue (its expiration), or its caller had stopped waiting "
        "(sam-answer-by), before a worker could answer it; no result was released.",
    )
    request_undeliverable = _Code(
        500, "No worker could finish the request up to the delivery limit; no result was released."
    )
    ledger_unavailable = _Code(
        503, "The shared event log (config, key events, SAD use) did not answer in time."
    )
    internal_error = _Code(500, "An unexpected fault; the incident is in the worker log.")

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def meaning(self) -> str:
        return self.value.meaning

    # The SDK hands these to SSAs as ``SamRequestError.code``, where they meet the codes
    # as strings: the wire's ("code": "unknown_user"), and callers' code written when
    # ``code`` was a str (``exc.code == "unknown_user"``, ``exc.code in {"…"}``, f-strings).
    # So a member equals the string of its name, hashes as that string and prints as it.
    # It still equals no other member and not its (status, meaning) value; the worker
    # compares members by identity and formats them by ``.name``.
    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.name == other
        if isinstance(other, ErrorCode):
            return self is other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name


class SamError(Exception):
    """A refusal with a stable code; ``message`` is ours and safe to send."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        super().__init__(message or code.meaning)
        self.code = code
        self.message = message or code.meaning

    @property
    def status(self) -> int:
        return self.code.status

    def __repr__(self) -> str:
        return f"SamError({self.code.name}, {self.message!r})"
