"""Audit chains: batches link and are signed by checkpoints; the verifier names what was
damaged — altered, removed, truncated, forked — and where; lines out of order are fine."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from worker.audit_trail import runs_by_routing_key
from worker.domain.audit import (
    AuditEvent,
    AuditLog,
    ChainFollower,
    ChainHead,
    Outcome,
    chain_batch,
    verify_entries,
)

KEY = ec.generate_private_key(ec.SECP256R1())


def signer(key: ec.EllipticCurvePrivateKey = KEY) -> Any:
    def sign_digest(digest: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign_digest


def event(n: int) -> tuple[AuditEvent, int]:
    return AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, request_id=f"r-{n}"), n


def trail(batches: list[int], instance: str = "w-1", head: ChainHead | None = None) -> list[bytes]:
    """Lines of a trail written in batches of the given sizes."""
    lines, head, n = [], head or ChainHead(), 0
    for size in batches:
        entries, head = chain_batch(
            "node-1", instance, AuditLog.service, head, [event(n + i) for i in range(size)], 0, signer()
        )
        n += size
        lines += [orjson.dumps(e) for e in entries]
    return lines


def problems(*files: list[bytes]) -> list[tuple[str, tuple[int, int] | None]]:
    lines = ((f"f{i}", n, line) for i, f in enumerate(files) for n, line in enumerate(f, 1))
    return [(p.kind, p.seqs) for p in verify_entries(lines, KEY.public_key()).problems]


def test_intact_trail_verifies() -> None:
    lines = trail([3, 1, 5])
    assert len(lines) == 3 + 1 + 1 + 1 + 5 + 1
    report = verify_entries((("f", n, line) for n, line in enumerate(lines, 1)), KEY.public_key())
    assert report.ok
    [summary] = report.chains.values()
    assert (summary.first, summary.last, summary.records, summary.checkpoints, summary.signed_through) == (
        1,
        12,
        9,
        3,
        12,
    )


def test_checkpoint_covers_its_batch() -> None:
    entries = [orjson.loads(line) for line in trail([3])]
    assert [e["type"] for e in entries] == ["record"] * 3 + ["checkpoint"]
    assert entries[-1]["covers"] == [1, 3] and entries[-1]["prev"] == entries[2]["hash"]
    assert "sig" not in entries[0] and entries[1]["prev"] == entries[0]["hash"]


def _alter(lines: list[bytes], index: int, **changes: Any) -> list[bytes]:
    entry = orjson.loads(lines[index])
    entry.update(changes)
    return [*lines[:index], orjson.dumps(entry), *lines[index + 1 :]]


def _rehashed_forgery(lines: list[bytes]) -> list[bytes]:
    """A checkpoint re-made (hash and all) by someone without the audit key."""
    entries = [orjson.loads(line) for line in lines]
    forged, _ = chain_batch(
        "node-1",
        "w-1",
        AuditLog.service,
        ChainHead(3, entries[2]["hash"]),
        [],
        0,
        signer(ec.generate_private_key(ec.SECP256R1())),
    )
    return [*lines[:3], orjson.dumps(forged[0]), *lines[4:]]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda ls: _alter(ls, 1, status=500), [("altered", (2, 2))]),
        (lambda ls: _alter(ls, 3, covers=[1, 99]), [("altered", (4, 4))]),
        (_rehashed_forgery, [("signature", (4, 4)), ("broken-link", (5, 5))]),
        (lambda ls: [*ls[:1], *ls[2:]], [("gap", (2, 2))]),
        (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], []),  # out of order, chain intact: fine
        (lambda ls: ls[:6], [("unsigned-tail", (5, 6))]),  # truncated mid-batch
        (lambda ls: [*ls[:6], ls[6][:40]], [("unreadable", None), ("unsigned-tail", (5, 6))]),  # torn line
        (lambda ls: [*ls, ls[-1]], [("repeated", (9, 9))]),
    ],
    ids=[
        "altered record",
        "altered checkpoint",
        "forged checkpoint",
        "removed",
        "out of order",
        "truncated",
        "torn",
        "repeated",
    ],
)
def test_damage_is_named(damage: Any, expected: list[tuple[str, Any]]) -> None:
    assert problems(damage(trail([3, 4]))) == expected


def test_the_same_file_given_twice_is_no_fault() -> None:
    lines = trail([3])
    assert problems(lines, lines) == []


def test_fork_across_files() -> None:
    common = trail([2])
    head_entry = orjson.loads(common[-1])
    head = ChainHead(head_entry["seq"], head_entry["hash"])
    branch_a = trail([2], head=head)
    branch_b = [orjson.dumps({**orjson.loads(x), "request_id": "other"}) for x in branch_a[:1]]
    # re-chain branch b properly so only the fork itself is wrong
    entries, _ = chain_batch(
        "node-1",
        "w-1",
        AuditLog.service,
        head,
        [(AuditEvent(AuditLog.service, "x", Outcome.failure, 403), 0)],
        0,
        signer(),
    )
    branch_b = [orjson.dumps(e) for e in entries]
    found = problems(common + branch_a, branch_b)
    assert ("fork", (4, 4)) in found and ("fork", (5, 5)) in found


def test_files_in_any_order_and_chains_apart() -> None:
    lines = trail([2, 2, 2])
    rotated = [lines[:3], lines[3:6], lines[6:]]
    other = trail([3], instance="w-2")
    assert problems(rotated[2], other, rotated[0], rotated[1]) == []
    assert problems(rotated[2], rotated[0]) == [("gap", (4, 6))]


def test_follower_checks_as_entries_arrive() -> None:
    follower = ChainFollower(KEY.public_key())
    lines = trail([2, 2])
    assert all(follower.feed(orjson.loads(line)) == [] for line in lines[:3])
    assert follower.feed(orjson.loads(lines[4])) == ["node-1/w-1/service seq 5: expected seq 4"]
    bad = ChainFollower(KEY.public_key())
    assert bad.feed(orjson.loads(_alter(lines, 0, actor="x")[0]))[0].endswith(
        "altered (content does not match its hash)"
    )


def test_broker_messages_carry_runs_of_one_routing_key_in_chain_order() -> None:
    """What the worker publishes on sam.audit: consecutive entries with one routing key
    in one message (JSON lines), the checkpoint alone; read line by line, the follower
    sees the whole chain in order."""
    lines = trail([5])
    routing = ["service.signatures_create.success"] * 2 + ["service.signatures_create.failure"]
    routing += ["service.signatures_create.success"] * 2 + ["service.checkpoint.success"]
    messages = runs_by_routing_key(lines, routing)
    assert [key for _, key in messages] == [
        "service.signatures_create.success",
        "service.signatures_create.failure",
        "service.signatures_create.success",
        "service.checkpoint.success",
    ]
    assert [len(body.splitlines()) for body, _ in messages] == [2, 1, 2, 1]
    follower = ChainFollower(KEY.public_key())
    received = [line for body, _ in messages for line in body.splitlines()]
    assert received == lines
    assert all(follower.feed(orjson.loads(line)) == [] for line in received)
    assert runs_by_routing_key([], []) == []


def test_a_forged_copy_of_an_entry_is_altered_wherever_it_stands() -> None:
    """A copy that keeps a genuine entry's seq and hash but says something else is caught
    whether it comes before or after the genuine one, in the same file or another."""
    lines = trail([2, 2])
    forged = orjson.loads(lines[1])
    forged.update(request_id="someone-else", status=403, actor="ssa-2")
    forged_line = orjson.dumps(forged)
    assert ("altered", (2, 2)) in problems([*lines, forged_line])
    assert ("altered", (2, 2)) in problems([forged_line, *lines])
    assert ("altered", (2, 2)) in problems(lines, [forged_line])


def test_an_entry_twice_in_one_file_is_repeated_even_far_apart() -> None:
    lines = trail([2, 2, 2])
    assert ("repeated", (1, 1)) in problems([*lines, lines[0]])
    assert problems(lines, [lines[0]]) == []  # the same entry in two files: a copy, no problem


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda line: line.replace(
            b'{"type"', b'{"request_id":"SHADOW","status":999,"type"', 1
        ),  # a name twice
        lambda line: line.replace(b'"actor"', b'"\\u0061ctor"', 1),  # an escape
        lambda line: line.replace(b'","', b'", "', 1),  # spacing
        lambda line: line + b"   ",  # trailing spacing
        lambda line: orjson.dumps(dict(sorted(orjson.loads(line).items()))),  # names in another order
    ],
)
def test_a_line_that_is_not_what_the_trail_writes_is_noncanonical(rewrite: Any) -> None:
    """Parsed, such a line may hash like the genuine entry; a SIEM parser or a grep may
    still read something else (the first of two names, an escape it does not decode)."""
    lines = trail([2])
    changed = rewrite(lines[0])
    assert changed != lines[0]
    assert ("noncanonical", (1, 1)) in problems([changed, *lines[1:]])


def _retracting_trail() -> tuple[list[bytes], list[dict[str, Any]]]:
    """A committed batch; a batch the trail gave up (its copy reached the archive); the
    batch committed in its place, whose checkpoint retracts it."""
    first, head = chain_batch("node-1", "w-1", AuditLog.service, ChainHead(), [event(0)], 0, signer())
    given_up, _ = chain_batch("node-1", "w-1", AuditLog.service, head, [event(1)], 1, signer())
    kept, _ = chain_batch(
        "node-1", "w-1", AuditLog.service, head, [event(2)], 2, signer(), retracts=[given_up[-1]["hash"]]
    )
    return [orjson.dumps(e) for e in [*first, *given_up, *kept]], given_up


def test_a_retracted_batch_is_left_out_and_counted() -> None:
    lines, _ = _retracting_trail()
    report = verify_entries((("archive", n, line) for n, line in enumerate(lines, 1)), KEY.public_key())
    assert report.ok, [str(p) for p in report.problems]
    [summary] = report.chains.values()
    assert summary.retracted == 2 and summary.records == 2


def test_a_line_that_only_names_a_retracted_hash_is_not_left_out() -> None:
    """Forged lines carrying a retracted checkpoint's hash — a record, or a checkpoint
    after the end that claims to cover the whole chain — are reported, and the genuine
    chain stays in the report."""
    lines, given_up = _retracting_trail()
    retracted = given_up[-1]["hash"]
    last = orjson.loads(lines[-1])
    forged_record = {**orjson.loads(lines[0]), "request_id": "FORGED", "seq": 3, "hash": retracted}
    forged_checkpoint = {
        **given_up[-1],
        "seq": last["seq"] + 1,
        "prev": last["hash"],
        "covers": [1, last["seq"]],
    }
    for forged in (forged_record, forged_checkpoint):
        report = verify_entries(
            (("f", n, line) for n, line in enumerate([*lines, orjson.dumps(forged)], 1)), KEY.public_key()
        )
        assert not report.ok
        assert "altered" in {p.kind for p in report.problems}
        [summary] = report.chains.values()
        assert summary.records >= 2 and summary.retracted == 2
