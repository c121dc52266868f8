"""Audit records: what one is, how records chain and are signed, and how a trail is
verified.

Every request yields one record. Records are hash-chained per (node, instance, log):
each names the hash of the one before. Records are written in batches, and every batch
ends with a **checkpoint** — itself a link of the chain — whose signature by the HSM
audit key covers, through the chain, every record before it. Records carry digests of
what was signed, never secrets.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pydantic import BaseModel, ConfigDict, Field

from worker.domain.algorithms import ecdsa_signature_der
from worker.domain.authorization import b64url
from worker.errors import ErrorCode

__all__ = [
    "GENESIS",
    "AuditCheckpointEntry",
    "AuditEvent",
    "AuditLog",
    "AuditRecordEntry",
    "ChainFollower",
    "ChainHead",
    "ChainProblem",
    "Outcome",
    "VerifyReport",
    "chain_batch",
    "chain_batch_signed_by",
    "entry_hash",
    "is_withheld_reply",
    "verify_entries",
    "withheld_reply",
]

GENESIS = "0" * 64
RECORD, CHECKPOINT = "record", "checkpoint"


class AuditLog(StrEnum):
    """The audit chain a request's record joins: ``admin`` for administrators, ``service``
    for everyone else."""

    service = "service"
    admin = "admin"


class Outcome(StrEnum):
    """``success``: answered with a status below 400; ``failure``: refused or failed."""

    success = "success"
    failure = "failure"


@dataclass(frozen=True)
class AuditEvent:
    """What happened to one request (filled in as far as the request got)."""

    log: AuditLog
    operation: str
    outcome: Outcome
    status: int
    error_code: str | None = None
    actor: str | None = None
    request_id: str | None = None
    signer: str | None = None
    key_pair: str | None = None
    sad_jti: str | None = None
    dtbs_sha256: tuple[str, ...] = ()
    detail: str | None = None

    @property
    def routing_key(self) -> str:
        return f"{self.log}.{self.operation}.{self.outcome}"


def withheld_reply(event: AuditEvent, why: str) -> AuditEvent:
    """The record of a request whose decided reply was withheld because its record could
    not be made durable: what the caller got instead (``503 audit_unavailable``), with
    what had been decided."""
    withheld = ErrorCode.audit_unavailable
    return dataclasses.replace(
        event,
        outcome=Outcome.failure,
        status=withheld.status,
        error_code=withheld.name,
        detail=f"reply withheld: {why} (decided: {event.status} {event.error_code or 'ok'}"
        + (f"; {event.detail})" if event.detail else ")"),
    )


def is_withheld_reply(event: AuditEvent) -> bool:
    """Whether ``event`` is such a record (see ``withheld_reply``)."""
    withheld = ErrorCode.audit_unavailable
    return (event.outcome, event.status, event.error_code) == (
        Outcome.failure,
        withheld.status,
        withheld.name,
    )


def _canonical(entry: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {k: v for k, v in entry.items() if k not in ("hash", "sig")}, option=orjson.OPT_SORT_KEYS
    )


def entry_hash(entry: dict[str, Any]) -> bytes:
    """SHA-256 of an entry's canonical JSON (sorted keys, without ``hash`` and ``sig``): the
    value the next entry's ``prev`` names and a checkpoint's signature covers."""
    return hashlib.sha256(_canonical(entry)).digest()


@dataclass(frozen=True)
class ChainHead:
    """Where a chain stands: the last entry's sequence number and hash."""

    seq: int = 0
    hash: str = GENESIS


def chain_batch(
    node: str,
    instance: str,
    log: AuditLog,
    head: ChainHead,
    events: Sequence[tuple[AuditEvent, int]],
    time_ms: int,
    sign_digest: Callable[[bytes], bytes],
    retracts: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], ChainHead]:
    """Chain ``(event, time_ms)`` pairs after ``head`` and close them with a signed
    checkpoint; return the entries and the new head (pure: nothing advances on failure).

    ``retracts``: hashes of checkpoints of batches that this chain gave up after they may
    have reached the broker's archive (a confirm that came too late or never): the
    signed checkpoint says those entries are not part of the chain, so a copy that holds
    them shows them as retracted, not as a fork."""
    entries, head, digest = _chained(node, instance, log, head, events, time_ms, retracts)
    entries[-1]["sig"] = b64url(sign_digest(digest))
    return entries, head


