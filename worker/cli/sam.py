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
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel

from worker import __version__
from worker.cli import failures
from worker.client import ClientProfile, SamClient, SamClientError, SamConfigurationError, SamRequestError
from worker.domain.algorithms import CURVES, RSA_SIZES, SIGNATURE_ALGORITHMS
from worker.domain.contract import DynamicConfiguration, KeyPairObject

# what key-create makes when not told: RSA 3072 (ETSI TS 119 312 for new keys beyond
# 2025) and P-256
DEFAULT_RSA_SIZE = 3072
DEFAULT_CURVE = "secp256r1"

if TYPE_CHECKING:
    from worker.integrations.pdf import SamSigner

__all__ = ["ClientProfile", "main"]


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _key_pair(path: Path) -> KeyPairObject:
    """The key pair in the JSON file ``path`` (as a command printed it); pydantic's
    ``ValidationError`` if it is none."""
    return KeyPairObject.model_validate_json(path.read_bytes())


def _emit_model(model: BaseModel) -> None:
    """A model as the SAM sends it: JSON types, no null fields."""
    _emit(model.model_dump(mode="json", exclude_none=True))


def _emit(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


async def _run(args: argparse.Namespace, profile: ClientProfile) -> None:
    async with profile.client() as client:
        if args.command == "config-put":
            document = _load_json(args.file)
            if not isinstance(document, dict):
                raise SamConfigurationError(f"{args.file}: a dynamic configuration is a JSON object")
            if args.bump:
                try:
                    current = (await client.get_configuration()).version
                except SamRequestError as exc:
                    if exc.code != "configuration_missing":
                        raise
                    current = 0
                document["version"] = current + 1
            config = DynamicConfiguration.model_validate(document)
            await client.put_configuration(config, message_id=args.message_id)
            print(f"dynamic configuration version {config.version} accepted", file=sys.stderr)
        elif args.command == "config-get":
            _emit_model(await client.get_configuration())
        elif args.command == "key-create":
            if args.algorithm == "RSA":
                key_pair = await client.create_key_pair(
                    "RSA", size=args.size or DEFAULT_RSA_SIZE, message_id=args.message_id
                )
            else:
                key_pair = await client.create_key_pair(
                    "ECDSA", named_curve=args.curve or DEFAULT_CURVE, message_id=args.message_id
                )
            _emit_model(key_pair)
        elif args.command == "key-assign":
            _emit_model(
                await client.assign_key_pair(
                    _key_pair(args.key_pair),
                    args.signer,
                    args.subject,
                    skad=args.skad_file.read_text().strip() if args.skad_file else None,
                    pin=args.pin,
                    authorization_server=args.authorization_server,
                    message_id=args.message_id,
                )
            )
        elif args.command == "csr":
            request = await client.certification_request(_key_pair(args.key_pair), args.algorithm)
            sys.stdout.write(_pem("CERTIFICATE REQUEST", request))
        elif args.command == "key-update":
            certificate = _der(args.certificate.read_bytes()) if args.certificate else None
            chain = [_der(path.read_bytes()) for path in args.chain]
            key_pair = _key_pair(args.key_pair)
            # certifying enables unless --disable; --enable/--disable alone keeps what is certified
            certified = certificate is not None or bool(key_pair.status and key_pair.status.certified)
            enabled = args.enable if args.enable is not None else True
            _emit_model(
                await client.update_key_pair(
                    key_pair,
                    args.signer,
                    certified=certified,
                    enabled=enabled,
                    certificate=certificate,
                    chain=chain,
                    message_id=args.message_id,
                )
            )
        elif args.command == "key-delete":
            sad = args.sad_file.read_text().strip() if args.sad_file else None
            await client.delete_key_pair(
                _key_pair(args.key_pair), args.signer, sad, message_id=args.message_id
            )
            print("deleted", file=sys.stderr)
        elif args.command == "key-rewrap":
            _emit_model(await client.rewrap_key_pair(_key_pair(args.key_pair), message_id=args.message_id))
        elif args.command == "key-bind":
            _emit_model(
                await client.bind_key_pair(
                    _key_pair(args.key_pair),
                    args.owner,
                    args.authorization_server,
                    message_id=args.message_id,
                )
            )
        elif args.command in ("sign-pdf", "sign-file"):
            from worker.integrations.pdf import sign_detached, sign_pdf

            signer = _document_signer(client, args)
            if args.command == "sign-pdf":
                from pyhanko.pdf_utils.misc import PdfError

                try:
                    document = await sign_pdf(args.input.read_bytes(), signer, reason=args.reason)
                except PdfError as exc:
                    raise SamConfigurationError(
                        f"{args.input} is not a PDF pyHanko can sign: {exc}"
                    ) from None
                args.output.write_bytes(document)
                print(f"wrote {args.output}", file=sys.stderr)
            else:
                output = args.input.with_name(args.input.name + ".p7s")
                output.write_bytes(await sign_detached(args.input, signer))
                print(f"wrote {output}", file=sys.stderr)
        elif args.command == "sign":
            try:
                digests = [base64.b64decode(d, validate=True) for d in args.dtbs]
            except ValueError:
                raise SamConfigurationError(
                    "--dtbs takes standard base64 (A-Z a-z 0-9 + /, padded)"
                ) from None
            digests += [hashlib.sha256(f.read_bytes()).digest() for f in args.file]
            sad = args.sad_file.read_text().strip()
            signatures = await client.sign(
                _key_pair(args.key_pair),
                args.signer,
                args.algorithm,
                digests,
                sad,
                pin=args.pin,
                message_id=args.message_id,
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

    key_pair = _key_pair(args.key_pair)
    if key_pair.id is None:
        raise SamClientError(f"{args.key_pair}: the key pair has no id")
    key_pair_id = key_pair.id

    try:  # the template, checked before any signing starts
        template = shlex.split(args.sad_command)
        for part in template:
            part.format(dtbs="", hash_oid="", key_pair_id="", signer="")
    except (ValueError, KeyError, IndexError) as exc:
        raise SamConfigurationError(
            f"--sad-command: {exc!r} is not one of {{dtbs}}, {{hash_oid}}, {{key_pair_id}}, {{signer}}"
        ) from None

    async def authorize(digest: bytes, hash_oid: str) -> str:
        # the SAD comes from the signer's authorization server; here, from a command
        command = [
            part.format(
                dtbs=base64.b64encode(digest).decode(),
                hash_oid=hash_oid,
                key_pair_id=key_pair_id,
                signer=args.signer,
            )
            for part in template
        ]
        process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        stdout, _ = await process.communicate()
        if process.returncode != 0:
            raise SamClientError(f"the SAD command failed with status {process.returncode}")
        return stdout.decode().strip()

    chain = [_certificate(path) for path in args.chain]
    return SamSigner(client, key_pair, args.signer, _certificate(args.certificate), chain, authorize)


async def _validate_pdf(path: Path, trust_anchor: asn1_x509.Certificate) -> int:
    from pyhanko.pdf_utils.misc import PdfError
    from pyhanko.pdf_utils.reader import PdfFileReader
    from pyhanko.sign.validation import async_validate_pdf_signature
    from pyhanko_certvalidator import ValidationContext

    with path.open("rb") as handle:
        try:
            signatures = PdfFileReader(handle).embedded_signatures
        except PdfError as exc:
            raise SamConfigurationError(f"{path} is not a PDF pyHanko can read: {exc}") from None
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
    key_pair = _key_pair(args.key_pair)
    if key_pair.public_key is None:
        raise SamConfigurationError(f"{args.key_pair}: the key pair has no public_key")
    key = serialization.load_der_public_key(base64.b64decode(key_pair.public_key))
    sys.stdout.write(
        key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    )


_PDF_COMMANDS = ("sign-pdf", "sign-file", "validate-pdf")
_ALGORITHMS_HELP = "; ".join(f"{oid} {name}" for oid, name in SIGNATURE_ALGORITHMS.items())


def _signature_algorithm(value: str) -> str:
    """An OID, or the name of one (``ecdsa-with-SHA256``), as the OID."""
    if value in SIGNATURE_ALGORITHMS:
        return value
    by_name = {name.split(" ", 1)[0].lower(): oid for oid, name in SIGNATURE_ALGORITHMS.items()}
    if value.lower() in by_name:
        return by_name[value.lower()]
    if value.replace(".", "").isdigit():
        return value  # an OID the SAM does not know: its refusal lists what it supports
    raise argparse.ArgumentTypeError(f"not a supported signature algorithm; supported: {_ALGORITHMS_HELP}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam",
        description=__doc__,
        epilog=f"exit status: {failures.EXIT_STATUS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sam {__version__}")
    parser.add_argument(
        "--profile",
        type=Path,
        default=os.environ.get("SAM_PROFILE"),
        help="client profile (JSON); SAM_PROFILE",
    )
    parser.add_argument(
        "--message-id",
        help="repeat an earlier request whose answer was lost (exit 4 names its id): the same "
        "command, arguments and SAD with this id get that request's result, never a second one",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    put = sub.add_parser("config-put", help="set the dynamic configuration (administrators)")
    put.add_argument("file", type=Path)
    put.add_argument("--bump", action="store_true", help="set version to the current one + 1")
    sub.add_parser("config-get", help="print the current dynamic configuration")
    create = sub.add_parser(
        "key-create",
        help="create a key pair",
        description=f"RSA sizes: {', '.join(map(str, RSA_SIZES))} (default {DEFAULT_RSA_SIZE}); "
        f"ECDSA curves: {', '.join(CURVES)} (default {DEFAULT_CURVE})",
    )
    create.add_argument("--algorithm", choices=["RSA", "ECDSA"], required=True)
    create.add_argument(
        "--size", type=int, choices=RSA_SIZES, help=f"RSA modulus bits (default {DEFAULT_RSA_SIZE})"
    )
    create.add_argument("--curve", choices=list(CURVES), help=f"ECDSA named curve (default {DEFAULT_CURVE})")
    assign = sub.add_parser("key-assign", help="assign a key pair to a signer")
    assign.add_argument("key_pair", type=Path)
    assign.add_argument("--signer", required=True)
    assign.add_argument(
        "--subject", required=True, help="the signer's RFC 4514 name, e.g. CN=Alice,O=Example"
    )
    assign.add_argument(
        "--authorization-server", help="the AS that speaks for the signer (needed if the SSA may use several)"
    )
    assign.add_argument(
        "--skad-file",
        "--skad",
        type=Path,
        help="a file holding the signer's consent (SKAD) from their AS, where the SAM's policy asks for one",
    )
    assign.add_argument(
        "--pin", help="enrol a SAM-managed PIN (4-64 characters) the signer gives with each signature"
    )
    bind = sub.add_parser(
        "key-bind", help="(administrator) bind a key pair to an SSA: one sealed before owners, or moved"
    )
    bind.add_argument("key_pair", type=Path)
    bind.add_argument("--owner", required=True, help="the registered SSA it belongs to from now on")
    bind.add_argument("--authorization-server", help="for an assigned key pair sealed without one")
    sign = sub.add_parser(
        "sign", help="sign DTBS/R with a SAD", description=f"algorithms: {_ALGORITHMS_HELP}"
    )
    sign.add_argument("key_pair", type=Path)
    sign.add_argument("--signer", required=True)
    sign.add_argument(
        "--algorithm", type=_signature_algorithm, required=True, help="signature algorithm: OID or name"
    )
    sign.add_argument("--dtbs", action="append", default=[], help="base64 DTBS/R (repeatable)")
    sign.add_argument(
        "--file", type=Path, action="append", default=[], help="a document to hash with SHA-256"
    )
    sign.add_argument("--sad-file", type=Path, required=True)
    sign.add_argument("--pin", help="the SAM-managed factor, if the key pair has one")
    csr = sub.add_parser(
        "csr",
        help="a PKCS#10 request (PEM) signed by the SAM as proof of possession",
        description=f"algorithms: {_ALGORITHMS_HELP}",
    )
    csr.add_argument("key_pair", type=Path)
    csr.add_argument(
        "--algorithm", type=_signature_algorithm, required=True, help="signature algorithm: OID or name"
    )
    update = sub.add_parser(
        "key-update",
        help="record the certificate (which enables the key pair) or enable or disable it",
        description="With --certificate alone the key pair is certified and enabled; --disable "
        "records it disabled; --enable or --disable alone changes only that.",
    )
    update.add_argument("key_pair", type=Path)
    update.add_argument("--signer", required=True)
    update.add_argument("--certificate", type=Path, help="PEM or DER certificate (needed to certify)")
    update.add_argument(
        "--chain", type=Path, action="append", default=[], help="intermediate CA certificates (repeatable)"
    )
    enable = update.add_mutually_exclusive_group()
    enable.add_argument("--enable", action="store_true", dest="enable", default=None)
    enable.add_argument("--disable", action="store_false", dest="enable")
    delete = sub.add_parser("key-delete", help="delete a key pair for good")
    delete.add_argument("key_pair", type=Path)
    delete.add_argument("--signer")
    delete.add_argument("--sad-file", type=Path, help="the signer's deletion SAD, if the signer asked")
    rewrap = sub.add_parser("key-rewrap", help="re-wrap a key pair under the current KEK")
    rewrap.add_argument("key_pair", type=Path)
    for name, description in (
        ("sign-pdf", "sign a PDF (PAdES baseline) through the SAM (the pdf extra)"),
        (
            "sign-file",
            "write FILE.p7s, a detached CMS signature of FILE made through the SAM (the pdf extra)",
        ),
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
    validate = sub.add_parser(
        "validate-pdf", help="validate a signed PDF with pyHanko (offline; the pdf extra)"
    )
    validate.add_argument("pdf", type=Path)
    validate.add_argument("--ca", type=Path, required=True, help="the trust anchor (PEM or DER)")
    return parser


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command in _PDF_COMMANDS and importlib.util.find_spec("pyhanko") is None:
        raise SamConfigurationError(
            f"{args.command} needs pyHanko, which comes with the pdf extra: pip install 'sam-worker[pdf]'"
        )
    if args.command == "public-key":
        _public_key(args)
        return 0
    if args.command == "validate-pdf":
        return asyncio.run(_validate_pdf(args.pdf, _certificate(args.ca)))
    if args.command == "key-update" and args.certificate is None and args.enable is None:
        parser.error("key-update: nothing to record: give --certificate, --enable or --disable")
    if args.command == "sign" and not (args.dtbs or args.file):
        parser.error("sign: give the DTBS/R to sign: --dtbs or --file")
    if args.profile is None:
        parser.error("--profile (or SAM_PROFILE) is required")
    asyncio.run(_run(args, ClientProfile.read(args.profile)))
    return 0


def main(argv: list[str] | None = None) -> None:
    """``sam``: the exit status says the class of a failure (``worker.cli.failures``), and
    one line on standard error its cause."""
    parser = _parser()
    args = parser.parse_args(argv)
    failures.run("sam", lambda: _command(args, parser))


if __name__ == "__main__":
    main()
