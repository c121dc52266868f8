"""``sam``: the SSA / administrator command line over the SDK.

Identity comes from a client profile (``--profile FILE`` or ``SAM_PROFILE``), a JSON
file naming the broker URL, the CA, the client certificate and key, the user id and
the JWS key that signs requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict

from worker.client import SamClient, SamClientError, SamRequestError
from worker.settings import TlsFiles

if TYPE_CHECKING:
    from worker.integrations.pdf import SamSigner

__all__ = ["ClientProfile", "main"]


class ClientProfile(BaseModel):
    """Who a ``sam`` user is: broker URL, TLS files, user id and the JWS key requests are
    signed with; a profile without one (a SIEM's) cannot send requests (``ValueError``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    user_id: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    jws_key_file: Path | None = None  # SIEM profiles sign nothing

    def client(self) -> SamClient:
        if self.jws_key_file is None:
            raise ValueError(f"profile of {self.user_id} has no jws_key_file: it cannot send requests")
        tls = TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)
        return SamClient(self.url, tls, self.user_id, self.jws_key_file.read_bytes())


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _emit(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


async def _run(args: argparse.Namespace, profile: ClientProfile) -> None:
    async with profile.client() as client:
        if args.command == "config-put":
            config = _load_json(args.file)
            if args.bump:
                try:
                    current = (await client.get_configuration())["version"]
                except SamRequestError as exc:
                    if exc.code != "configuration_missing":
                        raise
                    current = 0
                config["version"] = current + 1
            await client.put_configuration(config)
            print(f"dynamic configuration version {config['version']} accepted", file=sys.stderr)
        elif args.command == "config-get":
            _emit(await client.get_configuration())
        elif args.command == "key-create":
            _emit(await client.create_key_pair(args.algorithm, size=args.size, named_curve=args.curve))
        elif args.command == "key-assign":
            _emit(
                await client.assign_key_pair(
                    _load_json(args.key_pair),
                    args.signer,
                    args.subject,
                    authorization_server=args.authorization_server,
                )
            )
        elif args.command == "csr":
            request = await client.certification_request(_load_json(args.key_pair), args.algorithm)
            sys.stdout.write(_pem("CERTIFICATE REQUEST", request))
        elif args.command == "key-update":
            certificate = _der(args.certificate.read_bytes()) if args.certificate else None
            key_pair = _load_json(args.key_pair)
            _emit(
                await client.update_key_pair(
                    key_pair, args.signer, enabled=args.enable, certificate=certificate
                )
            )
        elif args.command == "key-delete":
            sad = args.sad_file.read_text().strip() if args.sad_file else None
            await client.delete_key_pair(_load_json(args.key_pair), args.signer, sad)
            print("deleted", file=sys.stderr)
        elif args.command == "key-rewrap":
            _emit(await client.rewrap_key_pair(_load_json(args.key_pair)))
        elif args.command == "key-bind":
            _emit(
                await client.bind_key_pair(_load_json(args.key_pair), args.owner, args.authorization_server)
            )
        elif args.command in ("sign-pdf", "sign-file"):
            from worker.integrations.pdf import sign_detached, sign_pdf

            signer = _document_signer(client, args)
            if args.command == "sign-pdf":
                document = await sign_pdf(args.input.read_bytes(), signer, reason=args.reason)
                args.output.write_bytes(document)
                print(f"wrote {args.output}", file=sys.stderr)
            else:
                output = args.input.with_name(args.input.name + ".p7s")
                output.write_bytes(await sign_detached(args.input, signer))
                print(f"wrote {output}", file=sys.stderr)
        elif args.command == "sign":
            digests = [base64.b64decode(d) for d in args.dtbs]
            digests += [hashlib.sha256(f.read_bytes()).digest() for f in args.file]
            sad = args.sad_file.read_text().strip()
            signatures = await client.sign(
                _load_json(args.key_pair), args.signer, args.algorithm, digests, sad, pin=args.pin
            )
            _emit(
                {
                    "signature_algorithm": args.algorithm,
                    "signatures": [
                        {"dtbs": base64.b64encode(d).decode(), "signature": base64.b64encode(s).decode()}
                        for d, s in zip(digests, signatures, strict=True)
                    ],
                }
            )


def _pem(label: str, der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----", ""])


def _der(data: bytes) -> bytes:
    """DER as is, or the body of a PEM block."""
    if data.lstrip().startswith(b"-----BEGIN"):
        body = b"".join(line for line in data.splitlines() if line and not line.startswith(b"-----"))
        return base64.b64decode(body)
    return data


def _certificate(path: Path) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(_der(path.read_bytes()))


def _document_signer(client: SamClient, args: argparse.Namespace) -> SamSigner:
    from worker.integrations.pdf import SamSigner

    key_pair = _load_json(args.key_pair)

    async def authorize(digest: bytes, hash_oid: str) -> str:
        # the SAD comes from the signer's authorization server; here, from a command
        command = [
            part.format(
                dtbs=base64.b64encode(digest).decode(),
                hash_oid=hash_oid,
                key_pair_id=key_pair["id"],
                signer=args.signer,
            )
            for part in shlex.split(args.sad_command)
        ]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await process.communicate()
        if process.returncode != 0:
            raise SamClientError(f"the SAD command failed with status {process.returncode}")
        return stdout.decode().strip()

    chain = [_certificate(path) for path in args.chain]
    return SamSigner(client, key_pair, args.signer, _certificate(args.certificate), chain, authorize)


async def _validate_pdf(path: Path, trust_anchor: asn1_x509.Certificate) -> int:
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import async_validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    with path.open("rb") as handle:
        signatures = PdfFileReader(handle).embedded_signatures
        if not signatures:
            print(f"{path}: no signature", file=sys.stderr)
            return 1
        failed = 0
        for signature in signatures:
            context = ValidationContext(trust_roots=[trust_anchor], allow_fetching=False)
            status = await async_validate_pdf_signature(signature, context)
            print(f"{path}: {signature.field_name}: {status.summary()}")
            failed += not (status.intact and status.valid and status.trusted)
    return 1 if failed else 0


def _public_key(args: argparse.Namespace) -> None:
    der = base64.b64decode(_load_json(args.key_pair)["public_key"])
    key = serialization.load_der_public_key(der)
    sys.stdout.write(
        key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    )


def main(argv: list[str] | None = None) -> None:
    """``sam``: exits 1 when the SAM refuses (its status and code are printed) or the SDK fails."""
    parser = argparse.ArgumentParser(prog="sam", description=__doc__)
    parser.add_argument("--profile", type=Path, default=os.environ.get("SAM_PROFILE"))
    sub = parser.add_subparsers(dest="command", required=True)
    put = sub.add_parser("config-put", help="set the dynamic configuration (administrators)")
    put.add_argument("file", type=Path)
    put.add_argument("--bump", action="store_true", help="set version to the current one + 1")
    sub.add_parser("config-get", help="print the current dynamic configuration")
    create = sub.add_parser("key-create", help="create a key pair")
    create.add_argument("--algorithm", choices=["RSA", "ECDSA"], required=True)
    create.add_argument("--size", type=int)
    create.add_argument("--curve")
    assign = sub.add_parser("key-assign", help="assign a key pair to a signer")
    assign.add_argument("key_pair", type=Path)
    assign.add_argument("--signer", required=True)
    assign.add_argument("--subject", required=True)
    assign.add_argument(
        "--authorization-server", help="the AS that speaks for the signer (needed if the SSA may use several)"
    )
    bind = sub.add_parser(
        "key-bind", help="(administrator) bind a key pair to an SSA: one sealed before owners, or moved"
    )
    bind.add_argument("key_pair", type=Path)
    bind.add_argument("--owner", required=True, help="the registered SSA it belongs to from now on")
    bind.add_argument("--authorization-server", help="for an assigned key pair sealed without one")
    sign = sub.add_parser("sign", help="sign DTBS/R with a SAD")
    sign.add_argument("key_pair", type=Path)
    sign.add_argument("--signer", required=True)
    sign.add_argument("--algorithm", required=True, help="signature algorithm OID")
    sign.add_argument("--dtbs", action="append", default=[], help="base64 DTBS/R (repeatable)")
    sign.add_argument(
        "--file", type=Path, action="append", default=[], help="a document to hash with SHA-256"
    )
    sign.add_argument("--sad-file", type=Path, required=True)
    sign.add_argument("--pin", help="the SAM-managed factor, if the key pair has one")
    csr = sub.add_parser("csr", help="a PKCS#10 request (PEM) signed by the SAM as proof of possession")
    csr.add_argument("key_pair", type=Path)
    csr.add_argument("--algorithm", required=True, help="signature algorithm OID")
    update = sub.add_parser("key-update", help="record the certificate and enable or disable a key pair")
    update.add_argument("key_pair", type=Path)
    update.add_argument("--signer", required=True)
    update.add_argument("--certificate", type=Path, help="PEM or DER certificate (needed to certify)")
    enable = update.add_mutually_exclusive_group(required=True)
    enable.add_argument("--enable", action="store_true", dest="enable")
    enable.add_argument("--disable", action="store_false", dest="enable")
    delete = sub.add_parser("key-delete", help="delete a key pair for good")
    delete.add_argument("key_pair", type=Path)
    delete.add_argument("--signer")
    delete.add_argument("--sad-file", type=Path, help="the signer's deletion SAD, if the signer asked")
    rewrap = sub.add_parser("key-rewrap", help="re-wrap a key pair under the current KEK")
    rewrap.add_argument("key_pair", type=Path)
    for name, description in (
        ("sign-pdf", "sign a PDF (PAdES baseline) through the SAM"),
        ("sign-file", "write FILE.p7s, a detached CMS signature of FILE made through the SAM"),
    ):
        document = sub.add_parser(name, help=description)
        document.add_argument("input", type=Path)
        if name == "sign-pdf":
            document.add_argument("output", type=Path)
            document.add_argument("--reason")
        document.add_argument("--key-pair", type=Path, required=True, help="the certified key pair (JSON)")
        document.add_argument("--signer", required=True)
        document.add_argument("--certificate", type=Path, required=True, help="the key pair's certificate")
        document.add_argument(
            "--chain", type=Path, action="append", default=[], help="CA certificates to embed"
        )
        document.add_argument(
            "--sad-command",
            required=True,
            help="command printing a SAD; {dtbs}, {hash_oid}, {key_pair_id} and {signer} are filled in",
        )
    public = sub.add_parser("public-key", help="print a key pair's public key as PEM (offline)")
    public.add_argument("key_pair", type=Path)
    validate = sub.add_parser("validate-pdf", help="validate a signed PDF with pyHanko (offline)")
    validate.add_argument("pdf", type=Path)
    validate.add_argument("--ca", type=Path, required=True, help="the trust anchor (PEM or DER)")
    args = parser.parse_args(argv)
    if args.command == "public-key":
        _public_key(args)
        return
    if args.command == "validate-pdf":
        sys.exit(asyncio.run(_validate_pdf(args.pdf, _certificate(args.ca))))
    if args.profile is None:
        parser.error("--profile (or SAM_PROFILE) is required")
    profile = ClientProfile.model_validate(_load_json(args.profile))
    try:
        asyncio.run(_run(args, profile))
    except SamRequestError as exc:
        print(f"sam: refused: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
        sys.exit(1)
    except SamClientError as exc:
        print(f"sam: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