async def chain_batch_signed_by(
    sign_digest: Callable[[bytes], Awaitable[bytes]],
    node: str,
    instance: str,
    log: AuditLog,
    head: ChainHead,
    events: Sequence[tuple[AuditEvent, int]],
    time_ms: int,
    retracts: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], ChainHead]:
    """``chain_batch`` with a signer that is a coroutine (the HSM lane)."""
    entries, head, digest = _chained(node, instance, log, head, events, time_ms, retracts)
    entries[-1]["sig"] = b64url(await sign_digest(digest))
    return entries, head


def _chained(
    node: str,
    instance: str,
    log: AuditLog,
    head: ChainHead,
    events: Sequence[tuple[AuditEvent, int]],
    time_ms: int,
    retracts: Sequence[str],
) -> tuple[list[dict[str, Any]], ChainHead, bytes]:
    """The entries of a batch and its checkpoint, all but the checkpoint's signature;
    the new head; the digest the signature covers."""
    entries: list[dict[str, Any]] = []
    seq, prev = head.seq, head.hash
    for event, event_time in events:
        seq += 1
        entry: dict[str, Any] = {
            "type": RECORD,
            "seq": seq,
            "time_ms": event_time,
            "node": node,
            "instance": instance,
            "log": str(log),
            "operation": event.operation,
            "outcome": str(event.outcome),
            "status": event.status,
            "error_code": event.error_code,
            "actor": event.actor,
            "request_id": event.request_id,
            "signer": event.signer,
            "key_pair": event.key_pair,
            "sad_jti": event.sad_jti,
            "dtbs_sha256": list(event.dtbs_sha256),
            "detail": event.detail,
            "prev": prev,
        }
        prev = entry["hash"] = entry_hash(entry).hex()
        entries.append(entry)
    checkpoint: dict[str, Any] = {
        "type": CHECKPOINT,
        "seq": seq + 1,
        "time_ms": time_ms,
        "node": node,
        "instance": instance,
        "log": str(log),
        "covers": [head.seq + 1, seq],
        "prev": prev,
    }
    if retracts:
        checkpoint["retracts"] = list(retracts)
    digest = entry_hash(checkpoint)
    checkpoint["hash"] = digest.hex()
    entries.append(checkpoint)
    return entries, ChainHead(checkpoint["seq"], checkpoint["hash"]), digest


