"""Enrolment of a signer's credential through the SAM: create → assign → proof of
possession (a PKCS#10 request the SAM signs) → certify (by whatever CA the operator
uses) → enable, and the credential kept in the gateway's store at each step, so an
enrolment that waits for its CA can be finished later (``finish``).

The credential's id is the key pair's id: it is what the signer's authorization server
names as ``credentialID`` in the SAD, and what the SAM checks it against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from cryptography import x509

from worker.client import SamClient
from worker.csc.store import Credential, CredentialState, CredentialStore
from worker.domain.contract import KeyPairObject

__all__ = ["begin", "enrol", "finish"]

EC_SHA256 = "1.2.840.10045.4.3.2"
RSA_SHA256 = "1.2.840.113549.1.1.11"

# a CA: the DER PKCS#10 request in, the DER certificate and its intermediates out
Certify = Callable[[bytes], Awaitable[tuple[bytes, Sequence[bytes]]]]


async def begin(
    sam: SamClient,
    store: CredentialStore,
    *,
    issuer: str,
    subject: str,
    signer: str,
    distinguished_name: str,
    algorithm: Literal["RSA", "ECDSA"] = "ECDSA",
    size: int | None = None,
    named_curve: str | None = None,
    skad: str | None = None,
    description: str | None = None,
) -> Credential:
    """A new key pair assigned to ``signer`` (whom ``issuer`` speaks for), its
    certification request made, and the credential stored awaiting its certificate."""
    if algorithm == "ECDSA" and named_curve is None:
        named_curve = "secp256r1"
    if algorithm == "RSA" and size is None:
        size = 2048
    created = await sam.create_key_pair(algorithm, size=size, named_curve=named_curve)
    assigned = await sam.assign_key_pair(
        created, signer, distinguished_name, skad=skad, authorization_server=issuer if skad is None else None
    )
    request = await sam.certification_request(assigned, EC_SHA256 if algorithm == "ECDSA" else RSA_SHA256)
    assert assigned.id is not None
    credential = Credential(
        credential_id=assigned.id,
        issuer=issuer,
        subject=subject,
        signer=signer,
        key_pair=assigned.model_dump_json(exclude_none=True),
        state=CredentialState.awaiting_certificate,
        algorithm=algorithm,
        size=size,
        named_curve=named_curve if algorithm == "ECDSA" else None,
        request=request,
        description=description,
    )
    await store.put(credential)
    return credential


async def finish(
    sam: SamClient, store: CredentialStore, credential: Credential, certificate: bytes, chain: Sequence[bytes]
) -> Credential:
    """Certify and enable the key pair with ``certificate`` (DER; ``chain``: the
    intermediates and the root, DER) and store the credential enabled. The SAM checks
    the certificate is for this key pair and this signer's subject."""
    key_pair = KeyPairObject.model_validate_json(credential.key_pair)
    # the SAM takes the intermediates up to its trust anchors; clients get the root too
    intermediates = [der for der in chain if not _self_issued(der)]
    updated = await sam.update_key_pair(
        key_pair, credential.signer, certificate=certificate, chain=intermediates or None
    )
    enabled = dataclasses.replace(
        credential,
        key_pair=updated.model_dump_json(exclude_none=True),
        state=CredentialState.enabled,
        chain=(certificate, *chain),
        request=None,
    )
    await store.put(enabled)
    return enabled


async def enrol(sam: SamClient, store: CredentialStore, certify: Certify, **details: object) -> Credential:
    """``begin`` and ``finish`` in one, with a CA that answers at once (the dev CA)."""
    credential = await begin(sam, store, **details)  # type: ignore[arg-type]
    assert credential.request is not None
    certificate, chain = await certify(credential.request)
    return await finish(sam, store, credential, certificate, chain)


def _self_issued(der: bytes) -> bool:
    certificate = x509.load_der_x509_certificate(der)
    return certificate.issuer == certificate.subject
