"""The key pair lifecycle as pure decisions: what each operation may do to a key pair.

This is where a reviewer reads the rules that make the SAM a SAM. Every function takes
the key pair as its seal says it is (already opened and checked against the key-event
log by the service), the parsed request and the policy, and either refuses with a
``SamError`` or returns what to do: the SAD or SKAD that must authorize it, the input
the HSM is to sign, the next revision of the key pair. Nothing here calls the HSM, a
ledger or the audit trail; the service does that with what these return.

Tenants: a key pair belongs to the SSA that created it (``owner``) and, from its
assignment on, its signer is (authorization server, subject): only the owner may use,
change or delete it, and only SADs from that authorization server activate it. Holding
a copy of the seal gives nothing — it travels through the broker and sits in the SSA's
database. Only an administrator moves a key pair to another SSA (``plan_binding``).

The lifecycle, in order: created (unassigned) → assigned to one signer, once, bound to
the authorization server that speaks for it (SKAD if the policy asks) → proof of
possession, only of a CertificationRequestInfo for its own key and subject, only before
certification → certified with a certificate for that key and subject → enabled /
disabled → signing, only certified and enabled, only what the signer's SAD authorizes
→ deleted. A re-wrap under a new KEK may happen at any stage.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509

from worker.domain.algorithms import SignatureScheme, signature_scheme
from worker.domain.authorization import (
    SAD_TYPE_DELETION,
    SKAD_TYPE_ASSIGNMENT,
    SadExpectation,
)
from worker.domain.certification import (
    canonical_subject,
    check_certificate,
    check_certificate_policy,
    check_certificate_validity,
    check_certification_request_info,
)
from worker.domain.configuration import SadPolicy
from worker.domain.contract import (
    AssignRequest,
    KeyPairBindRequest,
    KeyPairDeleteRequest,
    KeyPairUpdateRequest,
    ProofOfPossessionRequest,
    SamFactor,
    SignaturesCreateRequest,
)
from worker.domain.key_pair import SealedKeyPair
from worker.domain.wire import decode_base64
from worker.errors import ErrorCode, SamError

__all__ = [
    "Assignment",
    "Deletion",
    "ProofOfPossession",
    "Signing",
    "check_digest_count",
    "check_factor",
    "factor_input",
    "owned_by",
    "plan_assignment",
    "plan_binding",
    "plan_deletion",
    "plan_proof_of_possession",
    "plan_signing",
    "rewrap_needed",
    "rewrapped",
    "signer_of",
    "updated",
    "verify_factor_mac",
]


def owned_by(key_pair: SealedKeyPair, ssa: str) -> None:
    """Refused unless ``ssa`` owns the key pair: ``key_pair_unbound`` for one sealed
    before key pairs had owners, ``key_pair_not_owned`` for another SSA's."""
    if key_pair.owner is None:
        raise SamError(ErrorCode.key_pair_unbound)
    if key_pair.owner != ssa:
        raise SamError(ErrorCode.key_pair_not_owned)


def signer_of(key_pair: SealedKeyPair, signer: str | None) -> str:
    """The key pair's signer, if ``signer`` is it; refused if unassigned or another's."""
    if not key_pair.status.assigned or key_pair.signer is None:
        raise SamError(ErrorCode.key_pair_not_assigned)
    if signer != key_pair.signer:
        raise SamError(ErrorCode.signer_mismatch)
    return key_pair.signer


def factor_input(key_pair_id: str, factor: SamFactor) -> bytes:
    """What the HSM factor key MACs for a SAM-managed factor. Bound to the key pair, so
    a verifier copied into another key pair is useless."""
    return b"\0".join([b"sam-factor-v1", key_pair_id.encode(), factor.type.encode(), factor.value.encode()])


