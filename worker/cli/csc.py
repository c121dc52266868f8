"""``sam-csc``: the CSC API v2 gateway (``serve``) and its operator's tools —
enrolment of a signer's credential through the SAM (``enrol``, then ``finish`` once
the CA has answered) and a look at the store (``credentials``).

Enrolment uses any CA: ``enrol`` writes the certification request (DER PKCS#10, its
proof of possession made by the SAM) to ``--request-out``; the CA's certificate and
chain go to ``finish``. The SAM profile is the gateway's own (``sam_profile`` of its
settings), so the key pairs belong to the gateway's SSA account.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from worker.client import SamClient, SamClientError
from worker.csc import enrolment
from worker.csc.server import serve
from worker.csc.settings import CscSettings, load_csc_settings
from worker.csc.store import CredentialState, CredentialStoreError, SqliteCredentialStore

__all__ = ["main"]


def _certificates(path: Path) -> list[bytes]:
    """DER certificates from a PEM file (any number) or a DER file (one)."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(data)]
    return [x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)]


async def _enrol(settings: CscSettings, args: argparse.Namespace) -> int:
    store = SqliteCredentialStore(settings.store_file)
    await asyncio.to_thread(store.migrate)
    skad = args.skad.read_text().strip() if args.skad else None
    async with SamClient.from_profile(settings.sam_profile, timeout=settings.sam_timeout_seconds) as sam:
        credential = await enrolment.begin(
            sam,
            store,
            issuer=args.issuer,
            subject=args.user,
            signer=args.signer or args.user,
            distinguished_name=args.dn,
            algorithm=args.algorithm,
            size=args.size,
            named_curve=args.curve,
            skad=skad,
            description=args.description,
        )
    assert credential.request is not None
    args.request_out.write_bytes(credential.request)
    print(credential.credential_id)
    print(
        f"certification request written to {args.request_out}; once certified: "
        f"sam-csc finish {credential.credential_id} CERTIFICATE [CHAIN]",
        file=sys.stderr,
    )
    return 0


async def _finish(settings: CscSettings, args: argparse.Namespace) -> int:
    store = SqliteCredentialStore(settings.store_file)
    await asyncio.to_thread(store.migrate)
    credential = await store.find(args.credential)
    if credential is None or credential.state is not CredentialState.awaiting_certificate:
        print(f"sam-csc: no enrolment of {args.credential} awaits a certificate", file=sys.stderr)
        return 2
    [certificate] = _certificates(args.certificate)[:1]
    chain = _certificates(args.chain) if args.chain else []
    async with SamClient.from_profile(settings.sam_profile, timeout=settings.sam_timeout_seconds) as sam:
        await enrolment.finish(sam, store, credential, certificate, chain)
    print(f"{args.credential} enabled", file=sys.stderr)
    return 0


async def _credentials(settings: CscSettings, args: argparse.Namespace) -> int:
    store = SqliteCredentialStore(settings.store_file)
    await asyncio.to_thread(store.migrate)
    for credential in await store.of_user(args.issuer, args.user):
        key = credential.named_curve or f"RSA-{credential.size}"
        print(f"{credential.credential_id}\t{credential.state}\t{key}\tsigner={credential.signer}")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sam-csc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="settings file (TOML); else SAM_CSC_CONFIG_FILE")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gateway until SIGTERM")
    enrol = commands.add_parser("enrol", help="create, assign and prove a key pair; write its request")
    enrol.add_argument("--user", required=True, help="the service-token subject who will own it")
    enrol.add_argument("--issuer", required=True, help="the authorization server that speaks for the user")
    enrol.add_argument("--signer", help="the signer id in the SAM (default: the user)")
    enrol.add_argument("--dn", required=True, help="the certificate subject, RFC 4514 (CN=...,O=...)")
    enrol.add_argument("--algorithm", choices=["ECDSA", "RSA"], default="ECDSA")
    enrol.add_argument("--size", type=int, choices=[2048, 3072, 4096])
    enrol.add_argument("--curve", choices=["secp256r1", "secp384r1", "secp521r1"])
    enrol.add_argument(
        "--skad", type=Path, help="a file with the signer's SKAD, if the SAM's policy wants one"
    )
    enrol.add_argument("--description", help="shown to clients in credentials/info")
    enrol.add_argument("--request-out", type=Path, required=True, help="where the DER PKCS#10 request goes")
    finish = commands.add_parser("finish", help="certify and enable an enrolment with its CA's answer")
    finish.add_argument("credential")
    finish.add_argument("certificate", type=Path, help="the signer's certificate (PEM or DER)")
    finish.add_argument("chain", type=Path, nargs="?", help="intermediates and root (PEM)")
    listing = commands.add_parser("credentials", help="a user's credentials in the store")
    listing.add_argument("--user", required=True)
    listing.add_argument("--issuer", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_csc_settings(args.config)
        if args.command == "serve":
            asyncio.run(serve(settings))
            status = 0
        else:
            run = {"enrol": _enrol, "finish": _finish, "credentials": _credentials}[args.command]
            status = asyncio.run(run(settings, args))
    except (SamClientError, CredentialStoreError, OSError, ValueError) as exc:
        print(f"sam-csc: {exc}", file=sys.stderr)
        status = 1
    sys.exit(status)
