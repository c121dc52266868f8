"""On the real SoftHSM2 token: the worker's HSM adapter keeps its memory flat over many
stateless signatures. SoftHSM keeps the bookkeeping of every session object, destroyed
or not, until C_Finalize (~190 bytes per unwrap; closing the session does not free it),
so the adapter closes its session and re-initializes the library every so many objects —
and clears the stale OpenSSL error that re-initializing leaves behind, which would
otherwise break the next read of the worker's TLS connection (NO_SUCH_ENGINE).
Without the renewal each round below grew by ~0.7 MiB. The lane signs on four threads,
whose malloc arenas fill during the first round: memory is compared from the second."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import Harness

pytestmark = pytest.mark.integration

ROUNDS, PER_ROUND = 6, 4000


def test_stateless_signing_keeps_memory_flat_and_tls_intact(harness: Harness) -> None:
    stack = harness.stack
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.hsm_probe",
            str(stack.infrastructure_file),
            str(stack.path("secrets", "token-pin")),
            str(stack.profile("bench")),
            str(ROUNDS),
            str(PER_ROUND),
        ],
        env=stack.worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["lost"] == []
    assert report["renewals"] >= ROUNDS * PER_ROUND // 2000 - 1
    assert report["tls"] == "ok"  # the open TLS connection survived every renewal
    resident = report["resident_kib"]
    assert resident[-1] - resident[1] < 512, resident  # rounds 3..6 together: 16,000 unwraps