# --- assignment -------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """A key pair about to be bound to its signer, once and for good."""

    key_pair: SealedKeyPair
    signer: str
    subject: str  # canonical RFC 4514
    skad: SadExpectation | None  # the signer's consent to verify and spend, if any
    factor: SamFactor | None  # a SAM-managed factor to enrol, if any
    authorization_server: str | None  # None: the SKAD's issuer

    def result(self, factor_verifier: bytes | None, skad_issuer: str | None = None) -> SealedKeyPair:
        """The assigned key pair; ``factor_verifier`` is the HSM MAC of
        ``factor_input`` when a factor is enrolled, ``skad_issuer`` the verified SKAD's
        issuer when one was needed."""
        authorization_server = self.authorization_server or skad_issuer
        if authorization_server is None:
            raise SamError(ErrorCode.internal_error, "an assignment without its authorization server")
        factor: dict[str, object] = {}
        if self.factor is not None:
            if factor_verifier is None:
                raise SamError(ErrorCode.internal_error, "a factor is enrolled without its verifier")
            factor = {
                "factor_type": self.factor.type,
                "factor_verifier": base64.b64encode(factor_verifier).decode(),
            }
        return self.key_pair.next_revision(
            signer=self.signer,
            subject=self.subject,
            authorization_server=authorization_server,
            status=self.key_pair.status.model_copy(update={"assigned": True}),
            **factor,
        )


def plan_assignment(
    key_pair: SealedKeyPair,
    request: AssignRequest,
    ssa: str,
    allowed: frozenset[str],
    policy: SadPolicy,
    skad_given: bool,
) -> Assignment:
    """A key pair is assigned once, by its owner, and bound to the authorization server
    that speaks for its signer: the SKAD's issuer, else the one the request names, else
    the owner's only one (``allowed``: the ASes the owner may use). A SKAD, when given
    or when the policy requires one, must be the signer's consent to exactly this key
    pair, from the named AS if one is named."""
    owned_by(key_pair, ssa)
    if key_pair.status.assigned:
        raise SamError(ErrorCode.key_pair_already_assigned)
    subject = canonical_subject(request.subject)
    named = request.authorization_server
    if named is not None and named not in allowed:
        raise SamError(ErrorCode.sad_issuer_not_allowed, f"{ssa} may not use {named}")
    skad = None
    if skad_given or policy.assignment_skad == "required":
        skad = SadExpectation(
            ssa, request.signer.id, key_pair.id, detail_type=SKAD_TYPE_ASSIGNMENT, issuer=named
        )
    elif named is None:
        if len(allowed) != 1:
            raise SamError(ErrorCode.authorization_server_required)
        [named] = allowed
    return Assignment(key_pair, request.signer.id, subject, skad, request.sam_factor, named)


# --- proof of possession ----------------------------------------------------------------


@dataclass(frozen=True)
class ProofOfPossession:
    """The one thing a proof of possession may sign: the signer's own
    CertificationRequestInfo, hashed with the scheme's hash."""

    scheme: SignatureScheme
    certification_request_info: bytes

    @property
    def digest(self) -> bytes:
        return self.scheme.digest(self.certification_request_info)

    @property
    def info_sha256(self) -> str:
        return hashlib.sha256(self.certification_request_info).hexdigest()


def plan_proof_of_possession(
    key_pair: SealedKeyPair, request: ProofOfPossessionRequest, ssa: str
) -> ProofOfPossession:
    """Only the owner's assigned, not yet certified key pair, and only over a DER
    CertificationRequestInfo for its own public key and its signer's subject."""
    owned_by(key_pair, ssa)
    if not key_pair.status.assigned or key_pair.subject is None:
        raise SamError(ErrorCode.key_pair_not_assigned)
    if key_pair.status.certified:
        raise SamError(ErrorCode.key_pair_certified)
    scheme = signature_scheme(
        request.request.signature_algorithm,
        key_pair.algorithm,
        request.request.signature_algorithm_parameters,
    )
    info = decode_base64(request.request.dtbs, ErrorCode.pop_not_a_certification_request, "dtbs")
    check_certification_request_info(info, key_pair.public_key_der, key_pair.subject)
    return ProofOfPossession(scheme, info)


# --- update -----------------------------------------------------------------------------


