"""The audit trail's failure path, on real files, with the broker's side played by
callables that take, refuse or sit on a batch: for each kind of sink failure, eight
requests during the outage each get ``audit_unavailable`` within the bound, the trail
tries a bounded number of batches (backing off), the log says the outage once when it
begins and once when it ends, and afterwards every copy of the trail — the file, the
archive, the live feed — holds exactly one record per request id, saying what the
caller got (``503`` for the eight, ``200`` for a request after the repair).

What each kind gets:

============================  =============================================================
kind                          what the trail does
============================  =============================================================
disk full (``/dev/full``)     write fails (ENOSPC): nothing leaves the worker
file unopenable (directory)   open fails (EISDIR): nothing leaves the worker
hung file (FIFO, no reader)   the write hangs in the I/O thread: callers get 503 at their
                              bound, no further try until it returns; then it is cut off
fsync fails (EIO)             the archive may hold the batch: cut from the file, retracted
                              by the next checkpoint
archive nack / no route       refused for sure: cut from the file, nothing to retract
archive confirm never comes   cut from the file; the batch arrives late: retracted
broker gone                   the publish fails at once: cut from the file, retracted
SIEM queue refuses (feed)     nothing: the feed is published after the commit, never
                              waited for; the refusal is counted and logged once
============================  =============================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker.audit_trail import ArchiveRefused, AuditTrail
from worker.domain.audit import AuditEvent, AuditLog, Outcome, VerifyReport, verify_entries
from worker.errors import ErrorCode, SamError
from worker.fakes import SoftwareHsm

TIMEOUT = 0.5
FAST = ((0.05, 0.1, 0.2), (0.3, 0.6))  # the schedule's shape, scaled down for a unit test


@dataclass
class Broker:
    """The broker's side: the archive (confirmed) and the live feed (never waited for)."""

    mode: str = "ok"  # ok | nack | late | gone
    archive: list[bytes] = field(default_factory=list)
    feed: list[bytes] = field(default_factory=list)
    feed_refuses: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def to_archive(self, body: bytes) -> None:
        if self.mode == "nack":
            raise ArchiveRefused("DeliveryError")
        if self.mode == "gone":
            raise ConnectionError("connection lost")
        if self.mode == "late":  # the broker takes it, but the confirm comes too late
            await self.release.wait()
        self.archive.append(body)

    async def to_feed(self, body: bytes, routing_key: str) -> None:
        if self.feed_refuses:
            raise ConnectionError("a SIEM queue rejected it")
        self.feed.append(body)


