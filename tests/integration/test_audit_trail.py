"""The audit trail on real files and the real broker: every sink failure answered with
audit_unavailable within the bound, recovery, SIGKILL mid-batch, and the SIEM's verifying
tail (rotation under load: test_operator_files)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sam_devtools.raw_client import RawSamClient
from sam_devtools.stack import fill_filesystem, verify_audit
from tests.integration.conftest import EC_SHA256, Harness, key_id, wire
from worker.client import RawReply
from worker.domain.contract import KeyPairObject
from worker.transport.topology import VHOST, siem_queue

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AUDIT_TIMEOUT = 2.0


class Signing:
    """Signature requests by id, so each reply can be matched with its audit record."""

    def __init__(self, harness: Harness, ssa: RawSamClient, key_pair: KeyPairObject, signer: str) -> None:
        self.harness, self.ssa, self.key_pair, self.signer = harness, ssa, key_pair, signer

    async def send(self, reply_timeout: float = 20) -> tuple[str, RawReply]:
        request_id = str(uuid.uuid4())
        digest = hashlib.sha256(request_id.encode()).digest()
        sad = self.harness.dev_as.issue_sad(self.harness.sam_id, self.signer, key_id(self.key_pair), [digest])
        body = orjson.dumps(
            {
                "signature_algorithm": EC_SHA256,
                "requests": [{"dtbs": base64.b64encode(digest).decode()}],
                "key_pair": wire(self.key_pair),
                "signer": {"id": self.signer},
            }
        )
        reply = await self.ssa.send(
            "signatures.create", body, sad=sad, message_id=request_id, reply_timeout=reply_timeout
        )
        assert reply is not None
        return request_id, reply


@pytest.fixture(scope="module")
async def signing(harness: Harness, ssa: RawSamClient) -> Signing:
    return Signing(harness, ssa, await harness.certified_key_pair(ssa, "audit-signer"), "audit-signer")


def verify(harness: Harness, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return verify_audit(harness.stack.infrastructure_file, files)


def records_in(files: list[Path]) -> list[dict[str, Any]]:
    import gzip

    records = []
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            records += [e for e in map(orjson.loads, handle.read().splitlines()) if e["type"] == "record"]
    return records


@contextlib.asynccontextmanager
async def own_worker(harness: Harness, instance: str, audit_dir: Path) -> AsyncIterator[None]:
    """This test's worker alone, with its audit files in ``audit_dir``."""
    env = {"SAM_AUDIT_DIR": str(audit_dir), "SAM_AUDIT_TIMEOUT_SECONDS": str(AUDIT_TIMEOUT)}
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, instance, env=env)
        try:
            yield
        finally:
            if instance in harness.workers:
                await harness.stop_worker(instance)


async def assert_refused_then_recovers(
    signing: Signing, breakage: Any, repair: Any, slack: int = 0
) -> dict[str, int]:
    """Once the sink is broken, a request gets audit_unavailable within the bound and no
    signature; once repaired, the same worker serves again. ``slack``: requests that may
    still succeed after the breakage (a full disk still takes what fits in a file's last
    page). Returns the status each request got, by request id."""
    got: dict[str, int] = {}
    request_id, before = await signing.send()
    got[request_id] = before.status
    assert before.status == 200
    if inspect.isawaitable(broken := breakage()):
        await broken
    try:
        for attempt in range(slack + 1):
            started = time.monotonic()
            request_id, reply = await signing.send(reply_timeout=AUDIT_TIMEOUT + 10)
            got[request_id] = reply.status
            assert time.monotonic() - started < AUDIT_TIMEOUT + 5
            document = reply.json()
            if reply.status == 200 and attempt < slack:
                continue
            assert reply.status == 503 and document["error"]["code"] == "audit_unavailable", document
            assert "signatures" not in document
            break
    finally:
        if inspect.isawaitable(repaired := repair()):
            await repaired
    for _ in range(3):  # and it serves again at once, without a restart
        request_id, after = await signing.send()
        got[request_id] = after.status
        assert after.status == 200, after.json()
    return got


def assert_one_truthful_record(files: list[Path], got: dict[str, int]) -> None:
    """Each request exactly once in the files, with the status its caller got."""
    records = records_in(files)
    for request_id, status in got.items():
        mine = [r["status"] for r in records if r["request_id"] == request_id]
        assert mine == [status], (request_id, mine, status)


@pytest.fixture
def audit_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "audit"