def updated(
    key_pair: SealedKeyPair,
    request: KeyPairUpdateRequest,
    ssa: str,
    anchors: tuple[x509.Certificate, ...],
    now: datetime.datetime,
) -> SealedKeyPair:
    """The next revision with the requested status (and certificate). Only the owner's
    key pair of this signer; never unassigned or un-certified; a certificate comes with
    ``certified: true``, must be for the key pair's own key and subject, chain to one of
    the owner's trust ``anchors``, be valid ``now`` and allow signing."""
    owned_by(key_pair, ssa)
    signer_of(key_pair, request.signer.id)
    wanted = request.status
    if not wanted.assigned or (key_pair.status.certified and not wanted.certified):
        raise SamError(ErrorCode.status_transition_invalid, "a key pair cannot be unassigned or un-certified")
    certificate = key_pair.certificate
    if request.certificate is not None:
        if not wanted.certified:
            raise SamError(ErrorCode.status_transition_invalid, "a certificate comes with certified: true")
        der = decode_base64(request.certificate, ErrorCode.certificate_invalid, "certificate")
        assert key_pair.subject is not None  # assigned, so it has one
        check_certificate(der, key_pair.public_key_der, key_pair.subject)
        chain = [
            decode_base64(c, ErrorCode.certificate_invalid, "certificate_chain")
            for c in request.certificate_chain
        ]
        check_certificate_policy(der, chain, anchors, now)
        certificate = base64.b64encode(der).decode()
    elif wanted.certified and certificate is None:
        raise SamError(ErrorCode.certificate_required)
    return key_pair.next_revision(status=wanted, certificate=certificate)


# --- deletion ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Deletion:
    """A key pair about to be deleted for good, by its SSA or, with a SAD, its signer."""

    key_pair: SealedKeyPair
    sad: SadExpectation | None  # the signer's own request, when the SSA relays one

    @property
    def result(self) -> SealedKeyPair:
        return self.key_pair.next_revision()


def plan_deletion(
    key_pair: SealedKeyPair, request: KeyPairDeleteRequest, ssa: str, sad_given: bool
) -> Deletion:
    """Only by its owner; an assigned key pair only when the request names its signer
    (an unassigned one needs no signer); a SAD, if given, from the signer's AS."""
    owned_by(key_pair, ssa)
    if key_pair.signer is not None:
        signer_of(key_pair, request.signer.id if request.signer else None)
    sad = None
    if sad_given:
        sad = SadExpectation(
            ssa,
            key_pair.signer or "",
            key_pair.id,
            detail_type=SAD_TYPE_DELETION,
            issuer=key_pair.authorization_server,
        )
    return Deletion(key_pair, sad)


# --- re-wrap ----------------------------------------------------------------------------


def rewrap_needed(key_pair: SealedKeyPair, current_kek: str, ssa: str) -> bool:
    """Whether the owner's key pair is wrapped under another KEK than the current one
    (a re-wrap of a current key pair answers with it unchanged)."""
    owned_by(key_pair, ssa)
    return key_pair.kek != current_kek


def rewrapped(key_pair: SealedKeyPair, wrapped: bytes, kek_label: str, wrap_mechanism: str) -> SealedKeyPair:
    """The next revision with the private key wrapped under another KEK."""
    return key_pair.next_revision(
        wrapped_private_key=base64.b64encode(wrapped).decode(),
        kek=kek_label,
        wrap_mechanism=wrap_mechanism,
    )


# --- binding (administrators only) -----------------------------------------------------


def plan_binding(
    key_pair: SealedKeyPair, request: KeyPairBindRequest, allowed_by_ssa: Mapping[str, frozenset[str]]
) -> SealedKeyPair:
    """The next revision owned by ``request.owner`` (a registered SSA: a key of
    ``allowed_by_ssa``, which maps each SSA to the ASes it may use). An assigned key pair
    keeps the AS of its signer — a signer is (AS, subject), so moving it under another
    AS would hand it to another person — and the new owner must be allowed that AS."""
    allowed = allowed_by_ssa.get(request.owner)
    if allowed is None:
        raise SamError(ErrorCode.binding_invalid, f"{request.owner!r} is not a registered SSA")
    named = request.authorization_server
    if not key_pair.status.assigned:
        if named is not None:
            raise SamError(
                ErrorCode.binding_invalid, "an unassigned key pair has no authorization server yet"
            )
        return key_pair.next_revision(v=2, owner=request.owner)
    bound = key_pair.authorization_server or named
    if bound is None:
        raise SamError(
            ErrorCode.binding_invalid, "an assigned key pair needs the authorization server of its signer"
        )
    if named is not None and named != bound:
        raise SamError(ErrorCode.binding_invalid, f"its signer is spoken for by {bound}")
    if bound not in allowed:
        raise SamError(ErrorCode.binding_invalid, f"{request.owner} may not use {bound}")
    return key_pair.next_revision(v=2, owner=request.owner, authorization_server=bound)