@dataclass
class Rig:
    trail: AuditTrail
    broker: Broker
    path: Path
    key: ec.EllipticCurvePublicKey
    signatures: list[float]

    async def record(self, request_id: str) -> int:
        """One request's record: the status its caller gets."""
        event = AuditEvent(
            AuditLog.service, "signatures.create", Outcome.success, 200, actor="ssa-1", request_id=request_id
        )
        try:
            await self.trail.record(event)
        except SamError as refused:
            assert refused.code is ErrorCode.audit_unavailable
            return 503
        return 200

    def rotate(self, replacement: Callable[[Path], None]) -> None:
        """Move the file aside (as logrotate does) and put ``replacement`` in its place."""
        rotated = self.path.with_name(f"{self.path.name}.{len(list(self.path.parent.glob('*.jsonl.*'))) + 1}")
        if self.path.is_file() and not self.path.is_symlink():
            self.path.rename(rotated)
        else:
            _remove(self.path)
        replacement(self.path)
        self.trail.reopen()

    def copies(self) -> dict[str, list[bytes]]:
        files = sorted(
            p for p in self.path.parent.glob("service.jsonl*") if p.is_file() and not p.is_symlink()
        )
        lines = [line for p in files for line in p.read_bytes().splitlines()]
        return {
            "file": lines,
            "archive": [line for body in self.broker.archive for line in body.splitlines()],
            "feed": [line for body in self.broker.feed for line in body.splitlines()],
        }


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    hsm = SoftwareHsm()
    signatures: list[float] = []

    async def sign(digest: bytes) -> bytes:
        signatures.append(time.monotonic())
        return await hsm.sign_audit_digest(digest)

    broker = Broker()
    trail = AuditTrail(
        "node-1", "w", tmp_path, sign, broker.to_archive, TIMEOUT, feed=broker.to_feed, backoff=FAST
    )
    trail.start()
    key = serialization.load_pem_public_key(hsm.audit_public_pem().encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    rig = Rig(trail, broker, tmp_path / "w" / "service.jsonl", key, signatures)
    try:
        yield rig
    finally:
        broker.release.set()
        await trail.close()


def _verified(rig: Rig, copy: str, lines: list[bytes]) -> tuple[VerifyReport, list[dict[str, Any]]]:
    report = verify_entries([(copy, n, line) for n, line in enumerate(lines, 1)], rig.key)
    assert report.ok, (copy, [str(p) for p in report.problems])
    entries = [(f"{copy}:{n}", orjson.loads(line)) for n, line in enumerate(lines, 1)]
    return report, [e for where, e in entries if e["type"] == "record" and where not in report.retracted]


async def _outage(rig: Rig, caplog: pytest.LogCaptureFixture, breakage: Any, repair: Any) -> dict[str, int]:
    """Eight requests while the sink is broken, one after the repair; returns what each
    caller got, by request id, after checking every copy of the trail against it."""
    assert await rig.record("before") == 200
    caplog.set_level(logging.INFO, logger="worker.audit_trail")
    caplog.clear()
    breakage()
    tries_before = rig.trail.tries
    got: dict[str, int] = {}

    async def request(n: int) -> None:
        await asyncio.sleep(n * 0.1)  # a trickle across a few backoff steps
        request_id, started = f"during-{n}-{uuid.uuid4().hex[:6]}", time.monotonic()
        got[request_id] = await rig.record(request_id)
        assert time.monotonic() - started <= TIMEOUT + 0.2, "answered within the bound"

    await asyncio.gather(*(request(n) for n in range(8)))
    tries_during = rig.trail.tries - tries_before
    await repair()
    for attempt in range(20):  # the next try comes at the backoff's next step
        got[f"after-{attempt}"] = status = await rig.record(f"after-{attempt}")
        if status == 200:
            break
    await rig.trail.close()
    assert (
        set(got.values()) >= {503, 200} and [s for r, s in got.items() if r.startswith("during")] == [503] * 8
    )
    assert tries_during <= 8, f"{tries_during} batches tried for 8 requests"

    failing = [r for r in caplog.records if "audit sink failing" in r.getMessage()]
    back = [r for r in caplog.records if "audit sink back" in r.getMessage()]
    assert len(failing) == 1 and failing[0].levelno == logging.ERROR, [r.getMessage() for r in caplog.records]
    assert len(back) == 1 and "replies withheld" in back[0].getMessage()

    for copy, lines in rig.copies().items():
        _, records = _verified(rig, copy, lines)
        per_request = Counter(r["request_id"] for r in records)
        for request_id, status in got.items():
            assert per_request[request_id] == 1, (copy, request_id, per_request[request_id])
            (record,) = [r for r in records if r["request_id"] == request_id]
            assert record["status"] == status, (copy, request_id, record)
            if status == 503:
                assert record["error_code"] == "audit_unavailable"
                assert record["detail"].startswith("reply withheld:")
    return got


async def _noop() -> None:
    return None


async def test_disk_full(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Every write fails with ENOSPC (the file is /dev/full)."""

    async def repair() -> None:
        rig.rotate(lambda path: path.touch())

    await _outage(rig, caplog, lambda: rig.rotate(lambda path: path.symlink_to("/dev/full")), repair)


async def test_file_unopenable(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A directory stands where the file must be opened (EISDIR — as root, a missing
    permission would not stop the open)."""

    async def repair() -> None:
        rig.rotate(lambda path: None)

    await _outage(rig, caplog, lambda: rig.rotate(lambda path: path.mkdir()), repair)


async def test_hung_file(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO nobody reads: the open hangs in the I/O thread. Callers get 503 at their
    bound; no other batch is tried while it hangs; once it returns, the batch is cut
    off, and the original (200) record is never written beside the withheld one."""
    drained: list[bytes] = []

    def drain(path: Path) -> None:
        with path.open("rb") as fifo:
            drained.append(fifo.read())

    async def repair() -> None:
        # a file in its place first, then a reader lets the hung open return
        hung = rig.path.with_name("service.fifo")
        rig.path.rename(hung)
        rig.trail.reopen()
        reader = threading.Thread(target=drain, args=(hung,), daemon=True)
        reader.start()
        await asyncio.to_thread(reader.join, 5)

    tries_before = rig.trail.tries
    await _outage(rig, caplog, lambda: rig.rotate(lambda path: os.mkfifo(path)), repair)
    # one try hung; every later caller during the outage was answered without one
    assert rig.trail.tries - tries_before <= 4


async def test_fsync_fails(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write goes through, the archive confirms, the fsync fails (EIO): the batch is
    cut from the file, and the next committed checkpoint retracts the archive's copy."""
    real_fsync = os.fsync
    broken = {"on": False}

    def fsync(fd: int) -> None:
        if broken["on"] and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "service.jsonl":
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)  # the trail calls os.fsync

    async def repair() -> None:
        broken["on"] = False

    await _outage(rig, caplog, lambda: broken.update(on=True), repair)
    report, _ = _verified(rig, "archive", rig.copies()["archive"])
    assert report.retracted, "the archive's copies of the cut batches are retracted"


@pytest.mark.parametrize("mode", ["nack", "gone"])
async def test_archive_refuses_or_is_gone(rig: Rig, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    """A nack or a returned (unroutable) batch is refused for sure: nothing to retract.
    A lost connection leaves it open whether the broker took it: the file is cut all
    the same, and the next checkpoint retracts it in case."""

    async def repair() -> None:
        rig.broker.mode = "ok"

    await _outage(rig, caplog, lambda: setattr(rig.broker, "mode", mode), repair)
    files = rig.copies()["file"]
    assert sum(b'"retracts"' in line for line in files) == (1 if mode == "gone" else 0)


async def test_archive_confirm_never_comes(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The broker sits on the batch past the bound and takes it later: the archive then
    holds a batch the file does not — retracted by the next committed checkpoint, so the
    archive still verifies and says each request once."""

    async def repair() -> None:
        rig.broker.release.set()
        await asyncio.sleep(0.05)
        rig.broker.mode = "ok"

    await _outage(rig, caplog, lambda: setattr(rig.broker, "mode", "late"), repair)
    report, _ = _verified(rig, "archive", rig.copies()["archive"])
    assert report.retracted


async def test_a_siem_queue_that_refuses_cannot_veto(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live feed is published after the commit and never waited for: a refusing
    SIEM queue costs no signature its reply, and is logged once, not per batch (and
    over once the feed has worked for a quiet while: here no while at all)."""
    monkeypatch.setattr("worker.audit_trail.FEED_QUIET", 0.0)
    caplog.set_level(logging.INFO, logger="worker.audit_trail")
    rig.broker.feed_refuses = True
    assert [await rig.record(f"r-{n}") for n in range(20)] == [200] * 20
    rig.broker.feed_refuses = False
    assert await rig.record("after") == 200
    await rig.trail.close()
    failing = [r for r in caplog.records if "live feed" in r.getMessage() and "failing" in r.getMessage()]
    assert len(failing) == 1
    assert any("live feed" in r.getMessage() and "back after" in r.getMessage() for r in caplog.records)
    archived = Counter(r["request_id"] for r in _verified(rig, "archive", rig.copies()["archive"])[1])
    assert all(archived[f"r-{n}"] == 1 for n in range(20)), "the archive keeps what the feed missed"


async def test_tries_follow_the_backoff_schedule(rig: Rig) -> None:
    """With the archive refusing and callers arriving all the time, batches are tried at
    the schedule's pace, not the callers': the gaps between tries grow to its last step."""
    rig.broker.mode = "nack"
    stop = time.monotonic() + 1.5
    tasks = []
    while time.monotonic() < stop:
        tasks.append(asyncio.create_task(rig.record(uuid.uuid4().hex)))
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks)
    assert set(results) == {503}
    gaps = [b - a for a, b in itertools.pairwise(rig.signatures)]
    assert len(rig.signatures) <= 12, f"{len(rig.signatures)} signatures for {len(results)} requests"
    # after the first three failures every gap is at least the last step (less the wait
    # for a caller to arrive, which here is 10 ms)
    assert all(gap >= FAST[0][-1] - 0.02 for gap in gaps[3:]), gaps


async def test_withheld_records_wait_for_the_sink_without_any_caller(rig: Rig) -> None:
    """With nobody sending, records of withheld replies are tried on the slower probe
    schedule and reach the chain once the sink is back."""
    rig.broker.mode = "nack"
    assert await rig.record("withheld") == 503
    await asyncio.sleep(0.5)
    rig.broker.mode = "ok"
    for _ in range(40):
        await asyncio.sleep(0.05)
        if any(b"withheld" in body for body in rig.broker.archive):
            break
    await rig.trail.close()
    records = _verified(rig, "file", rig.copies()["file"])[1]
    assert [r["status"] for r in records if r["request_id"] == "withheld"] == [503]
    assert len(rig.signatures) <= 5  # before, the failed try, a probe or two, the commit


async def _stuck_on_a_fifo(tmp_path: Path, broker: Broker, **options: Any) -> tuple[AuditTrail, Path]:
    """A trail whose file is a FIFO nobody reads: its first request is refused (503) at
    the bound while the open hangs in the I/O thread."""
    trail = AuditTrail(
        "node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, broker.to_archive, 0.3, **options
    )
    trail.start()
    path = tmp_path / "w" / "service.jsonl"
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    trail.reopen()
    event = AuditEvent(AuditLog.service, "signatures.create", Outcome.success, 200, request_id="hung")
    with pytest.raises(SamError):
        await trail.record(event)
    return trail, path


async def test_a_hung_write_at_shutdown_does_not_keep_the_process(tmp_path: Path) -> None:
    """The I/O thread is a daemon: a write hung for good cannot keep the worker from
    exiting; the withheld record goes to a side file."""
    trail, path = await _stuck_on_a_fifo(tmp_path, Broker())
    started = time.monotonic()
    await trail.close()
    assert time.monotonic() - started < 2
    side = [p for p in path.parent.iterdir() if ".unwritten-" in p.name]
    assert len(side) == 1 and b"hung" in side[0].read_bytes()
    with contextlib.suppress(OSError):  # let the hung open return
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("rotation", ["moved", "removed"])
async def test_a_rotation_without_a_reopen_signal_loses_nothing(rig: Rig, rotation: str) -> None:
    """The file moved away (or deleted) and no SIGHUP follows — a postrotate that failed:
    the next batch goes to a new file at the path, not after the moved one (which
    logrotate would compress and remove) nor into a deleted inode."""
    assert await rig.record("before") == 200
    moved = rig.path.with_name("service.jsonl-1")
    if rotation == "moved":
        rig.path.rename(moved)
    else:
        rig.path.unlink()
    assert await rig.record("after") == 200
    await rig.trail.close()
    assert b'"after"' in rig.path.read_bytes()
    if rotation == "moved":
        assert b'"after"' not in moved.read_bytes() and b'"before"' in moved.read_bytes()
        lines = moved.read_bytes().splitlines() + rig.path.read_bytes().splitlines()
        _verified(rig, "file", lines)


async def test_a_file_operation_hung_for_good_ends_the_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO nobody will ever open for reading: every later batch waits behind the hung
    open, so past ``hung_after`` the trail asks for a restart (``on_hung``, once) instead
    of answering audit_unavailable for ever; the next start refuses the FIFO at once
    rather than hanging in its own read of the file."""
    broker, hung = Broker(), []
    started = time.monotonic()
    trail, path = await _stuck_on_a_fifo(
        tmp_path, broker, on_hung=lambda: hung.append(time.monotonic()), hung_after=1.0
    )
    for _ in range(40):
        if hung:
            break
        await asyncio.sleep(0.1)
    assert len(hung) == 1 and 1.0 <= hung[0] - started < 3.5, hung
    assert "a file operation (write (service.jsonl)) has not returned" in caplog.text
    await asyncio.sleep(1.5)
    assert len(hung) == 1  # once
    await trail.close()
    with pytest.raises(SamError, match="not a regular file"):
        AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, broker.to_archive, 0.3)
    with contextlib.suppress(OSError):  # let the hung open return
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))


async def test_a_sink_that_keeps_returning_is_not_hung(rig: Rig) -> None:
    """Only one operation that does not return counts: a trail busy for longer than the
    limit in all, one batch after another, never calls ``on_hung``."""
    hung: list[float] = []
    trail = AuditTrail(
        "node-1", "slow", rig.path.parent.parent, SoftwareHsm().sign_audit_digest, rig.broker.to_archive, 2.0,
        on_hung=lambda: hung.append(time.monotonic()), hung_after=0.5,
    )  # fmt: skip
    trail.start()
    try:
        for n in range(8):
            event = AuditEvent(
                AuditLog.service, "signatures.create", Outcome.success, 200, request_id=f"s{n}"
            )
            await trail.record(event)
            await asyncio.sleep(0.1)
    finally:
        await trail.close()
    assert hung == []


async def test_fifos_beside_the_log_neither_hang_nor_stop_the_trail(tmp_path: Path) -> None:
    """What else the trail opens, a FIFO in its place: the head file stops the start,
    named (its open would hang the start for good); a side file is left alone, logged;
    the head file's temporary, written after every commit, is skipped — batches go on."""
    broker, folder = Broker(), tmp_path / "w"
    folder.mkdir()

    def trail() -> AuditTrail:
        return AuditTrail("node-1", "w", tmp_path, SoftwareHsm().sign_audit_digest, broker.to_archive, 1.0)

    os.mkfifo(folder / "service.head")
    with pytest.raises(SamError, match=r"service\.head is not a regular file"):
        trail()
    (folder / "service.head").unlink()
    os.mkfifo(folder / "service.unwritten-1")
    os.mkfifo(folder / "service.head.tmp")
    running = trail()
    running.start()
    try:
        for n in range(3):
            event = AuditEvent(
                AuditLog.service, "signatures.create", Outcome.success, 200, request_id=f"r{n}"
            )
            await asyncio.wait_for(running.record(event), 5)
    finally:
        await running.close()
    assert stat.S_ISFIFO((folder / "service.unwritten-1").stat().st_mode)  # left for the operator
