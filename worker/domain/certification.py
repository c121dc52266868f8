"""What a key pair may be certified with: subjects, PKCS#10 requests and certificates.

The SAM signs a proof of possession only over a DER ``CertificationRequestInfo`` for the
key pair's own public key and the signer's own subject — never over arbitrary bytes —
and accepts a certificate only for that key and subject. Names are compared as RFC 5280
prescribes (asn1crypto), not byte for byte. The builders at the end are for the SSA side
(the SDK and tests).
"""

from __future__ import annotations

import datetime

from asn1crypto import algos, csr, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from worker.errors import ErrorCode, SamError

__all__ = [
    "assemble_certification_request",
    "build_certification_request_info",
    "canonical_subject",
    "check_certificate",
    "check_certificate_policy",
    "check_certificate_validity",
    "check_certification_request_info",
    "load_trust_anchors",
]


# What asn1crypto and cryptography raise for names and certificates they cannot read or
# compare (RFC 5280 string preparation refuses unassigned code points and bad bidi text).
_PARSE_FAILURES: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    KeyError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
_EXTENSION_FAILURES: tuple[type[Exception], ...] = (*_PARSE_FAILURES, x509.ExtensionNotFound)


def _name(subject: str) -> asn1_x509.Name:
    return asn1_x509.Name.load(x509.Name.from_rfc4514_string(subject).public_bytes())


def _same_name(name: asn1_x509.Name, subject: str) -> bool | None:
    """Whether ``name`` is ``subject`` under RFC 5280 comparison; ``None`` if either
    cannot be prepared for comparison."""
    try:
        return bool(name == _name(subject))
    except _PARSE_FAILURES:
        return None


def canonical_subject(subject: str) -> str:
    """The subject as RFC 4514 text in one canonical spelling; refused if it does not parse
    or could never be compared with a certificate's (RFC 5280 string preparation)."""
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        raise SamError(ErrorCode.invalid_subject, "subject is not an RFC 4514 distinguished name") from exc
    if not len(name):
        raise SamError(ErrorCode.invalid_subject, "subject is empty")
    canonical = name.rfc4514_string()
    try:
        _name(canonical).hashable  # noqa: B018 — prepares every value, as a comparison would
    except _PARSE_FAILURES as exc:
        raise SamError(ErrorCode.invalid_subject, "subject holds text RFC 5280 cannot compare") from exc
    return canonical


def check_certification_request_info(der: bytes, public_key_der: bytes, subject: str) -> None:
    """Accept ``der`` for a proof of possession only as canonical DER v1 CertificationRequestInfo
    for ``public_key_der`` and ``subject``; refused as ``pop_not_a_certification_request``,
    ``pop_public_key_mismatch`` or ``pop_subject_mismatch``."""
    try:
        info = csr.CertificationRequestInfo.load(der, strict=True)
        # force a full parse and insist on the one DER encoding: no trailing or alternate bytes
        reencoded = csr.CertificationRequestInfo(
            {
                "version": info["version"].native,
                "subject": info["subject"].untag(),
                "subject_pk_info": info["subject_pk_info"].untag(),
                "attributes": info["attributes"].untag(),
            }
        ).dump(force=True)
        version = info["version"].native
        request_key = info["subject_pk_info"].dump()
        request_subject = info["subject"]
    except _PARSE_FAILURES as exc:
        raise SamError(
            ErrorCode.pop_not_a_certification_request,
            f"not a DER CertificationRequestInfo ({type(exc).__name__})",
        ) from exc
    if reencoded != der or version != "v1":
        raise SamError(
            ErrorCode.pop_not_a_certification_request, "CertificationRequestInfo is not canonical DER v1"
        )
    if request_key != public_key_der:
        raise SamError(ErrorCode.pop_public_key_mismatch)
    same = _same_name(request_subject, subject)
    if same is None:
        raise SamError(ErrorCode.pop_not_a_certification_request, "its subject cannot be compared")
    if not same:
        raise SamError(ErrorCode.pop_subject_mismatch)


def check_certificate(der: bytes, public_key_der: bytes, subject: str) -> None:
    """Accept ``der`` only as a DER X.509 certificate for ``public_key_der`` issued to ``subject``;
    refused as ``certificate_invalid``, ``certificate_key_mismatch`` or
    ``certificate_subject_mismatch``."""
    try:
        certificate = asn1_x509.Certificate.load(der, strict=True)
        certificate_key = certificate.public_key.dump()
        certificate_subject = certificate.subject
        x509.load_der_x509_certificate(der)  # the strict parser a relying party will use
    except _PARSE_FAILURES as exc:
        raise SamError(
            ErrorCode.certificate_invalid, f"not a DER X.509 certificate ({type(exc).__name__})"
        ) from exc
    if certificate_key != public_key_der:
        raise SamError(ErrorCode.certificate_key_mismatch)
    same = _same_name(certificate_subject, subject)
    if same is None:
        raise SamError(ErrorCode.certificate_invalid, "its subject cannot be compared")
    if not same:
        raise SamError(ErrorCode.certificate_subject_mismatch)


# --- the certificate policy: trust anchors, validity, key usage ---------------------------


