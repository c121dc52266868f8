"""The signing path end to end on the real broker, token and worker processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from tests.integration.conftest import Harness, key_id, public_key_der
from worker.client import SamClient, SamRequestError
from worker.domain.contract import KeyPairObject, KeyPairStatus, Signer

pytestmark = pytest.mark.integration

EC_SHA256 = "1.2.840.10045.4.3.2"
RSA_SHA256 = "1.2.840.113549.1.1.11"


def verify(key_pair: KeyPairObject, algorithm: str, digest: bytes, signature: bytes) -> None:
    key = serialization.load_der_public_key(public_key_der(key_pair))
    if algorithm == EC_SHA256:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


@pytest.mark.parametrize(
    ("template", "algorithm"),
    [
        ({"algorithm": "ECDSA", "named_curve": "secp256r1"}, EC_SHA256),
        ({"algorithm": "RSA", "size": 2048}, RSA_SHA256),
    ],
    ids=["ec-p256", "rsa-2048"],
)
async def test_happy_path_across_two_workers(
    harness: Harness, ssa: SamClient, template: dict[str, object], algorithm: str
) -> None:
    assigned = await harness.certified_key_pair(ssa, "alice", template)
    assert assigned.status == KeyPairStatus(assigned=True, certified=True, enabled=True)
    assert assigned.signer == Signer(id="alice")

    async def sign_one(n: int) -> None:
        digest = hashlib.sha256(f"document {n}".encode()).digest()
        sad = harness.dev_as.issue_sad(harness.sam_id, "alice", key_id(assigned), [digest])
        [signature] = await ssa.sign(assigned, "alice", algorithm, [digest], sad)
        verify(assigned, algorithm, digest, signature)

    await asyncio.gather(*(sign_one(n) for n in range(24)))
    served_by = Counter(
        r["instance"] for r in harness.audit_records() if r["key_pair"] == assigned.id and r["status"] == 200
    )
    assert set(served_by) >= {"worker-1", "worker-2"}, served_by


async def test_several_digests_in_one_request(harness: Harness, ssa: SamClient) -> None:
    key_pair = await harness.certified_key_pair(
        ssa, "carol", {"algorithm": "ECDSA", "named_curve": "prime256v1"}
    )
    digests = [hashlib.sha256(os.urandom(16)).digest() for _ in range(5)]
    sad = harness.dev_as.issue_sad(harness.sam_id, "carol", key_id(key_pair), digests)
    signatures = await ssa.sign(key_pair, "carol", EC_SHA256, digests, sad)
    for digest, signature in zip(digests, signatures, strict=True):
        verify(key_pair, EC_SHA256, digest, signature)
    record = next(r for r in harness.audit_records() if r["sad_jti"] and r["key_pair"] == key_pair.id)
    assert record["dtbs_sha256"] == [hashlib.sha256(d).hexdigest() for d in digests]


async def test_replica_started_later_serves_with_current_configuration(
    harness: Harness, admin: SamClient
) -> None:
    current = await admin.get_configuration()
    bumped = current.model_copy(update={"version": current.version + 1})
    await admin.put_configuration(bumped)
    harness.start_worker("worker-late", queues="admin")
    log = harness.stack.path("logs", "worker-late.log").read_text()
    assert f"configuration version {bumped.version}" in log
    served = []
    for _ in range(30):
        before = {r["request_id"] for r in harness.audit_records()}
        assert (await admin.get_configuration()).version == bumped.version
        served += [
            r
            for r in harness.audit_records()
            if r["request_id"] not in before and r["instance"] == "worker-late"
        ]
        if served:
            break
    assert served and served[0]["status"] == 200
    harness.workers.pop("worker-late").terminate()


async def test_signature_refused_without_assignment(harness: Harness, ssa: SamClient) -> None:
    key_pair = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    digest = hashlib.sha256(b"x").digest()
    sad = harness.dev_as.issue_sad(harness.sam_id, "alice", key_id(key_pair), [digest])
    with pytest.raises(SamRequestError) as refused:
        await ssa.sign(key_pair, "alice", EC_SHA256, [digest], sad)
    assert refused.value.code == "key_pair_not_assigned"
