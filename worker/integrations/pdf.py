"""PAdES and detached CMS signatures whose raw signature comes from the SAM.

``SamSigner`` is a pyHanko ``Signer``: pyHanko builds the CMS (signed attributes, the
certificate chain), hashes the signed attributes, and asks ``async_sign_raw`` for the
signature; that call obtains a SAD for exactly that hash from the caller's
authorization source and has the SAM sign it. No private key ever leaves the HSM.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Awaitable, Callable
from pathlib import Path

from asn1crypto import algos, keys
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import signers
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko_certvalidator.registry import SimpleCertificateStore

from worker.client import SamClient, SamConfigurationError
from worker.domain.contract import KeyPairObject

__all__ = ["Authorize", "SamSigner", "blank_pdf", "sign_detached", "sign_pdf"]

# (SAD request: the DTBS/R and the hash algorithm OID) -> the SAD (a compact JWT)
Authorize = Callable[[bytes, str], Awaitable[str]]

_HASH_OIDS = {
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
_SIGNATURE_OIDS = {
    ("ec", "sha256"): "1.2.840.10045.4.3.2",
    ("ec", "sha384"): "1.2.840.10045.4.3.3",
    ("ec", "sha512"): "1.2.840.10045.4.3.4",
    ("rsa", "sha256"): "1.2.840.113549.1.1.11",
    ("rsa", "sha384"): "1.2.840.113549.1.1.12",
    ("rsa", "sha512"): "1.2.840.113549.1.1.13",
}


class SamSigner(signers.Signer):
    """A pyHanko signer whose raw signatures are made by the SAM with ``key_pair`` (the
    certified copy the SAM returned) for ``signer``."""

    def __init__(
        self,
        client: SamClient,
        key_pair: KeyPairObject,
        signer: str,
        certificate: asn1_x509.Certificate,
        chain: list[asn1_x509.Certificate],
        authorize: Authorize,
        digest_algorithm: str = "sha256",
    ) -> None:
        # a certificate for another key would make a document that names its subject but
        # carries this key pair's signature (and spend the signer's SAD on it)
        if key_pair.public_key is None or certificate.public_key.dump() != base64.b64decode(
            key_pair.public_key
        ):
            raise SamConfigurationError(
                f"the certificate (subject {certificate.subject.human_friendly}) is not for key pair "
                f"{key_pair.id}: its public key is another"
            )
        self._kind = "rsa" if certificate.public_key.algorithm == "rsa" else "ec"
        mechanism = algos.SignedDigestAlgorithm(
            {"algorithm": f"{digest_algorithm}_{'rsa' if self._kind == 'rsa' else 'ecdsa'}"}
        )
        super().__init__(
            signing_cert=certificate,
            cert_registry=SimpleCertificateStore.from_certs([certificate, *chain]),  # type: ignore[no-untyped-call]
            signature_mechanism=mechanism,
        )
        self._client = client
        self._key_pair = key_pair
        self._signer = signer
        self._authorize = authorize
        self._public_key: keys.PublicKeyInfo = certificate.public_key

    def _placeholder_size(self) -> int:
        if self._kind == "rsa":
            return int(self._public_key.bit_size) // 8
        field = (int(self._public_key.bit_size) + 7) // 8
        return 2 * (field + 3) + 2  # a DER ECDSA-Sig-Value at its longest

    async def async_sign_raw(self, data: bytes, digest_algorithm: str, dry_run: bool = False) -> bytes:
        if dry_run:
            return bytes(self._placeholder_size())
        digest = hashlib.new(digest_algorithm, data).digest()
        sad = await self._authorize(digest, _HASH_OIDS[digest_algorithm])
        oid = _SIGNATURE_OIDS[(self._kind, digest_algorithm)]
        [signature] = await self._client.sign(self._key_pair, self._signer, oid, [digest], sad)
        return signature


async def sign_pdf(
    pdf: bytes, signer: SamSigner, field_name: str = "Signature1", reason: str | None = None
) -> bytes:
    """A PAdES baseline (B-B) signature over ``pdf``; returns the signed document."""
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf))
    meta = signers.PdfSignatureMetadata(
        field_name=field_name, subfilter=SigSeedSubFilter.PADES, md_algorithm="sha256", reason=reason
    )
    output = await signers.PdfSigner(meta, signer).async_sign_pdf(writer)
    return bytes(output.getvalue())


async def sign_detached(path: Path, signer: SamSigner) -> bytes:
    """A detached CMS SignedData (DER) over the file's bytes."""
    with path.open("rb") as handle:
        content_info = await signer.async_sign_general_data(handle, "sha256", detached=True)
    return bytes(content_info.dump())


def blank_pdf(text: str) -> bytes:
    """A one-page PDF with a line of text (no dependency needed to make a test document)."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 14 Tf 72 760 Td ({escaped}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for offset in offsets:
        out.write(f"{offset:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()
