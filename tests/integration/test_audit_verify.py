"""``sam-admin audit verify`` over the files the workers wrote, and over damaged copies."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import orjson
import pytest

from sam_devtools.stack import verify_audit
from tests.integration.conftest import Harness, key_id
from worker.client import SamClient

pytestmark = pytest.mark.integration


def run_verify(harness: Harness, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return verify_audit(harness.stack.infrastructure_file, files)


@pytest.fixture(scope="module")
async def service_file(harness: Harness, ssa: SamClient, tmp_path_factory: pytest.TempPathFactory) -> Path:
    key_pair = await harness.certified_key_pair(ssa, "dora")
    for n in range(12):
        digest = hashlib.sha256(bytes([n])).digest()
        sad = harness.dev_as.issue_sad(harness.sam_id, "dora", key_id(key_pair), [digest])
        await ssa.sign(key_pair, "dora", "1.2.840.10045.4.3.2", [digest], sad)
    # the busiest worker's service log has enough records to damage
    files = sorted(harness.stack.path("audit").glob("*/service.jsonl"), key=lambda p: p.stat().st_size)
    copy = tmp_path_factory.mktemp("audit") / "service.jsonl"
    copy.write_bytes(files[-1].read_bytes())
    assert len(copy.read_bytes().splitlines()) >= 6
    return copy


def test_intact_files_verify(harness: Harness, service_file: Path) -> None:
    files = sorted(harness.stack.path("audit").glob("*/*.jsonl"))
    result = run_verify(harness, files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 problems" in result.stdout
    assert "checkpoints, signed through seq" in result.stdout


def _damaged(source: Path, target: Path, how: str) -> tuple[Path, int]:
    """Write a damaged copy; return it and the line number the verifier must name."""
    lines = source.read_bytes().splitlines()
    if how == "altered":
        record = orjson.loads(lines[3])
        record["actor"] = "someone-else"
        lines[3] = orjson.dumps(record)
        bad = 4
    elif how == "removed":
        del lines[3]
        bad = 4  # the record after the gap
    else:  # swapped
        lines[2], lines[3] = lines[3], lines[2]
        bad = 4  # the entry that comes after a later one
    target.write_bytes(b"\n".join(lines) + b"\n")
    return target, bad


@pytest.mark.parametrize("how", ["altered", "removed"])
def test_damaged_copy_names_first_bad_record(
    harness: Harness, service_file: Path, tmp_path: Path, how: str
) -> None:
    damaged, bad_line = _damaged(service_file, tmp_path / f"{how}.jsonl", how)
    result = run_verify(harness, [damaged])
    assert result.returncode == 1, result.stdout
    kind = {"altered": "altered", "removed": "gap"}[how]
    # (an altered line that gained a name is also noncanonical, reported as it is read)
    first_problem = next(line for line in result.stdout.splitlines() if line.startswith(f"BAD {kind}: "))
    assert f"{damaged}:{bad_line})" in first_problem, result.stdout


def test_lines_out_of_order_verify_when_the_chain_is_intact(
    harness: Harness, service_file: Path, tmp_path: Path
) -> None:
    """As rsyslog's disk queue delivers them after a restart: the chain decides, not the file."""
    damaged, _ = _damaged(service_file, tmp_path / "swapped.jsonl", "swapped")
    result = run_verify(harness, [damaged])
    assert result.returncode == 0, result.stdout
    assert "BAD " not in result.stdout
