"""The whole key lifecycle for every algorithm, and the refusals that keep sole control."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from joserfc import jws
from joserfc.jwk import ECKey

from sam_devtools.pki import private_key_pem
from tests.integration.conftest import EC_SHA256, Harness, key_id, public_key_der
from worker.client import SamClient, SamRequestError
from worker.domain.algorithms import pss_parameters
from worker.domain.certification import assemble_certification_request, build_certification_request_info
from worker.domain.contract import KeyPairObject, KeyPairStatus

pytestmark = pytest.mark.integration

HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}
RSA_PKCS1 = {
    "sha256": "1.2.840.113549.1.1.11",
    "sha384": "1.2.840.113549.1.1.12",
    "sha512": "1.2.840.113549.1.1.13",
}
ECDSA = {"sha256": "1.2.840.10045.4.3.2", "sha384": "1.2.840.10045.4.3.3", "sha512": "1.2.840.10045.4.3.4"}
PSS = "1.2.840.113549.1.1.10"

TEMPLATES = [
    {"algorithm": "RSA", "size": 2048},
    {"algorithm": "RSA", "size": 3072},
    {"algorithm": "RSA", "size": 4096},
    {"algorithm": "ECDSA", "named_curve": "secp256r1"},
    {"algorithm": "ECDSA", "named_curve": "prime256v1"},
    {"algorithm": "ECDSA", "named_curve": "secp384r1"},
    {"algorithm": "ECDSA", "named_curve": "prime384v1"},
    {"algorithm": "ECDSA", "named_curve": "secp521r1"},
    {"algorithm": "ECDSA", "named_curve": "prime521v1"},
]


def _verify(certificate: x509.Certificate, scheme: tuple[str, str], digest: bytes, signature: bytes) -> None:
    kind, hash_name = scheme
    key, algorithm = certificate.public_key(), Prehashed(HASHES[hash_name])
    if kind == "ecdsa":
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, digest, ec.ECDSA(algorithm))
    elif kind == "pss":
        assert isinstance(key, rsa.RSAPublicKey)
        pss = padding.PSS(mgf=padding.MGF1(HASHES[hash_name]), salt_length=HASHES[hash_name].digest_size)
        key.verify(signature, digest, pss, algorithm)
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, digest, padding.PKCS1v15(), algorithm)


def _openssl_verifies(request_der: bytes) -> str:
    result = subprocess.run(
        ["openssl", "req", "-inform", "DER", "-verify", "-noout"],
        input=request_der,
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return (result.stdout + result.stderr).decode()


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: str(t.get("size") or t.get("named_curve")))
async def test_every_algorithm_through_the_whole_lifecycle(
    harness: Harness, ssa: SamClient, template: dict[str, Any]
) -> None:
    signer = f"signer-{os.urandom(3).hex()}"
    created = await ssa.create_key_pair(**template)
    assert created.status == KeyPairStatus(assigned=False, certified=False, enabled=False)
    assigned = await ssa.assign_key_pair(created, signer, f"CN={signer},O=Example,C=ES")
    rsa_key = template["algorithm"] == "RSA"
    # PoP with PSS for RSA-3072, so PSS proofs are covered too
    if template.get("size") == 3072:
        pop_algorithm, pop_parameters = PSS, pss_parameters("sha256")
    else:
        pop_algorithm, pop_parameters = (RSA_PKCS1 if rsa_key else ECDSA)["sha256"], None
    request = await ssa.certification_request(assigned, pop_algorithm, pop_parameters)
    assert "verify OK" in _openssl_verifies(request)
    certificate_der = harness.stack.pki.issue_from_request(request)
    certified = await ssa.update_key_pair(assigned, signer, certificate=certificate_der)
    assert certified.status == KeyPairStatus(assigned=True, certified=True, enabled=True)
    certificate = x509.load_der_x509_certificate(certificate_der)

    schemes = (
        [("pkcs1", h) for h in HASHES] + [("pss", h) for h in HASHES]
        if rsa_key
        else [("ecdsa", h) for h in HASHES]
    )
    for kind, hash_name in schemes:
        digest = hashlib.new(hash_name, f"{kind} {hash_name}".encode()).digest()
        oid = {"pkcs1": RSA_PKCS1, "ecdsa": ECDSA}.get(kind, {}).get(hash_name, PSS)
        parameters = pss_parameters(hash_name) if kind == "pss" else None
        hash_oid = {
            "sha256": "2.16.840.1.101.3.4.2.1",
            "sha384": "2.16.840.1.101.3.4.2.2",
            "sha512": "2.16.840.1.101.3.4.2.3",
        }[hash_name]
        sad = harness.dev_as.issue_sad(harness.sam_id, signer, key_id(certified), [digest], hash_oid=hash_oid)
        [signature] = await ssa.sign(certified, signer, oid, [digest], sad, parameters=parameters)
        _verify(certificate, (kind, hash_name), digest, signature)


async def _refused(code: str, call: Any) -> SamRequestError:
    with pytest.raises(SamRequestError) as refused:
        await call
    assert refused.value.code == code, refused.value
    return refused.value


def _sad(harness: Harness, signer: str, key_pair: KeyPairObject, digest: bytes) -> str:
    return harness.dev_as.issue_sad(harness.sam_id, signer, key_id(key_pair), [digest])


async def test_second_assignment_refused_on_every_worker(harness: Harness, ssa: SamClient) -> None:
    originals = [await ssa.create_key_pair("ECDSA", named_curve="secp256r1") for _ in range(4)]
    assigned = [await ssa.assign_key_pair(k, "erin", "CN=Erin") for k in originals]
    refusals = [
        await _refused("key_pair_already_assigned", ssa.assign_key_pair(k, "mallory", "CN=Mallory"))
        for k in originals
    ]
    # the replay of the old unassigned copy is refused whichever worker takes it
    served = {r["request_id"]: r["instance"] for r in harness.audit_records()}
    winners = {
        served[r["request_id"]]
        for r in harness.audit_records()
        if r["key_pair"] in {a.id for a in assigned} and r["status"] == 200
    }
    losers = {served[e.request_id or ""] for e in refusals}
    assert winners | losers >= {"worker-1", "worker-2"}


async def test_racing_assignments_have_one_winner(ssa: SamClient) -> None:
    for _ in range(5):
        key_pair = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
        outcomes = await asyncio.gather(
            ssa.assign_key_pair(key_pair, "frank", "CN=Frank"),
            ssa.assign_key_pair(key_pair, "grace", "CN=Grace"),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, KeyPairObject)]
        losers = [o for o in outcomes if isinstance(o, SamRequestError)]
        assert len(winners) == 1 and len(losers) == 1, outcomes
        assert losers[0].code in ("key_pair_already_assigned", "key_pair_outdated")


async def test_proof_of_possession_is_no_signing_oracle(harness: Harness, ssa: SamClient) -> None:
    key_pair = await ssa.assign_key_pair(
        await ssa.create_key_pair("ECDSA", named_curve="secp256r1"), "heidi", "CN=Heidi"
    )
    other = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    own_key = public_key_der(key_pair)
    other_key = public_key_der(other)
    await _refused(
        "pop_not_a_certification_request",
        ssa.prove_possession(key_pair, hashlib.sha256(b"x").digest(), EC_SHA256),
    )
    await _refused(
        "pop_not_a_certification_request", ssa.prove_possession(key_pair, os.urandom(200), EC_SHA256)
    )
    info = build_certification_request_info(own_key, "CN=Heidi")
    await _refused("pop_not_a_certification_request", ssa.prove_possession(key_pair, info + b"\0", EC_SHA256))
    await _refused(
        "pop_public_key_mismatch",
        ssa.prove_possession(key_pair, build_certification_request_info(other_key, "CN=Heidi"), EC_SHA256),
    )
    await _refused(
        "pop_subject_mismatch",
        ssa.prove_possession(key_pair, build_certification_request_info(own_key, "CN=Mallory"), EC_SHA256),
    )
    await _refused(
        "key_pair_not_assigned",
        ssa.prove_possession(other, build_certification_request_info(other_key, "CN=X"), EC_SHA256),
    )
    await _refused("algorithm_key_mismatch", ssa.prove_possession(key_pair, info, "1.2.840.113549.1.1.11"))
    signature = await ssa.prove_possession(key_pair, info, EC_SHA256)
    request = assemble_certification_request(info, EC_SHA256, None, signature)
    certified = await ssa.update_key_pair(
        key_pair, "heidi", certificate=harness.stack.pki.issue_from_request(request)
    )
    await _refused("key_pair_certified", ssa.prove_possession(certified, info, EC_SHA256))


async def test_update_accepts_only_this_key_and_subject(harness: Harness, ssa: SamClient) -> None:
    key_pair = await ssa.assign_key_pair(
        await ssa.create_key_pair("ECDSA", named_curve="secp256r1"), "ivan", "CN=Ivan"
    )
    stranger = ec.generate_private_key(ec.SECP256R1())
    stranger_request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=Ivan"))
        .sign(stranger, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    await _refused(
        "certificate_key_mismatch",
        ssa.update_key_pair(
            key_pair, "ivan", certificate=harness.stack.pki.issue_from_request(stranger_request)
        ),
    )
    other_subject = assemble_certification_request(
        info := build_certification_request_info(public_key_der(key_pair), "CN=Ivan"),
        EC_SHA256,
        None,
        await ssa.prove_possession(key_pair, info, EC_SHA256),
    )
    good_certificate = harness.stack.pki.issue_from_request(other_subject)
    # a certificate for the right key but another subject: forge via the CA directly
    forged = x509.load_der_x509_certificate(good_certificate)
    ca_key = serialization.load_pem_private_key((harness.stack.pki.root / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    wrong_subject = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=Mallory"))
        .issuer_name(forged.issuer)
        .public_key(forged.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(forged.not_valid_before_utc)
        .not_valid_after(forged.not_valid_after_utc)
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    await _refused(
        "certificate_subject_mismatch", ssa.update_key_pair(key_pair, "ivan", certificate=wrong_subject)
    )
    await _refused(
        "certificate_invalid", ssa.update_key_pair(key_pair, "ivan", certificate=b"not a certificate")
    )
    await _refused("certificate_required", ssa.update_key_pair(key_pair, "ivan"))
    await _refused("signer_mismatch", ssa.update_key_pair(key_pair, "mallory", certificate=good_certificate))
    certified = await ssa.update_key_pair(key_pair, "ivan", certificate=good_certificate)
    await _refused("status_transition_invalid", ssa.update_key_pair(certified, "ivan", certified=False))


async def test_signing_needs_assigned_certified_enabled_and_current(harness: Harness, ssa: SamClient) -> None:
    digest = hashlib.sha256(b"contract").digest()
    created = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    await _refused(
        "key_pair_not_assigned",
        ssa.sign(created, "judy", EC_SHA256, [digest], _sad(harness, "judy", created, digest)),
    )
    assigned = await ssa.assign_key_pair(created, "judy", "CN=Judy")
    await _refused(
        "key_pair_not_certified",
        ssa.sign(assigned, "judy", EC_SHA256, [digest], _sad(harness, "judy", assigned, digest)),
    )
    request = await ssa.certification_request(assigned, EC_SHA256)
    certificate = harness.stack.pki.issue_from_request(request)
    disabled = await ssa.update_key_pair(assigned, "judy", certificate=certificate, enabled=False)
    await _refused(
        "key_pair_disabled",
        ssa.sign(disabled, "judy", EC_SHA256, [digest], _sad(harness, "judy", disabled, digest)),
    )
    enabled = await ssa.update_key_pair(disabled, "judy", enabled=True)
    assert (
        len(await ssa.sign(enabled, "judy", EC_SHA256, [digest], _sad(harness, "judy", enabled, digest))) == 1
    )
    disabled_again = await ssa.update_key_pair(enabled, "judy", enabled=False)
    # the old enabled copy cannot be replayed once a newer revision exists
    await _refused(
        "key_pair_outdated",
        ssa.sign(enabled, "judy", EC_SHA256, [digest], _sad(harness, "judy", enabled, digest)),
    )
    await ssa.delete_key_pair(disabled_again, "judy")
    for copy in (created, assigned, enabled, disabled_again):
        code = "key_pair_deleted"
        await _refused(code, ssa.sign(copy, "judy", EC_SHA256, [digest], _sad(harness, "judy", copy, digest)))


async def test_deletion_holds_on_a_worker_started_later(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "kim")
    await ssa.delete_key_pair(key_pair, "kim")
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "worker-after-delete")
        try:
            digest = hashlib.sha256(b"after deletion").digest()
            error = await _refused(
                "key_pair_deleted",
                ssa.sign(key_pair, "kim", EC_SHA256, [digest], _sad(harness, "kim", key_pair, digest)),
            )
            await _refused("key_pair_deleted", ssa.rewrap_key_pair(key_pair))
        finally:
            await harness.stop_worker("worker-after-delete")
    assert harness.audit_record(error.request_id or "")["instance"] == "worker-after-delete"


async def test_deletion_by_the_signer_through_a_sad(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "leo")
    wrong = harness.dev_as.issue_deletion_sad(harness.sam_id, "mallory", key_id(key_pair))
    await _refused("sad_signer_mismatch", ssa.delete_key_pair(key_pair, "leo", wrong))
    signing_sad = _sad(harness, "leo", key_pair, hashlib.sha256(b"x").digest())
    await _refused(
        "sad_invalid", ssa.delete_key_pair(key_pair, "leo", signing_sad)
    )  # a signing SAD deletes nothing
    await ssa.delete_key_pair(
        key_pair, "leo", harness.dev_as.issue_deletion_sad(harness.sam_id, "leo", key_id(key_pair))
    )
    [record] = [
        r
        for r in harness.audit_records()
        if r["key_pair"] == key_pair.id and r["operation"] == "key_pairs.delete" and r["status"] == 200
    ]
    assert record["sad_jti"]
    await _refused("key_pair_deleted", ssa.delete_key_pair(key_pair, "leo"))


async def test_skad_at_assignment(harness: Harness, ssa: SamClient) -> None:
    key_pair = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    other_signer = harness.dev_as.issue_skad(harness.sam_id, "mallory", key_id(key_pair))
    await _refused("sad_signer_mismatch", ssa.assign_key_pair(key_pair, "mia", "CN=Mia", skad=other_signer))
    other_key = harness.dev_as.issue_skad(harness.sam_id, "mia", "another-key-pair")
    await _refused("sad_key_pair_mismatch", ssa.assign_key_pair(key_pair, "mia", "CN=Mia", skad=other_key))
    assigned = await ssa.assign_key_pair(
        key_pair, "mia", "CN=Mia", skad=harness.dev_as.issue_skad(harness.sam_id, "mia", key_id(key_pair))
    )
    [record] = [
        r
        for r in harness.audit_records()
        if r["key_pair"] == assigned.id
        and r["operation"] == "signers.key_pairs.assign"
        and r["status"] == 200
    ]
    assert record["sad_jti"]


async def test_sam_managed_factor(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(ssa, "nina", pin="open sesame")
    assert key_pair.sam_factor == "pin" and "sesame" not in key_pair.model_dump_json()
    digest = hashlib.sha256(b"with a PIN").digest()
    await _refused(
        "sam_factor_missing",
        ssa.sign(key_pair, "nina", EC_SHA256, [digest], _sad(harness, "nina", key_pair, digest)),
    )
    await _refused(
        "sam_factor_invalid",
        ssa.sign(key_pair, "nina", EC_SHA256, [digest], _sad(harness, "nina", key_pair, digest), pin="0000"),
    )
    [signature] = await ssa.sign(
        key_pair, "nina", EC_SHA256, [digest], _sad(harness, "nina", key_pair, digest), pin="open sesame"
    )
    assert signature
    assert not any("sesame" in str(r) for r in harness.audit_records())


async def test_key_pairs_from_another_sam_are_refused(harness: Harness, ssa: SamClient) -> None:
    key_pair = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    payload = key_pair.sealed.split(".")[1]
    foreign = ec.generate_private_key(ec.SECP256R1())
    forged = jws.serialize_compact(
        {"alg": "ES256", "kid": "sam-state", "typ": "sam-key-pair+jws"},
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)),
        ECKey.import_key(private_key_pem(foreign).decode()),
    )
    forged_copy = key_pair.model_copy(update={"sealed": forged})
    await _refused("key_pair_invalid", ssa.assign_key_pair(forged_copy, "olga", "CN=Olga"))


async def test_skad_required_by_policy(harness: Harness, ssa: SamClient, tmp_path: Path) -> None:
    static = {**harness.static, "sad_policy": {"assignment_skad": "required"}}
    static_file = tmp_path / "static_config.json"
    static_file.write_text(json.dumps(static))
    async with harness.without_shared_workers():
        await asyncio.to_thread(
            harness.start_worker, "worker-skad-required", env={"SAM_STATIC_CONFIG_FILE": str(static_file)}
        )
        try:
            key_pair = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
            await _refused("sad_missing", ssa.assign_key_pair(key_pair, "pia", "CN=Pia"))
            skad = harness.dev_as.issue_skad(harness.sam_id, "pia", key_id(key_pair))
            status = (await ssa.assign_key_pair(key_pair, "pia", "CN=Pia", skad=skad)).status
            assert status is not None and status.assigned
        finally:
            await harness.stop_worker("worker-skad-required")
