"""Inputs that made the libraries under the checks raise something other than their
documented errors (found by an outside attacker): each is now the refusal of its check,
never a 500. A JWS header whose crit is not a list of strings (joserfc raises
TypeError), and names RFC 5280 string preparation cannot compare (asn1crypto raises
while comparing)."""

from __future__ import annotations

import datetime
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sam_devtools.pki import public_key_pem
from tests.unit.test_authorization import EXPECTED, NOW, POLICY, SSA_KEY, STATE, claims
from worker.domain.authorization import RequestBinding, b64url, verify_request_jws, verify_sad
from worker.domain.certification import (
    build_certification_request_info,
    canonical_subject,
    check_certificate,
    check_certification_request_info,
)
from worker.domain.key_pair import KeyPairSealer
from worker.domain.keys import load_public_key
from worker.errors import SamError

CRIT = [[1], True, 0, None, [None], [[]], "b64", []]  # [] is allowed by joserfc, not by RFC 7515


def _token(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}.AAAA"


def _code(check: Any) -> str:
    with pytest.raises(SamError) as refused:
        check()
    return refused.value.code.name


@pytest.mark.parametrize("crit", CRIT)
def test_a_crit_header_of_the_wrong_type_is_a_refusal(crit: Any) -> None:
    sad = _token({"alg": "ES256", "kid": "as-1", "crit": crit}, claims())
    assert _code(lambda: verify_sad(sad, STATE, "sam-1", POLICY, EXPECTED, NOW)) in (
        "sad_invalid",
        "sad_signature_invalid",
    )
    request = _token({"alg": "ES256", "kid": "ssa-1", "crit": crit}, {})
    key = load_public_key(public_key_pem(SSA_KEY))
    binding = RequestBinding(b"{}", "m-1", "key_pairs.create", "ssa-1")
    assert _code(lambda: verify_request_jws(request, key, binding, NOW, 300)) == "request_signature_invalid"

    async def unsigned(data: bytes) -> bytes:
        return b""

    sealer = KeyPairSealer("sam-1", "state", key, unsigned)
    seal = _token({"alg": "ES256", "crit": crit, "typ": "sam-key-pair+jws"}, {})
    assert _code(lambda: sealer.open(seal)) == "key_pair_invalid"


UNPREPARABLE = ["CN=\u0378", "CN=\u05d0a"]  # an unassigned code point; bidi text RFC 4518 refuses


@pytest.mark.parametrize("subject", UNPREPARABLE)
def test_a_subject_that_cannot_be_compared_is_refused_at_assignment(subject: str) -> None:
    assert _code(lambda: canonical_subject(subject)) == "invalid_subject"


@pytest.mark.parametrize("subject", UNPREPARABLE)
def test_certificates_and_requests_with_such_subjects_are_refused_not_failed(subject: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = build_certification_request_info(spki, subject)
    assert (
        _code(lambda: check_certification_request_info(info, spki, "CN=alice"))
        == "pop_not_a_certification_request"
    )
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name.from_rfc4514_string(subject)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "any")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert _code(lambda: check_certificate(certificate, spki, "CN=alice")) == "certificate_invalid"
    broken = certificate.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x05", 1)  # version 6
    assert _code(lambda: check_certificate(broken, spki, "CN=alice")) == "certificate_invalid"
