"""On the real SoftHSM2 token, through the network-HSM model (sam_devtools.hsm_delay): the
delay shows on every call that goes to the HSM, signatures still verify, and threads with
a session each overlap their waits, as on a network HSM. The probe initializes the library
again with CKF_OS_LOCKING_OK, which the module must hand on unchanged: without it, SoftHSM
takes no lock and threads signing at once fail (GeneralError) or crash the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sam_devtools.hsm_delay import build, environment
from sam_devtools.stack import Stack

pytestmark = pytest.mark.integration

DELAY_MS = 2.0
SIGNATURES = 100  # per thread: ~0.7 s at DELAY_MS
# python-pkcs11 signs with C_SignInit, then C_Sign twice (the length, then the signature)
ROUND_TRIPS_PER_SIGNATURE = 3


@pytest.fixture(scope="module")
def delay_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("hsm-delay"))


@pytest.fixture(scope="module")
def probes(stack: Stack, delay_module: Path) -> dict[float, dict[str, Any]]:
    """The probe's report for no delay and for DELAY_MS."""
    reports = {}
    for delay_ms in (0.0, DELAY_MS):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.integration.hsm_delay_probe",
                str(delay_module),
                str(stack.infrastructure_file),
                str(stack.path("secrets", "token-pin")),
                str(SIGNATURES),
            ],
            env=stack.worker_env() | environment(delay_ms),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports[delay_ms] = json.loads(result.stdout.strip().splitlines()[-1])
        print(delay_ms, reports[delay_ms])
    return reports


def test_every_call_to_the_hsm_waits_the_delay(probes: dict[float, dict[str, Any]]) -> None:
    local, remote = probes[0.0], probes[DELAY_MS]
    assert local["verified"] and remote["verified"]
    waits = ROUND_TRIPS_PER_SIGNATURE * DELAY_MS
    assert remote["per_signature_ms"] >= waits, remote
    # and not one wait more (a sleep overshoots by ~0.2 ms on a VM: the bound is loose)
    assert remote["per_signature_ms"] < local["per_signature_ms"] + waits + DELAY_MS, (local, remote)


def test_threads_with_a_session_each_overlap_their_waits(probes: dict[float, dict[str, Any]]) -> None:
    remote = probes[DELAY_MS]
    assert remote["threads"] == 4
    assert remote["threads_per_second"] >= 2.5 * remote["one_thread_per_second"], remote


def test_a_target_that_does_not_load_fails_clearly(delay_module: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import pkcs11; pkcs11.lib({str(delay_module)!r})"],
        env=environment(0, target=str(tmp_path / "missing.so")),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "pkcs11_delay: cannot load the target module" in result.stderr, result.stderr
    assert "missing.so" in result.stderr
    assert "GeneralError" in result.stderr  # CKR_GENERAL_ERROR, from C_GetFunctionList
