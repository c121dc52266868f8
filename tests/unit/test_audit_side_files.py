"""Crash recovery's side files stay out of the trail a verifier reads by glob."""

from __future__ import annotations

from pathlib import Path

from worker.audit_trail import AuditTrail
from worker.domain.audit import AuditEvent, AuditLog, Outcome
from worker.fakes import SoftwareHsm


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