# --- verification ----------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """One fault found in an audit trail: the chain, the sequence numbers and the file line
    where it shows, and what is wrong; ``kind`` is a stable keyword (``gap``, ``fork``…)."""

    chain: str
    kind: str  # altered|signature|gap|fork|broken-link|repeated|noncanonical|unsigned-tail|unreadable
    seqs: tuple[int, int] | None
    where: str
    what: str

    def __str__(self) -> str:
        if self.seqs is None:
            span = ""
        elif self.seqs[0] == self.seqs[1]:
            span = f" seq {self.seqs[0]}"
        else:
            span = f" seq {self.seqs[0]}..{self.seqs[1]}"
        return f"{self.kind}: {self.chain}{span} ({self.where}): {self.what}"


@dataclass
class ChainSummary:
    """What verification saw of one chain: its first and last seq, how many records and
    checkpoints, and the last seq a valid checkpoint signature covers."""

    first: int
    last: int
    records: int
    checkpoints: int
    signed_through: int
    retracted: int = 0  # entries of batches a later signed checkpoint retracted


@dataclass
class VerifyReport:
    """The result of ``verify_entries``: entries read, a summary per chain and every
    problem found; ``ok`` only when there is none."""

    entries: int = 0
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    problems: list[ChainProblem] = field(default_factory=list)
    retracted: set[str] = field(default_factory=set)  # where the entries of retracted batches are
    redelivered: int = 0  # lines that were an earlier line of their file again (transport copies)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Seen:
    entry: dict[str, Any]
    where: str
    source: str


def _signature_ok(public_key: ec.EllipticCurvePublicKey, digest: bytes, sig: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        public_key.verify(ecdsa_signature_der(raw), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_entries(
    lines: Iterable[tuple[str, int, bytes]],
    public_key: ec.EllipticCurvePublicKey,
    *,
    transport_copies: bool = False,
) -> VerifyReport:
    """Verify (source, line number, raw line) triples from any number of files, in any
    order: entries are grouped by chain and put in sequence order, then every hash,
    link and checkpoint signature is checked — every copy of an entry, wherever it is
    and however many there are. Reports what is wrong and where.

    Lines out of order (rsyslog's disk queue after a restart, files read in any order) are
    no problem: each entry names its predecessor's hash, so the order that matters is
    the chain's, and a missing, altered or inserted entry still shows as a gap, a broken
    link or a fork. A sequence number twice within one file is reported (``repeated``),
    and so is a line that is not byte for byte what the trail writes (``noncanonical``).

    ``transport_copies``: the files came over an at-least-once transport (rsyslog's
    forwarding sends a line twice when it is stopped while the receiver is unreachable).
    A line that is byte for byte an earlier line of its own file is then a second
    delivery of that line, not a second entry: it is counted (``redelivered``), not
    reported. Any other line with that sequence number still is."""
    report = VerifyReport()
    chains: dict[str, dict[int, list[_Seen]]] = defaultdict(lambda: defaultdict(list))
    delivered: set[tuple[str, bytes]] = set()  # (source, SHA-256 of the line)
    for source, number, raw in lines:
        if not raw.strip():
            continue
        report.entries += 1
        where = f"{source}:{number}"
        try:
            entry = orjson.loads(raw)
            chain = f"{entry['node']}/{entry['instance']}/{entry['log']}"
            seq = int(entry["seq"])
            str(entry["hash"]), str(entry["prev"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            report.problems.append(
                ChainProblem("?", "unreadable", None, where, "not an audit entry (torn or foreign line)")
            )
            continue
        if transport_copies:
            line = (source, hashlib.sha256(raw.rstrip(b"\n")).digest())
            if line in delivered:
                report.redelivered += 1
                continue
            delivered.add(line)
        if orjson.dumps(entry) != raw.rstrip(b"\n") or not _in_written_order(entry):
            # The trail writes each entry as orjson writes it; anything else (a name twice,
            # which parsers resolve differently, escapes or spacing that dodge a grep) is
            # not what it wrote, even where the hash of the parsed content matches.
            report.problems.append(
                ChainProblem(
                    chain, "noncanonical", (seq, seq), where, "not byte for byte what the trail writes"
                )
            )
        chains[chain][seq].append(_Seen(entry, where, source))
    for chain, by_seq in sorted(chains.items()):
        retracted = _drop_retracted(by_seq, public_key)
        report.retracted |= retracted
        _report_repeats(chain, by_seq, report)
        if by_seq:
            _verify_chain(chain, by_seq, public_key, report)
            report.chains[chain].retracted = len(retracted)
    return report


_RECORD_ORDER = (
    "type", "seq", "time_ms", "node", "instance", "log", "operation", "outcome", "status", "error_code",
    "actor", "request_id", "signer", "key_pair", "sad_jti", "dtbs_sha256", "detail", "prev", "hash",
)  # fmt: skip
_CHECKPOINT_ORDER = (
    "type",
    "seq",
    "time_ms",
    "node",
    "instance",
    "log",
    "covers",
    "prev",
    "retracts",
    "hash",
    "sig",
)


def _in_written_order(entry: dict[str, Any]) -> bool:
    """Whether an entry's names come in the order ``chain_batch`` writes them."""
    order = _CHECKPOINT_ORDER if entry.get("type") == CHECKPOINT else _RECORD_ORDER
    names = list(entry)
    return names == [name for name in order if name in entry]


def _report_repeats(chain: str, by_seq: dict[int, list[_Seen]], report: VerifyReport) -> None:
    """A sequence number twice in one source, anywhere in it (retracted batches left out:
    the archive holds them beside their successors by design)."""
    for seq, copies in sorted(by_seq.items()):
        first: dict[str, str] = {}
        for copy in copies:
            if copy.source in first:
                report.problems.append(
                    ChainProblem(
                        chain, "repeated", (seq, seq), copy.where, f"same seq as {first[copy.source]}"
                    )
                )
            else:
                first[copy.source] = copy.where


def _drop_retracted(by_seq: dict[int, list[_Seen]], public_key: ec.EllipticCurvePublicKey) -> set[str]:
    """Take out of ``by_seq`` the entries of every batch that a validly signed checkpoint
    of the chain retracts (see ``chain_batch``). Only a whole genuine batch goes: the
    retracted checkpoint itself intact and signed by the audit key, then, back along
    ``prev``, an intact record at every sequence number it covers — a line that merely
    names a retracted hash is no part of one, and stays to be reported. Returns where
    the entries taken out were."""
    retracted: set[str] = set()
    for copies in by_seq.values():
        for seen in copies:
            named = seen.entry.get("retracts")
            if (
                seen.entry.get("type") == CHECKPOINT
                and isinstance(named, list)
                and _signed(seen.entry, public_key)
            ):
                retracted.update(str(h) for h in named)
    dropped: set[str] = set()
    for seq in sorted(by_seq, reverse=True):
        for seen in list(by_seq.get(seq, ())):
            if seen.entry.get("type") != CHECKPOINT or seen.entry.get("hash") not in retracted:
                continue
            batch = _genuine_batch(by_seq, seq, seen, public_key)
            for member in batch:
                at = int(member.entry["seq"])
                by_seq[at].remove(member)
                dropped.add(member.where)
                if not by_seq[at]:
                    del by_seq[at]
    return dropped


def _intact(entry: dict[str, Any]) -> bool:
    return entry_hash(entry).hex() == entry.get("hash")


def _signed(entry: dict[str, Any], public_key: ec.EllipticCurvePublicKey) -> bool:
    return _intact(entry) and _signature_ok(public_key, entry_hash(entry), str(entry.get("sig", "")))


def _genuine_batch(
    by_seq: dict[int, list[_Seen]], seq: int, checkpoint: _Seen, public_key: ec.EllipticCurvePublicKey
) -> list[_Seen]:
    """The checkpoint at ``seq`` and the records it covers, if all are there and genuine;
    otherwise nothing."""
    covers = checkpoint.entry.get("covers")
    if not _signed(checkpoint.entry, public_key) or not (
        isinstance(covers, list) and len(covers) == 2 and all(isinstance(c, int) for c in covers)
    ):
        return []
    first, last = covers
    if last != seq - 1 or first > last:
        return []
    batch, wanted = [checkpoint], checkpoint.entry.get("prev")
    for at in range(last, first - 1, -1):
        match = next(
            (
                s
                for s in by_seq.get(at, ())
                if s.entry.get("hash") == wanted and s.entry.get("type") == RECORD and _intact(s.entry)
            ),
            None,
        )
        if match is None:
            return []
        batch.append(match)
        wanted = match.entry.get("prev")
    return batch


def _verify_chain(
    chain: str, by_seq: dict[int, list[_Seen]], public_key: ec.EllipticCurvePublicKey, report: VerifyReport
) -> None:
    seqs = sorted(by_seq)
    records = checkpoints = 0
    signed_through = seqs[0] - 1
    previous: _Seen | None = None
    for seq in seqs:
        intact = []
        for copy in by_seq[seq]:  # every copy: a forged one may repeat a genuine hash
            if _intact(copy.entry):
                intact.append(copy)
            else:
                report.problems.append(
                    ChainProblem(chain, "altered", (seq, seq), copy.where, "content does not match its hash")
                )
        if len({copy.entry["hash"] for copy in intact}) > 1:
            places = ", ".join(copy.where for copy in intact)
            report.problems.append(
                ChainProblem(chain, "fork", (seq, seq), places, "different entries with one sequence number")
            )
        seen = intact[0] if intact else by_seq[seq][0]
        entry = seen.entry
        digest = entry_hash(entry)
        altered = not intact
        if previous is not None:
            gap_start = int(previous.entry["seq"]) + 1
            if seq > gap_start:
                report.problems.append(
                    ChainProblem(
                        chain, "gap", (gap_start, seq - 1), f"before {seen.where}", "entries missing"
                    )
                )
            elif entry["prev"] != previous.entry["hash"]:
                report.problems.append(
                    ChainProblem(
                        chain, "broken-link", (seq, seq), seen.where, f"does not follow {previous.where}"
                    )
                )
        if entry.get("type") == CHECKPOINT:
            checkpoints += 1
            if _signature_ok(public_key, digest, str(entry.get("sig", ""))):
                signed_through = seq
            elif not altered:
                report.problems.append(
                    ChainProblem(
                        chain, "signature", (seq, seq), seen.where, "checkpoint signature does not verify"
                    )
                )
        else:
            records += 1
        previous = seen
    if signed_through < seqs[-1]:
        report.problems.append(
            ChainProblem(
                chain,
                "unsigned-tail",
                (signed_through + 1, seqs[-1]),
                by_seq[seqs[-1]][0].where,
                "not covered by a checkpoint (file truncated, or the last batch never completed)",
            )
        )
    report.chains[chain] = ChainSummary(seqs[0], seqs[-1], records, checkpoints, signed_through)


@dataclass
class ChainFollower:
    """Verifies entries one by one as they arrive (a SIEM's live feed): each chain is
    anchored at the first entry seen, then every link, hash and checkpoint signature
    is checked."""

    public_key: ec.EllipticCurvePublicKey
    heads: dict[str, ChainHead] = field(default_factory=dict)

    def feed(self, entry: dict[str, Any]) -> list[str]:
        try:
            chain = f"{entry['node']}/{entry['instance']}/{entry['log']}"
            seq = int(entry["seq"])
        except (KeyError, TypeError, ValueError):
            return ["not an audit entry"]
        problems = []
        digest = entry_hash(entry)
        if digest.hex() != entry.get("hash"):
            problems.append(f"{chain} seq {seq}: altered (content does not match its hash)")
        head = self.heads.get(chain)
        if head is not None:
            if seq != head.seq + 1:
                problems.append(f"{chain} seq {seq}: expected seq {head.seq + 1}")
            elif entry.get("prev") != head.hash:
                problems.append(f"{chain} seq {seq}: does not link to seq {head.seq}")
        if entry.get("type") == CHECKPOINT and not _signature_ok(
            self.public_key, digest, str(entry.get("sig", ""))
        ):
            problems.append(f"{chain} seq {seq}: checkpoint signature does not verify")
        self.heads[chain] = ChainHead(seq, str(entry.get("hash")))
        return problems


# --- the published shape of audit entries (JSON Schema in schemas/) ------------------


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int = Field(ge=1, description="position in the chain of (node, instance, log)")
    time_ms: int
    node: str
    instance: str
    log: AuditLog
    prev: str = Field(description="hash of the previous entry (64 zeros for the first)")
    hash: str = Field(description="SHA-256 (hex) of the entry's canonical JSON without hash and sig")


class AuditRecordEntry(_Entry):
    """One request's record. Carries digests of what was signed, never secrets."""

    type: Literal["record"]
    operation: str
    outcome: Outcome
    status: int
    error_code: str | None
    actor: str | None = Field(description="the broker-validated user_id")
    request_id: str | None
    signer: str | None
    key_pair: str | None
    sad_jti: str | None
    dtbs_sha256: list[str] = Field(description="SHA-256 (hex) of each DTBS/R")
    detail: str | None


class AuditCheckpointEntry(_Entry):
    """Closes a batch: signed by the HSM audit key, it covers every entry before it."""

    type: Literal["checkpoint"]
    covers: tuple[int, int] = Field(description="first and last seq of the batch's records")
    retracts: list[str] | None = Field(
        default=None,
        description="hashes of checkpoints of batches this chain gave up after they may have reached "
        "the broker's archive: their entries are not part of the chain",
    )
    sig: str = Field(description="base64url raw r||s ECDSA P-256 signature of the hash")
