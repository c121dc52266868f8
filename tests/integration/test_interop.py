"""A real PDF and a detached CMS signed through the SAM, checked by independent
validators: pyHanko's (intact, valid, trusted against the dev CA), poppler's pdfsig,
and openssl cms over the signed byte range and over the .p7s file."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import async_validate_pdf_signature
from pyhanko_certvalidator import ValidationContext

from tests.integration.conftest import Harness, certificate_der, key_id, wire
from worker.client import SamClient, SamConfigurationError
from worker.integrations.pdf import SamSigner, blank_pdf, sign_detached, sign_pdf

pytestmark = pytest.mark.integration

TEMPLATES: dict[str, dict[str, Any]] = {
    "ec-p256": {"algorithm": "ECDSA", "named_curve": "secp256r1"},
    "rsa-2048": {"algorithm": "RSA", "size": 2048},
}


async def document_signer(
    harness: Harness, ssa: SamClient, kind: str
) -> tuple[SamSigner, asn1_x509.Certificate]:
    signer_id = f"pdf-{kind}"
    key_pair = await harness.certified_key_pair(ssa, signer_id, TEMPLATES[kind])
    certificate = asn1_x509.Certificate.load(certificate_der(key_pair))
    ca = asn1_x509.Certificate.load(
        x509.load_pem_x509_certificate(harness.stack.pki.ca_file.read_bytes()).public_bytes(Encoding.DER)
    )

    async def authorize(digest: bytes, hash_oid: str) -> str:
        return harness.dev_as.issue_sad(
            harness.sam_id, signer_id, key_id(key_pair), [digest], hash_oid=hash_oid
        )

    return SamSigner(ssa, key_pair, signer_id, certificate, [ca], authorize), ca


def openssl_cms_verify(signature: Path, content: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(signature),
            "-content",
            str(content),
            "-CAfile",
            str(ca),
            "-purpose",
            "any",
            "-out",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("kind", list(TEMPLATES))
async def test_pdf_signed_through_the_sam_validates_everywhere(
    harness: Harness, ssa: SamClient, kind: str, tmp_path: Path
) -> None:
    signer, ca = await document_signer(harness, ssa, kind)
    signed = await sign_pdf(blank_pdf(f"interop {kind}"), signer, reason="interop test")
    path = tmp_path / f"signed-{kind}.pdf"
    path.write_bytes(signed)

    embedded = PdfFileReader(io.BytesIO(signed)).embedded_signatures
    assert len(embedded) == 1
    status = await async_validate_pdf_signature(
        embedded[0], ValidationContext(trust_roots=[ca], allow_fetching=False)
    )
    assert status.intact and status.valid and status.trusted, status.summary()
    assert status.coverage is not None
    assert status.coverage.name == "ENTIRE_FILE"

    pdfsig = await asyncio.to_thread(
        subprocess.run, ["pdfsig", str(path)], capture_output=True, text=True, check=False
    )
    assert "Signature Validation: Signature is Valid." in pdfsig.stdout, pdfsig.stdout + pdfsig.stderr
    assert "Total document signed" in pdfsig.stdout

    # openssl over exactly the bytes the signature covers
    signature = embedded[0]
    start1, length1, start2, length2 = signature.byte_range
    (tmp_path / "covered.bin").write_bytes(
        signed[start1 : start1 + length1] + signed[start2 : start2 + length2]
    )
    (tmp_path / "signature.der").write_bytes(signature.pkcs7_content)
    result = openssl_cms_verify(
        tmp_path / "signature.der", tmp_path / "covered.bin", harness.stack.pki.ca_file
    )
    assert result.returncode == 0, result.stderr
    # and a single changed byte inside the range breaks it
    tampered = bytearray(signed)
    tampered[start1 + length1 // 2] ^= 1
    (tmp_path / "covered.bin").write_bytes(
        bytes(tampered[start1 : start1 + length1]) + signed[start2 : start2 + length2]
    )
    assert (
        openssl_cms_verify(
            tmp_path / "signature.der", tmp_path / "covered.bin", harness.stack.pki.ca_file
        ).returncode
        != 0
    )


@pytest.mark.parametrize("kind", list(TEMPLATES))
async def test_detached_cms_of_any_file(harness: Harness, ssa: SamClient, kind: str, tmp_path: Path) -> None:
    signer, _ = await document_signer(harness, ssa, kind)
    document = tmp_path / "contract.bin"
    document.write_bytes(bytes(range(256)) * 40)
    p7s = tmp_path / "contract.bin.p7s"
    p7s.write_bytes(await sign_detached(document, signer))
    assert openssl_cms_verify(p7s, document, harness.stack.pki.ca_file).returncode == 0
    document.write_bytes(document.read_bytes() + b"!")
    assert openssl_cms_verify(p7s, document, harness.stack.pki.ca_file).returncode != 0


async def test_sam_sign_file_command(harness: Harness, ssa: SamClient, tmp_path: Path) -> None:
    key_pair = await harness.certified_key_pair(ssa, "cli-signer")
    (tmp_path / "key-pair.json").write_text(json.dumps(wire(key_pair)))
    (tmp_path / "certificate.der").write_bytes(certificate_der(key_pair))
    document = tmp_path / "report.txt"
    document.write_text("signed from the command line\n")
    sad_command = (
        f"{sys.executable} -m sam_devtools.authorization_server --id dev-as "
        f"--key {harness.stack.pki.jws_key('dev-as')} --audience {harness.sam_id} --signer {{signer}} "
        "--key-pair-id {key_pair_id} --dtbs {dtbs} --hash-oid {hash_oid}"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "worker.cli.sam",
            "--profile",
            str(harness.stack.profile("ssa-1")),
            "sign-file",
            str(document),
            "--key-pair",
            str(tmp_path / "key-pair.json"),
            "--signer",
            "cli-signer",
            "--certificate",
            str(tmp_path / "certificate.der"),
            "--chain",
            str(harness.stack.pki.ca_file),
            "--sad-command",
            sad_command,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (
        openssl_cms_verify(tmp_path / "report.txt.p7s", document, harness.stack.pki.ca_file).returncode == 0
    )


async def test_a_certificate_for_another_key_is_refused_before_any_sad(
    harness: Harness, ssa: SamClient
) -> None:
    """Bob's certificate with Alice's key pair would make a document that names Bob and
    carries Alice's signature, and spend Alice's SAD on it: refused before asking."""
    alice = await harness.certified_key_pair(ssa, "pdf-alice")
    bob = await harness.certified_key_pair(ssa, "pdf-bob")
    asked: list[bytes] = []

    async def authorize(digest: bytes, hash_oid: str) -> str:
        asked.append(digest)
        return "never used"

    bobs_certificate = asn1_x509.Certificate.load(certificate_der(bob))
    with pytest.raises(SamConfigurationError, match="is not for key pair"):
        SamSigner(ssa, alice, "pdf-alice", bobs_certificate, [], authorize)
    assert asked == []
