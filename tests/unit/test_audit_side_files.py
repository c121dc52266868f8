"""Side files: a crash recovery's stay out of the trail a verifier reads by glob; those of
records a stopping worker could not chain are read back into the chain at the next start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from worker.audit_trail import ArchiveRefused, AuditTrail
from worker.domain.audit import AuditEvent, AuditLog, Outcome
from worker.errors import SamError
from worker.fakes import SoftwareHsm

# a line of a side file as the trail writes it: the record of a withheld reply
WITHHELD_LINE = {
    "log": "service",
    "operation": "signatures.create",
    "outcome": "failure",
    "status": 503,
    "error_code": "audit_unavailable",
    "detail": "reply withheld: test",
    "time_ms": 1,
}


def _event() -> AuditEvent:
    return AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, request_id="r-1")


async def test_a_crash_recoverys_side_file_stays_outside_the_trails_glob(tmp_path: Path) -> None:
    """An unfinished last batch (the worker died writing it) is moved beside the file,
    named so that ``sam-admin audit verify audit/*/service.jsonl*`` does not read it."""
    trail = AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, _published, timeout=1)
    trail.start()
    await trail.record(_event())
    await trail.close()
    service = tmp_path / "w" / "service.jsonl"
    with service.open("ab") as handle:  # a record whose checkpoint never came
        handle.write(b'{"type":"record","seq":99}\n')
    AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, _published, timeout=1)
    side_files = [p.name for p in (tmp_path / "w").iterdir() if ".cut-" in p.name]
    assert len(side_files) == 1 and side_files[0].startswith("service.cut-")
    assert sorted(p.name for p in (tmp_path / "w").glob("service.jsonl*")) == ["service.jsonl"]


async def _published(body: bytes) -> None:
    return None


async def test_records_a_run_could_not_chain_are_chained_by_the_next_start(tmp_path: Path) -> None:
    """A worker that stops while its sink fails keeps the records of the replies it
    withheld in a side file; the next start reads them back, chains them with its first
    batch and removes the file — each request still has exactly one record, in the chain."""
    refusing = {"on": True}

    async def archive(body: bytes) -> None:
        if refusing["on"]:
            raise ArchiveRefused("DeliveryError")

    hsm = SoftwareHsm()
    for run in range(2):  # two stops in a row with the sink down: one side file, not two
        trail = AuditTrail("node-1", "w", tmp_path, hsm.sign_audit_digest, archive, timeout=0.3)
        trail.start()
        with pytest.raises(SamError):
            await trail.record(
                AuditEvent(
                    AuditLog.service, "signatures.create", Outcome.success, 200, request_id=f"lost-{run}"
                )
            )
        await trail.close()
        side_files = [p for p in (tmp_path / "w").iterdir() if ".unwritten-" in p.name]
        assert len(side_files) == 1, side_files
    refusing["on"] = False
    trail = AuditTrail("node-1", "w", tmp_path, hsm.sign_audit_digest, archive, timeout=1)
    trail.start()
    await trail.record(_event())
    await trail.close()
    assert not [p for p in (tmp_path / "w").iterdir() if ".unwritten-" in p.name]
    records = [orjson.loads(line) for line in (tmp_path / "w" / "service.jsonl").read_bytes().splitlines()]
    mine = [(r["request_id"], r["status"]) for r in records if r["type"] == "record"]
    assert sorted(mine) == [("lost-0", 503), ("lost-1", 503), ("r-1", 200)]


async def test_a_side_file_is_read_back_only_as_withheld_replies(tmp_path: Path) -> None:
    """The side file is unsigned: a line in it that claims anything but a withheld reply
    (here a forged success) leaves the whole file alone instead of signing it into the
    chain; a genuine one is chained saying where it came from."""
    folder = tmp_path / "w"
    folder.mkdir()
    withheld = {**WITHHELD_LINE, "request_id": "withheld-1"}
    forged = {**withheld, "outcome": "success", "status": 200, "error_code": None, "request_id": "forged"}
    (folder / "service.unwritten-1").write_bytes(orjson.dumps(withheld) + b"\n")
    (folder / "service.unwritten-2").write_bytes(
        orjson.dumps(withheld) + b"\n" + orjson.dumps(forged) + b"\n"
    )
    trail = AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, _published, timeout=1)
    trail.start()
    await trail.record(_event())
    await trail.close()
    records = [orjson.loads(line) for line in (folder / "service.jsonl").read_bytes().splitlines()]
    read_back = [r for r in records if r["type"] == "record" and r["request_id"] != "r-1"]
    assert [(r["request_id"], r["status"]) for r in read_back] == [("withheld-1", 503)]
    assert "read back from the unsigned side file service.unwritten-1" in read_back[0]["detail"]
    assert sorted(p.name for p in folder.iterdir() if ".unwritten-" in p.name) == ["service.unwritten-2"]


async def test_a_try_cut_short_by_the_shutdown_keeps_its_records(tmp_path: Path) -> None:
    """The shutdown waits for the flusher only so long; a try still in flight then (here:
    an archive that never confirms) is cancelled, and the records it held — withheld
    replies taken out of the queue for it — still reach the side file."""

    async def archive(body: bytes) -> None:
        await asyncio.sleep(3600)

    trail = AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, archive, timeout=0.3)
    trail.start()
    for n in range(3):
        with pytest.raises(SamError):
            await trail.record(
                AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, request_id=f"r{n}")
            )
    # a caller with a long bound is in flight with them when the shutdown comes, whose
    # own bound is short
    trail._timeout = 30
    late = asyncio.create_task(
        trail.record(AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, request_id="r3"))
    )
    await asyncio.sleep(0.2)
    trail._timeout = 0.05
    await trail.close()
    with pytest.raises(SamError):
        await late
    (side,) = [p for p in (tmp_path / "w").iterdir() if ".unwritten-" in p.name]
    kept = sorted(orjson.loads(line)["request_id"] for line in side.read_bytes().splitlines())
    assert kept == ["r0", "r1", "r2", "r3"]


async def test_reading_a_side_file_back_twice_chains_its_records_once(tmp_path: Path) -> None:
    """A worker killed after it chained what it read back from a side file, but before it
    removed the file (600 records: more than one batch), reads it again at its next
    start: each line the chain says it read back already is skipped."""
    folder = tmp_path / "w"
    folder.mkdir()
    line = WITHHELD_LINE
    side = folder / "service.unwritten-7"
    content = b"".join(orjson.dumps({**line, "request_id": f"w-{n}"}) + b"\n" for n in range(600))
    side.write_bytes(content)
    for _ in range(2):
        trail = AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, _published, timeout=2)
        trail.start()
        await trail.record(_event())
        await asyncio.sleep(0.2)  # the second batch of read-back records
        await trail.close()
        assert not side.exists()
        side.write_bytes(content)  # as if killed before the file was removed
    records = [orjson.loads(raw) for raw in (folder / "service.jsonl").read_bytes().splitlines()]
    read_back = [
        r["request_id"] for r in records if r["type"] == "record" and r["request_id"].startswith("w-")
    ]
    assert sorted(read_back) == sorted(f"w-{n}" for n in range(600))


def test_verify_names_records_still_waiting_in_side_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trail's last word on a request may wait in a side file until the worker's next
    start: ``audit verify`` says so beside its report (it is not a problem of the chain)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from worker.cli.admin import main

    key = tmp_path / "audit-key.pem"
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    key.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    log = tmp_path / "service.jsonl"
    log.write_bytes(b"")
    side = tmp_path / "service.unwritten-1"
    side.write_bytes(orjson.dumps(WITHHELD_LINE) + b"\n" + orjson.dumps(WITHHELD_LINE) + b"\n")
    with pytest.raises(SystemExit) as exited:
        main(["audit", "verify", "--key", str(key), str(log)])
    assert exited.value.code == 0
    assert f"pending {side}: 2 records of withheld replies" in capsys.readouterr().out
