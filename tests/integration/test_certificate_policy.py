"""On the real stack: a key pair is certified only with a certificate that chains to a
trust anchor of the dynamic configuration (the dev CA here), and signs only while that
certificate is valid — an expired credential cannot sign."""

from __future__ import annotations

import asyncio
import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import EC_SHA256, Harness, key_id
from worker.client import SamClient, SamRequestError
from worker.domain.contract import KeyPairObject

pytestmark = pytest.mark.integration


async def _assigned_request(ssa: SamClient, signer: str) -> tuple[KeyPairObject, bytes]:
    created = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    assigned = await ssa.assign_key_pair(created, signer, f"CN={signer},O=Example")
    return assigned, await ssa.certification_request(assigned, EC_SHA256)


def _rogue_certificate(request_der: bytes) -> bytes:
    """The same subject and key, certified by a CA nobody configured."""
    request = x509.load_der_x509_csr(request_der)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev CA")]))  # the same name
        .public_key(request.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(True, True, False, False, False, False, False, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


async def test_a_certificate_from_an_unconfigured_ca_certifies_nothing(
    harness: Harness, ssa: SamClient
) -> None:
    assigned, request = await _assigned_request(ssa, "grace")
    with pytest.raises(SamRequestError) as refused:
        await ssa.update_key_pair(assigned, "grace", certificate=_rogue_certificate(request))
    assert (refused.value.status, refused.value.code) == (422, "certificate_untrusted")
    record = harness.audit_record(refused.value.request_id or "")
    assert record["error_code"] == "certificate_untrusted"
    # the dev CA, a configured trust anchor, certifies it
    certified = await ssa.update_key_pair(
        assigned, "grace", certificate=harness.stack.pki.issue_from_request(request)
    )
    assert certified.status is not None and certified.status.certified


async def test_an_expired_credential_cannot_sign(harness: Harness, ssa: SamClient) -> None:
    assigned, request = await _assigned_request(ssa, "heidi")
    short_lived = harness.stack.pki.issue_from_request(request, valid_for=datetime.timedelta(seconds=3))
    certified = await ssa.update_key_pair(assigned, "heidi", certificate=short_lived)
    digest = hashlib.sha256(b"while valid").digest()
    sad = harness.dev_as.issue_sad(harness.sam_id, "heidi", key_id(certified), [digest])
    assert len(await ssa.sign(certified, "heidi", EC_SHA256, [digest], sad)) == 1
    await asyncio.sleep(4)
    digest = hashlib.sha256(b"after expiry").digest()
    sad = harness.dev_as.issue_sad(harness.sam_id, "heidi", key_id(certified), [digest])
    with pytest.raises(SamRequestError) as refused:
        await ssa.sign(certified, "heidi", EC_SHA256, [digest], sad)
    assert (refused.value.status, refused.value.code) == (409, "certificate_expired")
