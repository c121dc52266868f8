"""The short chaos campaign (ops/chaos) on a stack of its own: workers killed, the HSM
away, the audit disk full, the broker restarted — nothing unanswered, the audit trail
verifies, and every answered request has its record."""

from __future__ import annotations

import pytest

from worker.devtools.chaos import run

pytestmark = pytest.mark.integration


async def test_short_chaos_campaign() -> None:
    report = await run(full=False, port_base=28671)
    summary = report.as_dict()
    assert report.sent > 200, summary
    assert report.unanswered == 0, summary
    assert report.audit_ok, summary
    assert report.answered_without_record == 0, summary
    assert report.outcomes["ok"] > report.sent / 2, summary
    # only the documented consequences of the faults, nothing else
    assert set(report.outcomes) <= {
        "ok",
        "audit_unavailable",
        "hsm_unavailable",
        "ledger_unavailable",
        "sad_replayed",
    }, summary
