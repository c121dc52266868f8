"""One suite for the ``Hsm`` port, run over the software fake and over ``Pkcs11Hsm`` on
the real SoftHSM2 token of the test session: every key type and curve, every signature
mechanism with its hashes, re-wrap, refusals of foreign wrapped keys, and the SAM's own
keys. A fake that drifts from the real adapter fails here, not in production."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from sam_devtools.stack import Stack
from worker.domain.algorithms import (
    KeySpec,
    KeyType,
    ecdsa_signature_der,
    key_spec_from_template,
    pss_parameters,
    signature_scheme,
)
from worker.errors import SamError
from worker.fakes import SoftwareHsm
from worker.hsm.lane import LaneMode
from worker.ports import Hsm, WrappedKey
from worker.settings import load_infrastructure

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA-256": hashes.SHA256,
    "SHA-384": hashes.SHA384,
    "SHA-512": hashes.SHA512,
}


@dataclass(frozen=True)
class Subject:
    """An ``Hsm`` and the public keys of the SAM keys it holds."""

    hsm: Hsm
    state_public_pem: str
    audit_public_pem: str


def _software() -> Subject:
    hsm = SoftwareHsm()
    return Subject(hsm, hsm.state_public_pem(), hsm.audit_public_pem())


async def _pkcs11(stack: Stack, mode: LaneMode) -> AsyncIterator[Subject]:
    infrastructure = load_infrastructure(stack.infrastructure_file)
    hsm = await stack.hsm(mode=mode, sessions=2)
    try:
        yield Subject(hsm, infrastructure.state_key.public_key, infrastructure.audit_key.public_key)
    finally:
        await hsm.close()


# the lane on threads (the default) and inline on the loop: the same answers
@pytest.fixture(
    scope="module",
    params=[
        "software",
        pytest.param("pkcs11-threads", marks=pytest.mark.integration),
        pytest.param("pkcs11-inline", marks=pytest.mark.integration),
    ],
)
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "software":
        yield _software()
    else:
        mode = LaneMode(request.param.removeprefix("pkcs11-"))
        async for subject in _pkcs11(request.getfixturevalue("stack"), mode):
            yield subject


async def _wrapped(subject: Subject, spec: KeySpec) -> tuple[WrappedKey, object]:
    generated = await subject.hsm.generate_key_pair(spec)
    key = WrappedKey(spec, generated.wrapped_private_key, generated.kek_label, generated.wrap_mechanism)
    return key, serialization.load_der_public_key(generated.public_key_der)


def _verify(
    public_key: object, scheme_oid: str, digest: bytes, signature: bytes, parameters: str | None
) -> None:
    scheme = signature_scheme(
        scheme_oid, KeyType.RSA if isinstance(public_key, rsa.RSAPublicKey) else KeyType.EC, parameters
    )
    algorithm = _HASHES[scheme.hash_name]()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(ecdsa_signature_der(signature), digest, ec.ECDSA(Prehashed(algorithm)))
    elif isinstance(public_key, rsa.RSAPublicKey):
        if parameters is None:
            public_key.verify(signature, digest, padding.PKCS1v15(), Prehashed(algorithm))
        else:
            pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=scheme.digest_size)
            public_key.verify(signature, digest, pss, Prehashed(algorithm))
    else:
        raise AssertionError(f"unexpected key {public_key!r}")


EC_CASES = [
    (curve, oid)
    for curve in ("secp256r1", "secp384r1", "secp521r1")
    for oid in ("1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4")
]


@pytest.mark.parametrize(("curve", "oid"), EC_CASES)
async def test_ec_key_pairs_sign_every_hash_on_every_curve(subject: Subject, curve: str, oid: str) -> None:
    spec = key_spec_from_template("ECDSA", None, curve)
    key, public_key = await _wrapped(subject, spec)
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == curve
    scheme = signature_scheme(oid, KeyType.EC)
    digests = [hashlib.new(scheme.hash_name.replace("-", ""), bytes([i])).digest() for i in range(3)]
    signatures = await subject.hsm.sign_with_wrapped_key(key, scheme, [scheme.hsm_input(d) for d in digests])
    assert len(signatures) == 3
    for digest, signature in zip(digests, signatures, strict=True):
        assert len(signature) == 2 * ((public_key.curve.key_size + 7) // 8)  # raw r‖s
        _verify(public_key, oid, digest, signature, None)


@pytest.fixture(scope="module")
async def rsa_key(subject: Subject) -> tuple[WrappedKey, object]:
    return await _wrapped(subject, key_spec_from_template("RSA", 2048, None))


@pytest.mark.parametrize(
    ("oid", "pss_hash"),
    [
        ("1.2.840.113549.1.1.11", None),
        ("1.2.840.113549.1.1.12", None),
        ("1.2.840.113549.1.1.13", None),
        ("1.2.840.113549.1.1.10", "sha256"),
        ("1.2.840.113549.1.1.10", "sha384"),
        ("1.2.840.113549.1.1.10", "sha512"),
    ],
)
async def test_rsa_key_pairs_sign_pkcs1_and_pss_with_every_hash(
    subject: Subject, rsa_key: tuple[WrappedKey, object], oid: str, pss_hash: str | None
) -> None:
    key, public_key = rsa_key
    assert isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 2048
    parameters = base64.b64encode(pss_parameters(pss_hash)).decode() if pss_hash else None
    scheme = signature_scheme(oid, KeyType.RSA, parameters)
    digest = scheme.digest(b"document")
    [signature] = await subject.hsm.sign_with_wrapped_key(key, scheme, [scheme.hsm_input(digest)])
    _verify(public_key, oid, digest, signature, parameters)
    with pytest.raises(InvalidSignature):
        _verify(public_key, oid, scheme.digest(b"another document"), signature, parameters)


async def test_rewrap_keeps_the_private_key_under_the_current_kek(
    subject: Subject, rsa_key: tuple[WrappedKey, object]
) -> None:
    key, public_key = rsa_key
    rewrapped = await subject.hsm.rewrap(key)
    assert rewrapped.kek_label == subject.hsm.current_kek_label
    assert rewrapped.spec == key.spec
    scheme = signature_scheme("1.2.840.113549.1.1.11", KeyType.RSA)
    digest = scheme.digest(b"after re-wrap")
    [signature] = await subject.hsm.sign_with_wrapped_key(rewrapped, scheme, [scheme.hsm_input(digest)])
    _verify(public_key, scheme.oid, digest, signature, None)


async def _refusal(subject: Subject, key: WrappedKey) -> str:
    scheme = signature_scheme("1.2.840.10045.4.3.2", KeyType.EC)
    with pytest.raises(SamError) as refused:
        await subject.hsm.sign_with_wrapped_key(key, scheme, [hashlib.sha256(b"x").digest()])
    return f"{refused.value.code.name}: {refused.value.message}"


async def test_wrapped_keys_from_elsewhere_are_refused_as_invalid_key_pairs(subject: Subject) -> None:
    key, _ = await _wrapped(subject, key_spec_from_template("ECDSA", None, "secp256r1"))
    flipped = bytes([key.wrapped[0] ^ 1]) + key.wrapped[1:]
    assert (await _refusal(subject, replace(key, wrapped=flipped))).startswith("key_pair_invalid")
    assert (await _refusal(subject, replace(key, wrapped=b"\0" * 16))).startswith("key_pair_invalid")
    assert (await _refusal(subject, replace(key, wrap_mechanism="DES3_ECB"))).startswith("key_pair_invalid")


async def test_a_kek_the_hsm_lacks_is_the_hsms_fault_not_the_key_pairs(subject: Subject) -> None:
    """The KEK label comes from inside a seal this SAM made: a KEK gone from the HSM
    (lost, deleted, another token) must not tell the SSA to throw a valid key pair away."""
    key, _ = await _wrapped(subject, key_spec_from_template("ECDSA", None, "secp256r1"))
    assert (await _refusal(subject, replace(key, kek_label="no-such-kek"))).startswith("hsm_unavailable")


async def test_factor_mac_is_a_keyed_sha256_hmac(subject: Subject) -> None:
    first = await subject.hsm.factor_mac(b"sam-factor-v1\0kp\0pin\0123456")
    assert len(first) == 32
    assert await subject.hsm.factor_mac(b"sam-factor-v1\0kp\0pin\0123456") == first
    assert await subject.hsm.factor_mac(b"sam-factor-v1\0kp\0pin\0123457") != first
    assert first != hashlib.sha256(b"sam-factor-v1\0kp\0pin\0123456").digest()


async def test_state_and_audit_keys_sign_for_their_published_public_keys(subject: Subject) -> None:
    state = serialization.load_pem_public_key(subject.state_public_pem.encode())
    audit = serialization.load_pem_public_key(subject.audit_public_pem.encode())
    assert isinstance(state, ec.EllipticCurvePublicKey) and isinstance(audit, ec.EllipticCurvePublicKey)
    seal = await subject.hsm.sign_with_state_key(b"header.payload")
    assert len(seal) == 64
    state.verify(ecdsa_signature_der(seal), b"header.payload", ec.ECDSA(hashes.SHA256()))
    digest = hashlib.sha256(b"checkpoint").digest()
    checkpoint = await subject.hsm.sign_audit_digest(digest)
    audit.verify(ecdsa_signature_der(checkpoint), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):  # the two keys are distinct
        state.verify(ecdsa_signature_der(checkpoint), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
