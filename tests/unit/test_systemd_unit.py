"""The systemd unit as systemd reads it (``systemd-analyze verify`` and the offline
``security`` review), and the facts it shares with the logrotate file: the account, the
audit folder and how instances are told to reopen their files. logrotate itself runs on
the shipped file in tests/integration/test_operator_files.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "ops" / "systemd" / "sam-worker@.service"
LOGROTATE = ROOT / "ops" / "logrotate" / "sam-worker"
# The unit's exposure as `systemd-analyze security` scores it (0 best, 10 worst); it was
# 5.0 (MEDIUM) before the hardening, 1.3 after.
MOST_EXPOSURE = 1.5


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze (Debian's systemd) is needed; ./ops/test installs it")
    return found


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            name, _, value = line.partition("=")
            found.setdefault(name.strip(), []).append(value.strip())
    return found


def test_systemd_reads_the_unit_without_complaint(tmp_path: Path) -> None:
    instance = tmp_path / "sam-worker@1.service"
    shutil.copy(UNIT, tmp_path / "sam-worker@.service")
    instance.symlink_to(tmp_path / "sam-worker@.service")
    result = subprocess.run(
        [systemd_analyze(), "verify", str(instance)], capture_output=True, text=True, check=False
    )
    complaints = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        # the package is not installed on the test machine; everything else must be clean
        if line.strip() and "/opt/sam-worker/bin/sam-worker is not executable" not in line
    ]
    assert complaints == []


def test_the_unit_is_hardened(tmp_path: Path) -> None:
    shutil.copy(UNIT, tmp_path / "sam-worker@.service")
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            "--no-pager",
            str(tmp_path / "sam-worker@.service"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= MOST_EXPOSURE, result.stdout
    unit = settings(UNIT.read_text())
    assert unit["CapabilityBoundingSet"] == [""] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]


def test_the_unit_and_the_logrotate_file_agree() -> None:
    """What broke in the field: logrotate made root-owned files for a worker that runs
    as ``sam``, and signalled pid files the unit never wrote."""
    unit = settings(UNIT.read_text())
    rotation = LOGROTATE.read_text()
    directives = [
        line.strip() for line in rotation.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    user, group = unit["User"][0], unit["Group"][0]
    assert f"create 0640 {user} {group}" in directives and "copytruncate" not in directives
    assert f"su {user} {group}" in directives  # logrotate works in the folder as its owner
    assert "dateext" in directives  # no renaming of thousands of files at each rotation
    # the audit folder: systemd makes /var/log/<LogsDirectory> for the account, the worker
    # writes there, logrotate looks there
    assert unit["LogsDirectory"] == ["sam-worker"]
    assert "Environment=SAM_AUDIT_DIR=/var/log/sam-worker" in UNIT.read_text()
    assert directives[0].startswith("AUDIT_DIR/*/service.jsonl")
    # the reopen signal goes through systemd to every instance's main process, which
    # reloads with SIGHUP too
    (postrotate,) = [line for line in directives if line.startswith("systemctl ")]
    assert postrotate == "systemctl kill --kill-whom=main --signal=HUP 'sam-worker@*.service'"
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and unit["KillSignal"] == ["SIGTERM"]
    assert unit["ExecStart"][0].startswith("/opt/sam-worker/bin/sam-worker --instance %H-%i")