# --- signing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signing:
    """What a signature request may sign, and the SAD that must authorize exactly it."""

    scheme: SignatureScheme
    digests: tuple[bytes, ...]
    sad: SadExpectation

    @property
    def dtbs_sha256(self) -> list[str]:
        return [hashlib.sha256(d).hexdigest() for d in self.digests]


@functools.lru_cache(maxsize=1024)
def _certificate(base64_der: str) -> x509.Certificate:
    """A key pair's certificate (from inside its seal), parsed once per process."""
    return x509.load_der_x509_certificate(base64.b64decode(base64_der))


def check_digest_count(request: SignaturesCreateRequest, limit: int) -> None:
    """At most ``limit`` DTBS/R per request: one request holds the HSM lane only so long."""
    if len(request.requests) > limit:
        raise SamError(ErrorCode.too_many_digests, f"at most {limit} DTBS/R per request")


def plan_signing(
    key_pair: SealedKeyPair, request: SignaturesCreateRequest, ssa: str, now: datetime.datetime
) -> Signing:
    """Only the owner's key pair of this signer, certified and enabled, with a
    certificate valid ``now``, activated by a SAD from the signer's AS; every DTBS/R of
    one request under one signature algorithm, each as long as its hash."""
    owned_by(key_pair, ssa)
    signer = signer_of(key_pair, request.signer.id)
    if not key_pair.status.certified:
        raise SamError(ErrorCode.key_pair_not_certified)
    if not key_pair.status.enabled:
        raise SamError(ErrorCode.key_pair_disabled)
    if key_pair.certificate is not None:  # an expired credential signs nothing
        check_certificate_validity(_certificate(key_pair.certificate), now)
    scheme = signature_scheme(
        request.signature_algorithm, key_pair.algorithm, request.signature_algorithm_parameters
    )
    digests = []
    for item in request.requests:
        if item.signature_algorithm is not None and (
            item.signature_algorithm != scheme.oid
            or (item.signature_algorithm_parameters or request.signature_algorithm_parameters)
            != request.signature_algorithm_parameters
        ):
            # One SAD names one hash algorithm, and one unwrap serves one scheme.
            raise SamError(
                ErrorCode.unsupported_algorithm, "all DTBS/R of one request use one signature algorithm"
            )
        dtbs = decode_base64(item.dtbs, ErrorCode.invalid_dtbs, "DTBS/R")
        scheme.check_dtbs(dtbs)
        digests.append(dtbs)
    expected = SadExpectation(
        ssa, signer, key_pair.id, scheme.hash_oid, tuple(digests), issuer=key_pair.authorization_server
    )
    return Signing(scheme, tuple(digests), expected)


def check_factor(key_pair: SealedKeyPair, factor: SamFactor | None) -> bytes | None:
    """What the HSM must MAC to check the key pair's SAM-managed factor (``None``: it
    has none). Refused as ``sam_factor_missing`` when it needs one and none came."""
    if key_pair.factor_verifier is None:
        return None
    if factor is None or factor.type != key_pair.factor_type:
        raise SamError(ErrorCode.sam_factor_missing)
    return factor_input(key_pair.id, factor)


def verify_factor_mac(key_pair: SealedKeyPair, mac: bytes) -> None:
    """Refused as ``sam_factor_invalid`` unless ``mac`` is the enrolled verifier."""
    expected = base64.b64decode(key_pair.factor_verifier or "")
    if not hmac.compare_digest(mac, expected):
        raise SamError(ErrorCode.sam_factor_invalid)