@pytest.mark.parametrize("how", ["filesystem", "rlimit"])
async def test_disk_full(harness: Harness, signing: Signing, tmp_path: Path, how: str) -> None:
    """A small filesystem under the audit directory, filled up and freed again. Where no
    filesystem can be mounted, the equivalent: the worker's file size limit (RLIMIT_FSIZE,
    writes then fail with EFBIG as they would with ENOSPC) lowered and raised again."""
    audit_dir, instance = tmp_path / "small-disk", "worker-disk-full"
    audit_dir.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(audit_dir)]
    if how == "rlimit":
        command = ["false"]
    mounted = subprocess.run(command, capture_output=True, check=False)  # noqa: ASYNC221 — before any worker
    try:
        filler = audit_dir / "filler"
        async with own_worker(harness, instance, audit_dir):
            pid = str(harness.workers[instance].pid)

            def fill() -> None:
                if mounted.returncode == 0:
                    fill_filesystem(filler)
                else:
                    size = (audit_dir / instance / "service.jsonl").stat().st_size
                    subprocess.run(
                        ["prlimit", "--pid", pid, f"--fsize={size}:"], check=True
                    )  # soft limit only

            def free() -> None:
                if mounted.returncode == 0:
                    filler.unlink()
                else:
                    subprocess.run(["prlimit", "--pid", pid, "--fsize=unlimited:"], check=True)

            got = await assert_refused_then_recovers(signing, fill, free, slack=8)
        files = sorted((audit_dir / instance).glob("*.jsonl"))
        result = verify(harness, files)
        assert result.returncode == 0, result.stdout
        assert_one_truthful_record(files, got)
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(audit_dir)], check=False)  # noqa: ASYNC221


async def test_unwritable_audit_file(harness: Harness, signing: Signing, audit_dir: Path) -> None:
    instance = "worker-unwritable"
    service = audit_dir / instance / "service.jsonl"
    async with own_worker(harness, instance, audit_dir):
        process = harness.workers[instance]

        def make_unwritable() -> None:
            service.rename(service.with_suffix(".jsonl.1"))
            service.mkdir()  # the worker must open a file where now stands a directory
            os.kill(process.pid, signal.SIGHUP)
            time.sleep(0.2)

        got = await assert_refused_then_recovers(signing, make_unwritable, lambda: service.rmdir())
    result = verify(harness, [service.with_suffix(".jsonl.1"), service])
    assert result.returncode == 0, result.stdout
    assert_one_truthful_record([service.with_suffix(".jsonl.1"), service], got)


async def test_audit_archive_unroutable(harness: Harness, signing: Signing, audit_dir: Path) -> None:
    """With ``sam.audit.archive`` gone, every batch is returned unroutable: callers get
    audit_unavailable, and afterwards the file and the archive (declared again) hold
    each of those requests exactly once, as the 503 its caller got."""
    definitions = harness.stack.path("rabbitmq", "definitions.json")
    instance = "worker-unroutable"
    async with own_worker(harness, instance, audit_dir):
        since = datetime.datetime.now(datetime.UTC)

        def unroute() -> None:
            harness.stack.rabbitmqctl("delete_queue", "-p", "sam", "sam.audit.archive")

        got = await assert_refused_then_recovers(
            signing, unroute, lambda: harness.stack.rabbitmqctl("import_definitions", str(definitions))
        )
    files = sorted((audit_dir / instance).glob("*.jsonl"))
    assert verify(harness, files).returncode == 0
    assert_one_truthful_record(files, got)
    (refused,) = [request_id for request_id, status in got.items() if status == 503]
    archived = [r for r in await read_archive(harness, since) if r["request_id"] == refused]
    assert [(r["status"], r["error_code"]) for r in archived] == [(503, "audit_unavailable")]


async def read_archive(harness: Harness, since: datetime.datetime) -> list[dict[str, Any]]:
    """The records ``sam-admin audit archive`` prints from ``since``, as a SIEM reads
    them back (it exits 1 if what it read does not verify)."""
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "worker.cli.admin",
            "audit",
            "archive",
            "--profile",
            str(harness.stack.profile("siem-1")),
            "--since",
            since.isoformat(),
            "--infrastructure",
            str(harness.stack.infrastructure_file),
            "--idle-timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    entries = [orjson.loads(line) for line in result.stdout.splitlines()]
    return [e for e in entries if e["type"] == "record"]


