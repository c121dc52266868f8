"""``sam-admin``: provision the SAM's HSM keys and verify audit trails."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker import __version__
from worker.cli import failures
from worker.domain.audit import verify_entries
from worker.hsm.pkcs11_hsm import open_session
from worker.hsm.provisioning import create_kek, provision_sam_keys, token_has, token_public_key_pem
from worker.schemas import write
from worker.settings import Infrastructure, KeyInfo, load_infrastructure, read_secret

__all__ = ["main"]


def _create(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        print(
            f"{args.out} exists; the SAM keys were created already (use --force for new ones)",
            file=sys.stderr,
        )
        return 1
    session = open_session(args.pkcs11_module, args.token_label, read_secret(args.pin_file))
    try:
        suffix = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        keys = provision_sam_keys(session, suffix)
    finally:
        session.close()
    infrastructure = Infrastructure(
        node=args.node,
        token_label=args.token_label,
        kek_label=keys.kek_label,
        state_key=KeyInfo(label=keys.state_key_label, public_key=keys.state_public_key_pem),
        audit_key=KeyInfo(label=keys.audit_key_label, public_key=keys.audit_public_key_pem),
        factor_key_label=keys.factor_key_label,
        created=datetime.datetime.now(datetime.UTC).isoformat(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(infrastructure.model_dump_json(indent=2) + "\n")
    print(f"created {keys.kek_label}, {keys.state_key_label}, {keys.audit_key_label}; wrote {args.out}")
    return 0


def _initialize(args: argparse.Namespace) -> int:
    """Set up this node from another node's private configuration; the token must
    already hold the same keys (restored the way the HSM replicates keys: an nShield
    Security World, a network HSM partition, or for SoftHSM a copy of the token)."""
    source = load_infrastructure(args.source)
    session = open_session(args.pkcs11_module, args.token_label, read_secret(args.pin_file))
    try:
        labels = [
            source.kek_label,
            *source.previous_kek_labels,
            source.state_key.label,
            source.audit_key.label,
        ]
        if source.factor_key_label:
            labels.append(source.factor_key_label)
        missing = [label for label in labels if not token_has(session, label)]
        if missing:
            print(
                f"sam-admin: the token lacks {', '.join(missing)}: restore the SAM keys first",
                file=sys.stderr,
            )
            return 1
        for key in (source.state_key, source.audit_key):
            if token_public_key_pem(session, key.label) != key.public_key:
                print(
                    f"sam-admin: {key.label} in this token is another key than in {args.source}",
                    file=sys.stderr,
                )
                return 1
    finally:
        session.close()
    node = source.model_copy(update={"node": args.node, "token_label": args.token_label})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(node.model_dump_json(indent=2) + "\n")
    print(f"node {args.node} initialized from {args.source}; wrote {args.out}")
    return 0


def _rotate_kek(args: argparse.Namespace) -> int:
    infrastructure = load_infrastructure(args.infrastructure)
    label = "sam-kek-" + datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
    session = open_session(args.pkcs11_module, infrastructure.token_label, read_secret(args.pin_file))
    try:
        create_kek(session, label)
    finally:
        session.close()
    rotated = infrastructure.model_copy(
        update={
            "kek_label": label,
            "previous_kek_labels": [*infrastructure.previous_kek_labels, infrastructure.kek_label],
        }
    )
    args.infrastructure.write_text(rotated.model_dump_json(indent=2) + "\n")
    print(
        f"new current KEK {label} (previous: {infrastructure.kek_label}); copy the KEK to every node's HSM, "
        "restart the workers, then re-wrap key pairs with key_pairs.rewrap"
    )
    return 0


def _lines(path: Path, unreadable: list[str]) -> Iterator[tuple[str, int, bytes]]:
    """The lines of an audit file (``.gz`` too); a file that cannot be read to its end (a
    truncated or corrupt ``.gz``: a rotation cut short) yields what it has, and is named
    in ``unreadable``."""
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                yield str(path), number, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        unreadable.append(f"{path}: unreadable after line {number} ({type(exc).__name__}: {exc})")


def _audit_key(args: argparse.Namespace) -> ec.EllipticCurvePublicKey:
    if args.key is not None:
        pem = args.key.read_bytes()
    elif args.infrastructure is not None:
        pem = load_infrastructure(args.infrastructure).audit_key.public_key.encode()
    else:
        raise ValueError("give --key (from `audit export-key`) or --infrastructure")
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the audit key is an EC P-256 public key")
    return key


def _audit_verify(args: argparse.Namespace) -> int:
    key = _audit_key(args)

    unreadable: list[str] = []

    def every_line() -> Iterator[tuple[str, int, bytes]]:
        for path in args.files:
            yield from _lines(path, unreadable)

    report = verify_entries(every_line(), key, transport_copies=args.transport_copies)
    for problem in [*unreadable, *report.problems]:
        print(f"BAD {problem}")
    for chain, summary in sorted(report.chains.items()):
        print(
            f"chain {chain}: seq {summary.first}..{summary.last}, {summary.records} records, "
            f"{summary.checkpoints} checkpoints, signed through seq {summary.signed_through}"
            + ("" if summary.first == 1 else f" (starts at seq {summary.first}: older files not given)")
        )
    # Records a stopping worker could not chain wait beside its logs (outside the glob),
    # unsigned, until its next start chains them: named here so the trail's last word on
    # those requests is not missed.
    for side in sorted({side for path in args.files for side in path.parent.glob("*.unwritten-*")}):
        with side.open("rb") as handle:
            waiting = sum(1 for line in handle if line.strip())
        print(
            f"pending {side}: {waiting} records of withheld replies, not chained yet "
            "(unsigned; the worker's next start chains them)"
        )
    redelivered = f", {report.redelivered} lines delivered twice" if report.redelivered else ""
    print(f"{report.entries} entries, {len(report.problems) + len(unreadable)} problems{redelivered}")
    return 0 if report.ok and not unreadable else 1


def _audit_export_key(args: argparse.Namespace) -> int:
    sys.stdout.write(load_infrastructure(args.infrastructure).audit_key.public_key)
    return 0


def _audit_tail(args: argparse.Namespace) -> int:
    from worker.cli.audit_tail import tail
    from worker.cli.sam import ClientProfile

    profile = ClientProfile.model_validate_json(args.profile.read_text())
    return asyncio.run(tail(profile, args.queue, _audit_key(args), args.count, args.idle_timeout))


def _archive_offset(value: str) -> str | int | datetime.datetime:
    """``first``/``last``/``next``, a stream offset, or an ISO 8601 time."""
    if value in ("first", "last", "next"):
        return value
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError("first, last, next, an offset or an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _audit_archive(args: argparse.Namespace) -> int:
    from worker.cli.audit_tail import read_archive
    from worker.cli.sam import ClientProfile

    profile = ClientProfile.model_validate_json(args.profile.read_text())
    return asyncio.run(read_archive(profile, args.since, _audit_key(args), args.idle_timeout, args.count))


def _schemas(args: argparse.Namespace) -> int:
    for name in write(args.out):
        print(args.out / name)
    return 0


def main(argv: list[str] | None = None) -> None:
    """``sam-admin``: exits 0 on success, 1 when a command fails or is refused (a
    ``SamError``'s code is printed), 2 on bad input, 3 when the broker cannot be reached
    (``worker.cli.failures``)."""
    parser = argparse.ArgumentParser(prog="sam-admin", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sam-admin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create the KEK, state key and audit key in the token")
    create.add_argument("--pkcs11-module", default="/usr/lib/softhsm/libsofthsm2.so")
    create.add_argument("--token-label", default="sam")
    create.add_argument("--pin-file", type=Path, required=True, help="file with the token user PIN")
    create.add_argument("--node", required=True, help="name of this SAM node in audit records")
    create.add_argument("--out", type=Path, required=True, help="where to write sam_infrastructure.json")
    create.add_argument("--force", action="store_true")
    create.set_defaults(run=_create)
    initialize = sub.add_parser(
        "initialize", help="set up this node from another node's private configuration"
    )
    initialize.add_argument("--from", dest="source", type=Path, required=True, help="the first node's file")
    initialize.add_argument("--pkcs11-module", default="/usr/lib/softhsm/libsofthsm2.so")
    initialize.add_argument("--token-label", default="sam")
    initialize.add_argument("--pin-file", type=Path, required=True)
    initialize.add_argument("--node", required=True)
    initialize.add_argument("--out", type=Path, required=True)
    initialize.set_defaults(run=_initialize)
    rotate = sub.add_parser("rotate-kek", help="make a new KEK the current one; older ones keep unwrapping")
    rotate.add_argument("--infrastructure", type=Path, required=True)
    rotate.add_argument("--pkcs11-module", default="/usr/lib/softhsm/libsofthsm2.so")
    rotate.add_argument("--pin-file", type=Path, required=True)
    rotate.set_defaults(run=_rotate_kek)
    audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="verify chains and checkpoint signatures of audit files (rotated, .gz, any order)"
    )
    verify.add_argument("--infrastructure", type=Path, help="sam_infrastructure.json (for the audit key)")
    verify.add_argument("--key", type=Path, help="the audit public key (PEM) from `audit export-key`")
    verify.add_argument(
        "--transport-copies",
        action="store_true",
        help="files received over an at-least-once transport (rsyslog): a line delivered twice, "
        "byte for byte, is counted, not reported",
    )
    verify.add_argument("files", type=Path, nargs="+")
    verify.set_defaults(run=_audit_verify)
    export = audit_sub.add_parser("export-key", help="print the audit public key an auditor needs (PEM)")
    export.add_argument("--infrastructure", type=Path, required=True)
    export.set_defaults(run=_audit_export_key)
    tail = audit_sub.add_parser(
        "tail", help="follow sam.audit as a SIEM: verify and print entries (JSON lines)"
    )
    tail.add_argument("--profile", type=Path, required=True, help="client profile of the SIEM user")
    tail.add_argument(
        "--queue", help="the SIEM's queue on sam.audit, declared by the operator (default <user>.audit)"
    )
    tail.add_argument("--infrastructure", type=Path)
    tail.add_argument("--key", type=Path)
    tail.add_argument("--count", type=int, help="stop after this many entries")
    tail.add_argument("--idle-timeout", type=float, help="stop after this many seconds without an entry")
    tail.set_defaults(run=_audit_tail)
    archive = audit_sub.add_parser(
        "archive",
        help="read sam.audit.archive (every committed batch) from an offset or a time, then verify it",
    )
    archive.add_argument("--profile", type=Path, required=True, help="client profile of the SIEM user")
    archive.add_argument(
        "--since",
        type=_archive_offset,
        default="first",
        help="first (default), last, next, an offset or an ISO time",
    )
    archive.add_argument("--infrastructure", type=Path)
    archive.add_argument("--key", type=Path)
    archive.add_argument("--count", type=int, help="stop after this many entries")
    archive.add_argument(
        "--idle-timeout",
        type=float,
        default=3.0,
        help="stop after this many seconds without a batch (default 3)",
    )
    archive.set_defaults(run=_audit_archive)
    schemas = sub.add_parser("schemas", help="write the JSON Schemas and error catalogue")
    schemas.add_argument("--out", type=Path, default=Path("schemas"))
    schemas.set_defaults(run=_schemas)
    args = parser.parse_args(argv)
    failures.run("sam-admin", lambda: args.run(args))


if __name__ == "__main__":
    main()
