"""Key templates and signature algorithms: (input → spec or error code)."""

from __future__ import annotations

import pytest

from worker.domain.algorithms import HsmMechanism, KeyType, key_spec_from_template, signature_scheme
from worker.errors import SamError


@pytest.mark.parametrize(
    ("algorithm", "size", "curve", "expected"),
    [
        ("RSA", 2048, None, "RSA-2048"),
        ("RSA", 3072, None, "RSA-3072"),
        ("RSA", 4096, None, "RSA-4096"),
        ("ECDSA", None, "secp256r1", "ECDSA-secp256r1"),
        ("ECDSA", None, "prime256v1", "ECDSA-secp256r1"),
        ("ECDSA", None, "prime384v1", "ECDSA-secp384r1"),
        ("ECDSA", None, "prime521v1", "ECDSA-secp521r1"),
        ("RSA", 1024, None, "unsupported_algorithm"),
        ("RSA", None, None, "unsupported_algorithm"),
        ("ECDSA", None, "secp256k1", "unsupported_algorithm"),
        ("ECDSA", None, None, "unsupported_algorithm"),
        ("DSA", 2048, None, "unsupported_algorithm"),
    ],
)
def test_key_templates(algorithm: str, size: int | None, curve: str | None, expected: str) -> None:
    try:
        assert key_spec_from_template(algorithm, size, curve).description == expected
    except SamError as exc:
        assert exc.code.name == expected


@pytest.mark.parametrize(
    ("oid", "key_type", "expected"),
    [
        ("1.2.840.113549.1.1.11", KeyType.RSA, ("sha256WithRSAEncryption", 32, HsmMechanism.RSA_PKCS)),
        ("1.2.840.113549.1.1.13", KeyType.RSA, ("sha512WithRSAEncryption", 64, HsmMechanism.RSA_PKCS)),
        ("1.2.840.10045.4.3.2", KeyType.EC, ("ecdsa-with-SHA256", 32, HsmMechanism.ECDSA)),
        ("1.2.840.10045.4.3.3", KeyType.EC, ("ecdsa-with-SHA384", 48, HsmMechanism.ECDSA)),
        ("1.2.840.10045.4.3.2", KeyType.RSA, "algorithm_key_mismatch"),
        ("1.2.840.113549.1.1.11", KeyType.EC, "algorithm_key_mismatch"),
        ("1.2.840.113549.1.1.5", KeyType.RSA, "unsupported_algorithm"),  # SHA-1 with RSA
        ("1.2.840.10045.4.1", KeyType.EC, "unsupported_algorithm"),  # ECDSA with SHA-1
    ],
)
def test_signature_schemes(oid: str, key_type: KeyType, expected: object) -> None:
    try:
        scheme = signature_scheme(oid, key_type)
        assert (scheme.name, scheme.digest_size, scheme.mechanism) == expected
    except SamError as exc:
        assert exc.code.name == expected


def test_dtbs_length_must_match_the_hash() -> None:
    scheme = signature_scheme("1.2.840.10045.4.3.2", KeyType.EC)
    scheme.check_dtbs(b"\0" * 32)
    for wrong in (b"", b"\0" * 20, b"\0" * 48):
        with pytest.raises(SamError) as refused:
            scheme.check_dtbs(wrong)
        assert refused.value.code.name == "invalid_dtbs"


def test_rsa_input_is_a_digest_info() -> None:
    scheme = signature_scheme("1.2.840.113549.1.1.11", KeyType.RSA)
    digest = bytes(range(32))
    assert scheme.hsm_input(digest) == bytes.fromhex("3031300d060960864801650304020105000420") + digest