async def test_a_siem_queue_cannot_veto_signing(harness: Harness, signing: Signing, audit_dir: Path) -> None:
    """The SIEM's queue on sam.audit rejects every publish (a policy: ``max-length 0``,
    ``reject-publish``, as a full queue with that overflow would). Signing goes on: the
    archive's confirm alone counts. What the SIEM's queue missed it reads back from the
    archive."""
    stack = harness.stack
    definition = '{"max-length": 0, "overflow": "reject-publish"}'
    try:
        async with own_worker(harness, "worker-vetoed", audit_dir):
            since = datetime.datetime.now(datetime.UTC)
            stack.rabbitmqctl("set_policy", "-p", VHOST, "--apply-to", "queues", "siem-rejects",
                              f"^{re.escape(siem_queue('siem-1'))}$", definition)  # fmt: skip
            sent = [await signing.send() for _ in range(10)]
            assert [reply.status for _, reply in sent] == [200] * 10
    finally:
        stack.rabbitmqctl("clear_policy", "-p", VHOST, "siem-rejects", check=False)
    archived = Counter(r["request_id"] for r in await read_archive(harness, since))
    assert all(archived[request_id] == 1 for request_id, _ in sent)


async def test_sigkill_mid_batch(harness: Harness, signing: Signing, audit_dir: Path) -> None:
    instance = "worker-killed"
    env = {"SAM_AUDIT_DIR": str(audit_dir), "SAM_AUDIT_TIMEOUT_SECONDS": str(AUDIT_TIMEOUT)}
    async with harness.without_shared_workers():
        process = await asyncio.to_thread(harness.start_worker, instance, env=env)
        pending = [asyncio.create_task(signing.send(reply_timeout=60)) for _ in range(150)]
        await asyncio.sleep(0.4)
        process.kill()  # SIGKILL, mid-load
        await asyncio.to_thread(process.wait, 10)
        harness.workers.pop(instance)
        await asyncio.to_thread(harness.start_worker, instance, env=env)
        try:
            replies = await asyncio.gather(*pending)
        finally:
            await harness.stop_worker(instance)
    files = sorted((audit_dir / instance).glob("*.jsonl"))
    result = verify(harness, files)
    assert result.returncode == 0, result.stdout
    records = records_in(files)
    confirmed = {request_id for request_id, reply in replies if reply.status == 200}
    assert confirmed, [r.json() for _, r in replies][:3]
    # At most one result made per request, and every answer recorded. A redelivery of one
    # answered before the kill is a repeat, answered with that result and recorded as such;
    # the record of its making may have died in the batch the kill cut (its reply never
    # left then: the repeat's record is the one of the answer the caller got).
    answered = Counter(r["request_id"] for r in records if r["status"] == 200)
    made = Counter(
        r["request_id"]
        for r in records
        if r["status"] == 200 and not (r.get("detail") or "").startswith("a repeat")
    )
    assert all(made[request_id] <= 1 and answered[request_id] >= 1 for request_id in confirmed)
    # redelivered requests are answered with their result, not refused as replays
    assert {reply.status for _, reply in replies} == {200}


async def test_siem_tail_verifies_what_it_prints(harness: Harness, signing: Signing) -> None:
    """``audit tail`` reads the SIEM's own queue, which the definitions declare and bind
    (the SIEM may do neither), verifying each entry as it prints it."""
    queue = siem_queue("siem-1")
    harness.stack.rabbitmqctl("purge_queue", "-p", VHOST, queue)  # what earlier tests left
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli.admin",
        "audit",
        "tail",
        "--profile",
        str(harness.stack.profile("siem-1")),
        "--infrastructure",
        str(harness.stack.infrastructure_file),
        "--idle-timeout",
        "8",  # the first entry comes after the tail's own start-up and the first signature
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    sent = [await signing.send() for _ in range(10)]
    stdout, stderr = await asyncio.wait_for(tail.communicate(), 30)
    assert tail.returncode == 0, stderr.decode()
    entries = [orjson.loads(line) for line in stdout.splitlines()]
    printed = {e.get("request_id") for e in entries}
    assert {request_id for request_id, _ in sent} <= printed
    assert any(e["type"] == "checkpoint" for e in entries)


def test_export_key_prints_the_audit_public_key(harness: Harness) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli.admin",
            "audit",
            "export-key",
            "--infrastructure",
            str(harness.stack.infrastructure_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    infrastructure = json.loads(harness.stack.infrastructure_file.read_text())
    assert result.stdout == infrastructure["audit_key"]["public_key"]
    assert result.stdout.startswith("-----BEGIN PUBLIC KEY-----")
