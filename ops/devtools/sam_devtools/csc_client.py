"""TEST TOOLING: a CSC client that no one here wrote, driven with the dev authorization
server — pyHanko's ``CSCSigner`` signing a PDF through ``sam-csc``, with a service token
and a SAD for exactly the hashes pyHanko is about to have signed, both from the dev AS.

``python -m sam_devtools.csc_client --url URL --ca CA --as-key KEY --sam-id ID --user U
--credential C in.pdf out.pdf`` (the demo's CSC step)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
from pyhanko.sign import signers
from pyhanko.sign.fields import SigSeedSubFilter
from pyhanko.sign.signers.csc_signer import (
    CSCAuthorizationInfo,
    CSCAuthorizationManager,
    CSCServiceSessionInfo,
    CSCSigner,
    fetch_certs_in_csc_credential,
)
from pyhanko.sign.timestamps import TimeStamper

from sam_devtools.authorization_server import DevAuthorizationServer

__all__ = ["DevAsAuthorizationManager", "sign_pdf"]


class DevAsAuthorizationManager(CSCAuthorizationManager):
    """pyHanko's authorization manager, answered by the dev AS: a SAD (the
    credential-scoped token) for exactly the hashes to be signed."""

    def __init__(
        self,
        session_info: CSCServiceSessionInfo,
        info: Any,
        authority: DevAuthorizationServer,
        sam_id: str,
        user: str,
    ) -> None:
        super().__init__(session_info, info)
        self.authority, self.sam_id, self.user = authority, sam_id, user

    async def authorize_signature(self, hash_b64s: list[str]) -> CSCAuthorizationInfo:
        digests = [base64.b64decode(h) for h in hash_b64s]
        sad = self.authority.issue_sad(self.sam_id, self.user, self.csc_session_info.credential_id, digests)
        return CSCAuthorizationInfo(sad=sad)


async def sign_pdf(
    session: aiohttp.ClientSession,
    url: str,
    credential_id: str,
    authority: DevAuthorizationServer,
    gateway_id: str,
    sam_id: str,
    user: str,
    pdf: bytes,
    timestamper: TimeStamper | None = None,
) -> bytes:
    """``pdf`` signed by pyHanko's ``CSCSigner`` through the gateway at ``url``, as
    ``user`` with ``credential_id``: PAdES B-B, or B-T with ``timestamper``."""
    token = authority.issue_service_token(gateway_id, user)
    session_info = CSCServiceSessionInfo(url, credential_id, oauth_token=token, api_ver="v2")
    info = await fetch_certs_in_csc_credential(session, session_info)
    manager = DevAsAuthorizationManager(session_info, info, authority, sam_id, user)
    signer = CSCSigner(session, manager)
    writer = IncrementalPdfFileWriter(io.BytesIO(pdf))
    meta = signers.PdfSignatureMetadata(field_name="Signature1", subfilter=SigSeedSubFilter.PADES)
    pdf_signer = signers.PdfSigner(meta, signer, timestamper=timestamper)
    return bytes((await pdf_signer.async_sign_pdf(writer)).getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sam_devtools.csc_client", description=__doc__)
    parser.add_argument("--url", required=True, help="the gateway's base URL (before /csc/v2)")
    parser.add_argument("--ca", type=Path, required=True, help="the CA of the gateway's TLS certificate")
    parser.add_argument("--as-id", default="dev-as")
    parser.add_argument("--as-key", type=Path, required=True, help="the dev AS's JWS key (PEM)")
    parser.add_argument("--gateway-id", required=True)
    parser.add_argument("--sam-id", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--credential", required=True)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    authority = DevAuthorizationServer(args.as_id, args.as_key.read_bytes())

    async def run() -> None:
        context = ssl.create_default_context(cafile=str(args.ca))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            signed = await sign_pdf(
                session,
                args.url,
                args.credential,
                authority,
                args.gateway_id,
                args.sam_id,
                args.user,
                args.source.read_bytes(),
            )
        args.target.write_bytes(signed)

    asyncio.run(run())


if __name__ == "__main__":
    main()
