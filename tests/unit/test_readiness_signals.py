"""What readiness reads: how long the audit trail and a stream ledger have been failing.
Both turn to failing at their first failure and back at their first success; a failing
ledger sends a probe by itself, so a worker nobody feeds (because it said it was not
ready) still finds out that its stream answers again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.unit.test_stream_replay import _Broker, _Reducer
from worker.audit_trail import AuditTrail
from worker.domain.audit import AuditEvent, AuditLog, Outcome
from worker.errors import ErrorCode, SamError
from worker.fakes import SoftwareHsm
from worker.transport.ledger import StreamLedger


def _event() -> AuditEvent:
    return AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, request_id="r-1")


async def test_the_audit_trail_reports_how_long_it_has_been_failing(tmp_path: Path) -> None:
    broker_up = False

    async def publish(body: bytes) -> None:
        if not broker_up:
            raise ConnectionError("broker away")

    trail = AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, publish, timeout=0.5)
    trail.start()
    try:
        assert trail.failing_for() == 0
        with pytest.raises(SamError) as refused:
            await trail.record(_event())
        assert refused.value.code is ErrorCode.audit_unavailable
        await asyncio.sleep(0.1)
        assert trail.failing_for() > 0.1
        broker_up = True
        await trail.record(_event())
        assert trail.failing_for() == 0
    finally:
        await trail.close()


async def test_a_failing_ledger_probes_until_its_stream_answers_again() -> None:
    broker = _Broker(backlog=0, pace=0)
    ledger = StreamLedger("sam.key-events", _Reducer(), broker, broker, 0.2)  # type: ignore[arg-type]
    delivering = broker.consume  # the stream answers only once the broker delivers
    ledger._publisher = asyncio.get_running_loop().create_task(ledger._publish_forever())
    try:
        with pytest.raises(SamError):
            await ledger.read_to(5)  # nothing delivers: ledger_unavailable
        assert ledger.failing_for() > 0  # and a probe is on its way
        await delivering(ledger._on_message, {})  # the stream is back
        for _ in range(50):
            if ledger.failing_for() == 0:
                break
            await asyncio.sleep(0.02)
        assert ledger.failing_for() == 0
    finally:
        await ledger.stop()
        if broker.delivering is not None:
            broker.delivering.cancel()