def load_trust_anchors(pems: list[str]) -> tuple[x509.Certificate, ...]:
    """PEM CA certificates as trust anchors; ``configuration_invalid`` if one does not
    parse or is not a CA."""
    anchors = []
    for pem in pems:
        try:
            anchor = x509.load_pem_x509_certificate(pem.encode())
            constraints = anchor.extensions.get_extension_for_class(x509.BasicConstraints).value
        except _EXTENSION_FAILURES as exc:
            raise SamError(
                ErrorCode.configuration_invalid,
                f"a trust anchor is not a CA certificate ({type(exc).__name__})",
            ) from exc
        if not constraints.ca:
            raise SamError(ErrorCode.configuration_invalid, "a trust anchor is not a CA certificate")
        anchors.append(anchor)
    return tuple(anchors)


def check_certificate_validity(certificate: x509.Certificate, now: datetime.datetime) -> None:
    """Refused as ``certificate_not_yet_valid`` / ``certificate_expired`` outside its
    validity period."""
    if now < certificate.not_valid_before_utc:
        raise SamError(ErrorCode.certificate_not_yet_valid)
    if now > certificate.not_valid_after_utc:
        raise SamError(ErrorCode.certificate_expired)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except _EXTENSION_FAILURES:
        return False


# Extended key usages that fit a signing certificate when an EKU is present at all.
_SIGNING_EKUS = {
    x509.ObjectIdentifier("2.5.29.37.0"),  # anyExtendedKeyUsage
    x509.ObjectIdentifier("1.3.6.1.5.5.7.3.4"),  # emailProtection (S/MIME, CMS)
    x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36"),  # documentSigning (RFC 9336)
    x509.ObjectIdentifier("1.2.840.113583.1.1.5"),  # Adobe Authentic Documents Trust
    x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.12"),  # Microsoft document signing
}
MAX_CHAIN_DEPTH = 8


def _check_signing_usage(leaf: x509.Certificate) -> None:
    """A signer's certificate: an end entity whose key usage allows signing and whose
    extended key usage, if any, fits documents."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SamError(ErrorCode.certificate_usage_invalid, "the certificate has no key usage") from None
    if not (usage.digital_signature or usage.content_commitment):
        raise SamError(ErrorCode.certificate_usage_invalid)
    if _is_ca(leaf):
        raise SamError(ErrorCode.certificate_usage_invalid, "a CA certificate does not certify a signer")
    try:
        purposes = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return
    if not purposes & _SIGNING_EKUS:
        raise SamError(ErrorCode.certificate_usage_invalid, "its extended key usage is not for signing")


def check_certificate_policy(
    der: bytes,
    chain: list[bytes],
    anchors: tuple[x509.Certificate, ...],
    now: datetime.datetime,
) -> None:
    """Accept a certificate for a key pair only if it allows signing (an end entity, key
    usage digitalSignature or nonRepudiation, a document-signing EKU if any); if it and
    the CA certificates of ``chain`` are valid ``now``; and if RFC 5280 path validation
    (cryptography's verifier: signatures, validity, basic constraints and path length,
    key usage of the CAs, name constraints, unknown critical extensions) leads to one of
    ``anchors`` in at most ``MAX_CHAIN_DEPTH`` certificates. Refused as
    ``certificate_invalid``, ``certificate_usage_invalid``, ``certificate_expired``,
    ``certificate_not_yet_valid`` or ``certificate_untrusted``. Revocation is the CA's
    and the SSA's to act on (see SECURITY.md)."""
    try:
        leaf = x509.load_der_x509_certificate(der)
        intermediates = [x509.load_der_x509_certificate(item) for item in chain]
        _check_signing_usage(leaf)
    except _PARSE_FAILURES as exc:
        raise SamError(
            ErrorCode.certificate_invalid, f"not a readable X.509 certificate ({type(exc).__name__})"
        ) from exc
    for certificate in (leaf, *intermediates):
        check_certificate_validity(certificate, now)
    if not anchors:
        raise SamError(ErrorCode.certificate_untrusted, "no trust anchor is configured for this SSA")
    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        # the CAs as RFC 5280 and the CA/B profile want them; the signer's own
        # certificate is checked above (its EKU is not TLS client authentication)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError:
        raise SamError(ErrorCode.certificate_untrusted) from None
    except _PARSE_FAILURES as exc:
        raise SamError(
            ErrorCode.certificate_invalid, f"the chain is not readable ({type(exc).__name__})"
        ) from exc


# --- the SSA side ----------------------------------------------------------------------


def build_certification_request_info(public_key_der: bytes, subject: str) -> bytes:
    """The DER CertificationRequestInfo an SSA asks the SAM to sign as proof of possession."""
    der: bytes = csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": _name(subject),
            "subject_pk_info": keys.PublicKeyInfo.load(public_key_der),
            "attributes": [],
        }
    ).dump()
    return der


def assemble_certification_request(
    info_der: bytes, signature_algorithm_oid: str, parameters_der: bytes | None, signature: bytes
) -> bytes:
    """A DER PKCS#10 CertificationRequest from the info and the SAM's signature."""
    algorithm: dict[str, object] = {"algorithm": signature_algorithm_oid}
    if parameters_der is not None:
        algorithm["parameters"] = algos.RSASSAPSSParams.load(parameters_der)
    der: bytes = csr.CertificationRequest(
        {
            "certification_request_info": csr.CertificationRequestInfo.load(info_der),
            "signature_algorithm": algos.SignedDigestAlgorithm(algorithm),
            "signature": signature,
        }
    ).dump()
    return der
