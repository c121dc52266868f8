"""The audit trail of one worker process: group commit of chained records into the
service and admin files and the broker's archive, a signed checkpoint per batch, and a
live feed for SIEMs.

**Commit.** A batch is chained and closed by one checkpoint signature, written to its
file, and then fsynced while the same bytes (one message: the whole batch, JSON lines)
are published to ``sam.audit.archive``, the SAM's own stream (mandatory, confirmed).
The batch is committed only if both hold before the earliest bound of its callers
(``timeout`` after each ``record`` call); ``record`` returns then, and only then. Only a
committed batch goes on to the live feed (``sam.audit``, one message per run of entries
with one routing key ``<log>.<operation>.<outcome>``), and that publication is never
waited for: a SIEM's queue — full, rejecting, slow or absent — cannot hold up or refuse
a signature, and a SIEM that missed entries reads them from the archive.

**One record per request, saying what the caller got.** A batch that is not committed
(a failed or hung write, a failed fsync, a refusal or a missing confirm from the
archive, the bound passed) is cut from its file again (``ftruncate``, in the I/O
thread, after any write still in progress), the chain does not advance, and each of its
callers gets ``audit_unavailable``; their records are queued once more, now saying so
("reply withheld"), and join the next batch that is tried. A batch that may have
reached the archive although it was not committed (its confirm came too late or never)
is named in the ``retracts`` list of the next committed checkpoint, so the archive's
copy shows it as retracted rather than as a fork.

**Bounded failure.** After a failed batch, the next try waits: 0.25, 0.5, 1, then
every 2 s while callers wait (``BACKOFF``; never more than 80 % of ``timeout``, so a
caller who arrives once the sink is back meets a try within its bound), and 5, 10, 20,
40, then every 60 s while only records of withheld replies wait (``PROBE_BACKOFF``).
A caller whose bound passes before a try gets ``audit_unavailable`` at its bound, and
its record costs no signature then. No try starts while the I/O thread is still busy
(a hung write). The log says an outage once when it begins (again only if its cause
changes) and once when it ends, with counts.

**Files.** At start, anything after the last checkpoint (a batch the process died
writing — never confirmed to a caller) is moved to a ``<log>.cut-<time>`` file beside
it (not matched by ``<log>.jsonl*``), and the chain continues from the last checkpoint,
in the file or, after a rotation, in the ``.head`` file beside it. SIGHUP (``reopen``)
closes the files so the next batch opens them anew (logrotate ``create``, no
``copytruncate``); each batch also checks that its file is still the one at the path,
so a rotation without a signal loses nothing either.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker.domain.audit import (
    AuditEvent,
    AuditLog,
    ChainHead,
    Outcome,
    chain_batch_signed_by,
    is_withheld_reply,
    withheld_reply,
)
from worker.errors import ErrorCode, SamError
from worker.metrics import Metrics

__all__ = [
    "BACKOFF",
    "PROBE_BACKOFF",
    "ArchiveRefused",
    "AuditTrail",
    "audit_file",
    "runs_by_routing_key",
]

log = logging.getLogger(__name__)

MAX_BATCH = 512
MAX_WITHHELD = 100_000
MAX_FEED_BACKLOG = 1_000  # committed batches waiting for the live feed; beyond, the archive has them
# Seconds before the next try after 1, 2, 3… failed batches in a row, while callers wait
# (the last value repeats; below the default bound of 5 s, so a sink that is back serves
# the next caller within one bound) …
BACKOFF = (0.25, 0.5, 1.0, 2.0)
# … and while only records of withheld replies wait (no caller is held by them).
PROBE_BACKOFF = (5.0, 10.0, 20.0, 40.0, 60.0)
FEED_QUIET = 10.0  # seconds of success before a feed outage counts as over
MIN_TRY = 0.05  # a caller with less time left than this is not worth a checkpoint signature
GRACE = 1.0  # how long a caller whose bound passed waits for a try in flight to settle it
HUNG_MIN_SECONDS = 30.0  # a file operation hung this long (at least; 10 bounds) ends the process


class ArchiveRefused(Exception):
    """The broker definitely did not take a batch into the archive (nack, unroutable) —
    unlike a timeout or a lost connection, after which it may hold it."""


def audit_file(audit_dir: Path, instance: str, audit_log: AuditLog) -> Path:
    """Where a worker instance writes one of its audit logs."""
    return audit_dir / instance / f"{audit_log}.jsonl"


def _regular_file_at(path: Path) -> bool:
    """Whether a regular file is at ``path`` (False: nothing is). Anything else — a FIFO,
    whose open would hang this start for good, a device, a folder — stops the start,
    named, for the operator to move away."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise SamError(ErrorCode.audit_unavailable, f"{path} is not a regular file: move it away")
    return True


def _recover(path: Path, head_file: Path) -> tuple[ChainHead, list[str], set[str]]:
    """Cut an incomplete last batch off ``path``; return where the chain stands, the
    checkpoints still to retract (see the module docstring) and which side-file lines
    the file's committed records were read back from (``_read_back_unwritten``)."""
    head, retracts = ChainHead(), []
    read_back: set[str] = set()
    if _regular_file_at(head_file):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            saved = orjson.loads(head_file.read_bytes())
            head = ChainHead(int(saved["seq"]), str(saved["hash"]))
            retracts = [str(h) for h in saved.get("retracts", [])]
    if not _regular_file_at(path):
        return head, retracts, read_back
    keep, in_file = 0, None
    batch_read_back: set[str] = set()
    with path.open("rb") as handle:
        offset = 0
        for line in handle:
            offset += len(line)
            if not line.endswith(b"\n"):
                break
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                break
            if isinstance(detail := entry.get("detail"), str) and (found := _READ_BACK.match(detail)):
                batch_read_back.add(f"{found['file']}:{found['line']}")
            if entry.get("type") == "checkpoint":
                keep, in_file = offset, ChainHead(int(entry["seq"]), str(entry["hash"]))
                read_back |= batch_read_back
                batch_read_back = set()
    if path.stat().st_size != keep:
        # Kept beside the file for the auditor's eyes, never silently dropped; named so
        # that the files' glob (``service.jsonl*``) never takes it for the trail.
        cut = path.with_name(f"{path.stem}.cut-{int(time.time())}")
        log.warning("audit: moving an unfinished batch from %s to %s", path, cut)
        with path.open("r+b") as handle:
            handle.seek(keep)
            cut.write_bytes(handle.read())
            handle.truncate(keep)
            os.fsync(handle.fileno())
    if in_file is None or in_file == head:  # rotated away, or the file agrees: the head file speaks
        return head, retracts, read_back
    return (in_file, [], read_back) if in_file.seq >= head.seq else (head, retracts, read_back)


@dataclass
class _Pending:
    event: AuditEvent
    time_ms: int
    done: asyncio.Future[dict[str, Any]] | None  # None: nobody waits (a withheld reply's record)
    deadline: float = 0.0  # monotonic; the caller's bound
    in_flight: bool = False
    origin: Path | None = None  # the side file it was read back from, at start


def runs_by_routing_key(lines: list[bytes], routing: list[str]) -> list[tuple[bytes, str]]:
    """Consecutive entries with one routing key, joined as JSON lines: published on one
    channel in this order, a consumer reads every chain in order."""
    runs: list[tuple[bytes, str]] = []
    start = 0
    for index in range(1, len(lines) + 1):
        if index == len(lines) or routing[index] != routing[start]:
            runs.append((b"".join(line + b"\n" for line in lines[start:index]), routing[start]))
            start = index
    return runs


_READ_BACK = re.compile(r"\[read back from the unsigned side file (?P<file>\S+), line (?P<line>\d+)\]")


def _unwritten_record(line: bytes, side: Path, number: int) -> tuple[AuditEvent, int]:
    """One line of a side file (``_keep_unwritten_withheld``) as the event it keeps.

    The file is not signed, so whoever can write into the audit directory could put lines
    there that the next start would sign into the chain. Only what such a file can ever
    hold is taken — a withheld reply (``503 audit_unavailable``) — and the record says
    where it came from, so the signature vouches for the reading, not for the content."""
    data = orjson.loads(line)
    event = AuditEvent(
        log=AuditLog(data["log"]),
        operation=str(data["operation"]),
        outcome=Outcome(data["outcome"]),
        status=int(data["status"]),
        **{name: None if data.get(name) is None else str(data[name]) for name in _OPTIONAL_TEXT},
        dtbs_sha256=tuple(str(d) for d in data.get("dtbs_sha256") or ()),
    )
    if not is_withheld_reply(event):
        raise ValueError("not a withheld reply")
    said = " ".join((event.detail or "reply withheld").split())[:500]
    detail = f"[read back from the unsigned side file {side.name}, line {number}] {said}"
    return dataclasses.replace(event, detail=detail), int(data["time_ms"])


_OPTIONAL_TEXT = ("error_code", "actor", "request_id", "signer", "key_pair", "sad_jti", "detail")


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _describe(failure: BaseException | None) -> str:
    strerror = failure.strerror if isinstance(failure, OSError) else None
    return f"{type(failure).__name__}: {strerror}" if strerror else type(failure).__name__


@dataclass
class _Log:
    path: Path
    head_file: Path
    head: ChainHead
    retracts: list[str] = field(default_factory=list)  # for the next committed checkpoint
    pending: list[_Pending] = field(default_factory=list)  # callers waiting, in arrival order
    withheld: list[_Pending] = field(default_factory=list)  # records of withheld replies, to write
    handle: Any = None


@dataclass
class _Written:
    """What the I/O thread knows of one batch's write: where the file ended before it,
    and a descriptor of that file of its own (a SIGHUP may close the trail's handle
    before the batch is decided)."""

    size: int | None = None
    fd: int | None = None

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class _Outage:
    """One outage of a sink, logged once when it begins (again if its cause changes) and
    once when it ends, with counts — never a line per failed try."""

    def __init__(self, what: str, consequence: str, counts_replies: bool = True) -> None:
        self._what, self._consequence, self._counts_replies = what, consequence, counts_replies
        self.since: float | None = None
        self.tries = 0
        self.withheld = 0
        self.reason = ""

    def failed(self, reason: str, next_try: float | None = None) -> None:
        self.tries += 1
        if self.since is None:
            self.since = time.monotonic()
            retry = "" if next_try is None else f" (next try in {next_try:.2f} s, backing off)"
            log.error("%s failing: %s; %s%s", self._what, reason, self._consequence, retry)
        elif reason != self.reason:
            log.warning("%s still failing, now: %s (%d tries so far)", self._what, reason, self.tries)
        self.reason = reason

    def ended(self) -> None:
        if self.since is None:
            return
        log.warning(
            "%s back after %.1f s: %d tries failed%s",
            self._what,
            time.monotonic() - self.since,
            self.tries,
            f", {self.withheld} replies withheld (their records now in the chain)"
            if self._counts_replies
            else "",
        )
        self.since, self.tries, self.withheld, self.reason = None, 0, 0, ""


class _IoThread(concurrent.futures.Executor):
    """One daemon thread that runs the trail's file jobs in order. A daemon, unlike a
    ``ThreadPoolExecutor``'s thread, so a write hung for good (a dead NFS server, a FIFO)
    cannot keep the process from exiting."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ]
        self._jobs = queue.SimpleQueue()
        self.running_since: float | None = None  # monotonic start of the job in hand
        self._running: tuple[Callable[..., Any], tuple[Any, ...]] | None = None  # and what it is
        self._thread = threading.Thread(target=self._run, name="audit-io", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((future, lambda: fn(*args, **kwargs), (fn, args)))
        return future

    def running(self) -> str:
        """What the job in hand is (described only when asked: a hung job's message)."""
        if self._running is None:
            return "none"
        fn, args = self._running
        what = str(getattr(fn, "__name__", "a file job")).lstrip("_")
        if args and isinstance(args[0], _Log):
            what += f" ({args[0].path.name})"
        return what

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call, self._running = job
            if not future.set_running_or_notify_cancel():
                continue
            self.running_since = time.monotonic()
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to whoever awaits the job
                future.set_exception(exc)
            finally:
                self.running_since = None

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        self._jobs.put(None)
        if wait:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("audit: a file write is still hung at shutdown; leaving it behind")


class AuditTrail:
    """The ``AuditSink`` of a worker process (see the module docstring): records are
    answered only once their batch is committed — durable in its file and confirmed by
    the archive — else ``audit_unavailable`` within ``timeout``."""

    def __init__(
        self,
        node: str,
        instance: str,
        audit_dir: Path,
        sign_digest: Callable[[bytes], Awaitable[bytes]],
        archive: Callable[[bytes], Awaitable[None]],
        timeout: float,
        metrics: Metrics | None = None,
        feed: Callable[[bytes, str], Awaitable[None]] | None = None,
        backoff: tuple[tuple[float, ...], tuple[float, ...]] = (BACKOFF, PROBE_BACKOFF),
        on_hung: Callable[[], None] | None = None,
        hung_after: float | None = None,
    ) -> None:
        self._metrics = metrics
        # A file operation that never returns (a FIFO put at the path, a dead NFS server)
        # leaves every later batch waiting behind it: past this, ``on_hung`` is called once
        # (the worker exits for a restart) rather than answering 503 for ever.
        self._on_hung = on_hung
        self._hung_after = hung_after if hung_after is not None else max(HUNG_MIN_SECONDS, 10 * timeout)
        self._watcher: asyncio.Task[None] | None = None
        self._node = node
        self._instance = instance
        self._sign = sign_digest
        self._archive = archive
        self._feed = feed
        self._timeout = timeout
        # never longer than most of the bound: a caller who arrives once the sink is back
        # meets a try within its bound
        self._backoff = tuple(min(step, 0.8 * timeout) for step in backoff[0])
        self._probe_backoff = backoff[1]
        self._logs: dict[AuditLog, _Log] = {}
        # side files read back at start: records taken and not chained yet, and whether
        # all the file holds was taken (only then may it go)
        self._side_files: dict[Path, tuple[int, bool]] = {}
        for audit_log in AuditLog:
            path = audit_file(audit_dir, instance, audit_log)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            head_file = path.with_suffix(".head")
            head, retracts, read_back = _recover(path, head_file)
            self._logs[audit_log] = _Log(path, head_file, head, retracts)
            self._read_back_unwritten(self._logs[audit_log], read_back)
        # One thread does all file I/O, so a slow disk never stalls the event loop and
        # writes stay in order.
        self._io = _IoThread()
        self._io_tail: asyncio.Future[Any] | None = None  # the last file job handed to it
        self._wakeup = asyncio.Event()
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        self._feeder: asyncio.Task[None] | None = None
        self._feed_backlog: asyncio.Queue[list[tuple[bytes, str]]] = asyncio.Queue(MAX_FEED_BACKLOG)
        self._failing_since: float | None = None  # monotonic time of the first failure since a success
        self._failures = 0  # failed tries in a row
        self._retry_at = 0.0  # monotonic: no try for waiting callers before
        self._probe_at = 0.0  # monotonic: no try for withheld records alone before
        self._outage = _Outage("audit sink", "callers get audit_unavailable")
        self._feed_outage = _Outage(
            "audit live feed (sam.audit)", "SIEMs read what they miss from the archive", counts_replies=False
        )
        self._final_try = False  # at shutdown, withheld records get one more try
        self.tries = 0  # batches tried: each one checkpoint signature

    def failing_for(self) -> float:
        """Seconds since batches began to fail without one succeeding since (0: none
        failing) — readiness turns false once this passes the audit bound."""
        return 0.0 if self._failing_since is None else time.monotonic() - self._failing_since

    def writable(self) -> bool:
        """Whether both audit files can be opened for appending now (for readiness);
        never blocks (a FIFO without a reader is not writable)."""
        try:
            for state in self._logs.values():
                os.close(os.open(state.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o640))
        except OSError:
            return False
        return True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flusher = loop.create_task(self._flush_forever())
        if self._feed is not None:
            self._feeder = loop.create_task(self._feed_forever())
        if self._on_hung is not None:
            self._watcher = loop.create_task(self._watch_io(self._on_hung))

    async def _watch_io(self, on_hung: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._hung_after / 10))
            since = self._io.running_since
            if since is not None and time.monotonic() - since > self._hung_after:
                log.critical(
                    "audit: a file operation (%s) has not returned for %.0f s: a FIFO or a hung file "
                    "system in %s?",
                    self._io.running(),
                    time.monotonic() - since,
                    next(iter(self._logs.values())).path.parent,
                )
                on_hung()
                return

    def reopen(self) -> None:
        """Close the files now, so the next batch opens them anew (logrotate moved them).

        Done at once, in the I/O thread after any write in progress: a worker idle
        between two rotations must not keep writing into a file that logrotate has
        since compressed and removed."""
        self._io.submit(self._close_files)

    def _close_files(self) -> None:
        for state in self._logs.values():
            if state.handle is not None:
                state.handle.close()
                state.handle = None

    # --- callers ------------------------------------------------------------------------

    async def record(self, event: AuditEvent) -> dict[str, Any]:
        if self._closed or self._flusher is None:
            raise SamError(ErrorCode.audit_unavailable, "the audit trail is not running")
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(event, int(time.time() * 1000), done, time.monotonic() + self._timeout)
        self._logs[event.log].pending.append(pending)
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(done)
        if not pending.in_flight:  # no try holds it: the bound decides, without a signature
            self._withhold(pending, f"audit record not durable within {self._timeout} s")
        # A try in flight has this very bound as its deadline and settles it at once;
        # the grace only covers the event loop's scheduling.
        try:
            async with asyncio.timeout(GRACE):
                return await asyncio.shield(done)
        except TimeoutError:
            log.error("audit: a batch in flight did not settle within its bound; withholding its reply")
            self._withhold(pending, f"audit record not durable within {self._timeout} s")
            return await done  # raises what _withhold set

    def _withhold(self, pending: _Pending, why: str) -> None:
        """Decide once that a caller gets audit_unavailable, and queue the record saying so."""
        assert pending.done is not None
        if pending.done.done():
            return
        pending.done.set_exception(SamError(ErrorCode.audit_unavailable, why))
        self._outage.withheld += 1
        if self._metrics is not None:
            self._metrics.audit_withheld.inc()
        state = self._logs[pending.event.log]
        if len(state.withheld) >= MAX_WITHHELD:
            log.critical(
                "audit: %d withheld-reply records waiting; not keeping %s",
                MAX_WITHHELD,
                pending.event.request_id,
            )
            return
        state.withheld.append(_Pending(withheld_reply(pending.event, why), int(time.time() * 1000), None))

    # --- the flusher ----------------------------------------------------------------------

    def _fresh(self, state: _Log, now: float) -> list[_Pending]:
        """Callers still waiting with time enough for a try."""
        return [
            p
            for p in state.pending
            if p.done is not None and not p.done.done() and p.deadline - now >= MIN_TRY
        ]

    def _io_idle(self) -> bool:
        return self._io_tail is None or self._io_tail.done()

    async def _work_due(self) -> bool:
        """Wait until a try is due (something waits, its backoff has passed, the I/O
        thread is free); False once closed with nothing left to try."""
        while True:
            self._wakeup.clear()
            now = time.monotonic()
            for state in self._logs.values():  # settled callers leave the queue
                state.pending = [p for p in state.pending if p.done is not None and not p.done.done()]
            fresh = any(self._fresh(state, now) for state in self._logs.values())
            withheld = any(state.withheld for state in self._logs.values())
            due: float | None = None
            if fresh:
                due = self._retry_at
            elif withheld and not self._closed:
                due = self._probe_at
            elif withheld and not self._final_try:
                due = now  # at shutdown, one more try for them, then a side file
            if due is None and self._closed:
                return False
            if due is not None and due <= now and self._io_idle():
                self._final_try = self._closed and not fresh
                return True
            timeout = None if due is None or not self._io_idle() else max(due - now, 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _flush_forever(self) -> None:
        while await self._work_due():
            now = time.monotonic()
            for audit_log, state in self._logs.items():
                fresh = self._fresh(state, now)[:MAX_BATCH]
                if not fresh and not state.withheld:
                    continue
                batch, state.withheld = state.withheld[:MAX_BATCH] + fresh, state.withheld[MAX_BATCH:]
                await self._try(audit_log, state, batch)

    async def _try(self, audit_log: AuditLog, state: _Log, batch: list[_Pending]) -> None:
        """Chain, sign, write and archive one batch; commit it or fail it (see the module
        docstring) — decided here, once, by the earliest bound of its callers."""
        waiters = [p for p in batch if p.done is not None]
        deadline = min((p.deadline for p in waiters), default=time.monotonic() + self._timeout)
        for pending in batch:
            pending.in_flight = True
        self.tries += 1
        where = _Written()
        try:
            reason = await self._commit(audit_log, state, batch, deadline, where)
        except asyncio.CancelledError:
            # stopped mid-try (the shutdown's bound): the batch must not vanish with the
            # task — its records go back to be kept in a side file
            self._io_job(self._cut, where)
            self._failed(state, batch, "the audit trail stopped")
            raise
        except Exception as exc:  # the flusher must outlive any one batch
            log.exception("audit batch failed unexpectedly")
            reason = f"audit failed ({type(exc).__name__})"
            self._io_job(self._cut, where)
        finally:
            for pending in batch:
                pending.in_flight = False
        if reason is not None:
            self._failed(state, batch, reason)

    async def _commit(
        self, audit_log: AuditLog, state: _Log, batch: list[_Pending], deadline: float, where: _Written
    ) -> str | None:
        """The batch committed (``None``), or why not — with the file cut back already
        queued and the batch queued for retraction where the archive may hold it."""
        try:
            # bounded by the batch's deadline: an HSM that hangs must not hold the trail
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                entries, head = await chain_batch_signed_by(
                    self._sign,
                    self._node,
                    self._instance,
                    audit_log,
                    state.head,
                    [(p.event, p.time_ms) for p in batch],
                    int(time.time() * 1000),
                    state.retracts,
                )
        except SamError as exc:
            return f"audit signing failed: {exc.message}"
        except TimeoutError:
            return "audit signing did not finish in time"
        lines = [orjson.dumps(entry) for entry in entries]
        data = b"".join(line + b"\n" for line in lines)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        written: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not written.done():
                written.set_result(None)

        def signal_written() -> None:
            loop.call_soon_threadsafe(settle)

        durable = self._io_job(self._write, state, data, where, signal_written)
        await asyncio.wait(
            [written, durable], timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
        )
        if not written.done():
            if durable.done():  # the write failed and cut itself off: nothing left the worker
                return f"audit file not writable ({_describe(durable.exception())})"
            self._io_job(self._cut, where)  # runs once the hung write returns
            return f"audit file write did not finish within {self._timeout} s"
        archived: asyncio.Future[None] = asyncio.ensure_future(self._archive(data))
        metrics = self._metrics
        if metrics is not None:  # when the confirm comes, not when the slower of the two ends

            def confirmed(future: asyncio.Future[None]) -> None:
                if not future.cancelled() and future.exception() is None:
                    metrics.audit_confirm_seconds.observe(time.perf_counter() - started)

            archived.add_done_callback(confirmed)
        await asyncio.wait([durable, archived], timeout=deadline - time.monotonic())
        reason = self._verdict(durable, archived, batch)
        if reason is not None:
            self._io_job(self._cut, where)
            if not (archived.done() and isinstance(archived.exception(), ArchiveRefused)):
                state.retracts.append(entries[-1]["hash"])  # the archive may hold it
                self._io_job(self._save_head, state, state.head, list(state.retracts))
            archived.add_done_callback(lambda task: task.cancelled() or task.exception())
            return reason
        # committed
        if metrics is not None:
            metrics.audit_flush_seconds.observe(time.perf_counter() - started)
            metrics.audit_batch_records.observe(len(batch))
        where.release()  # the write job is over: nothing to cut
        state.head, state.retracts = head, []
        self._io_job(self._save_head, state, head, [])
        self._succeeded()
        for pending, entry in zip(batch, entries, strict=False):
            if pending.done is not None:
                pending.done.set_result(entry)
        self._chained(batch)
        if self._feed is not None:
            routing = [p.event.routing_key for p in batch] + [f"{audit_log}.checkpoint.success"]
            self._to_feed(runs_by_routing_key(lines, routing))
        return None

    def _verdict(
        self, durable: asyncio.Future[None], archived: asyncio.Future[None], batch: list[_Pending]
    ) -> str | None:
        if not durable.done():
            return f"audit file not made durable within {self._timeout} s"
        if durable.exception() is not None:
            return f"audit file not made durable ({_describe(durable.exception())})"
        if not archived.done():
            return f"audit archive did not confirm within {self._timeout} s"
        if (failure := archived.exception()) is not None:
            if isinstance(failure, ArchiveRefused):
                return f"audit archive refused the batch ({failure})"
            return f"audit archive did not confirm ({type(failure).__name__})"
        if any(p.done is not None and p.done.done() for p in batch):
            return "a caller's bound passed"
        return None

    def _io_job(self, job: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().run_in_executor(self._io, job, *args)
        future.add_done_callback(self._job_done)
        self._io_tail = future
        return future

    def _job_done(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # seen: the try that waited for it reported it, or gave up on it
        self._wakeup.set()

    def _succeeded(self) -> None:
        self._failing_since, self._failures = None, 0
        self._retry_at = self._probe_at = 0.0
        self._outage.ended()

    def _failed(self, state: _Log, batch: list[_Pending], reason: str) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        self._failures += 1
        step = self._failures - 1
        self._retry_at = now + self._backoff[min(step, len(self._backoff) - 1)]
        self._probe_at = now + self._probe_backoff[min(step, len(self._probe_backoff) - 1)]
        self._outage.failed(reason, self._retry_at - now)
        if self._metrics is not None:
            self._metrics.audit_failures.inc()
        records = [p for p in batch if p.done is None]
        state.withheld[:0] = records  # tried again first, in the order they happened
        for pending in batch:
            if pending.done is not None:
                self._withhold(pending, reason)

    # --- the live feed --------------------------------------------------------------------

    def _to_feed(self, runs: list[tuple[bytes, str]]) -> None:
        try:
            self._feed_backlog.put_nowait(runs)
        except asyncio.QueueFull:
            if self._metrics is not None:
                self._metrics.audit_feed_failures.inc()
            self._feed_outage.failed("backlog full, batch left to the archive")

    async def _feed_forever(self) -> None:
        """Publish committed batches to ``sam.audit`` in commit order — what has gathered
        meanwhile in one round, so the feed keeps up with the commits; a refusal is
        counted and logged, never retried (the archive holds every committed batch)."""
        assert self._feed is not None
        failed_at = 0.0
        while True:
            batches = [await self._feed_backlog.get()]
            while not self._feed_backlog.empty() and len(batches) < 64:
                batches.append(self._feed_backlog.get_nowait())
            try:
                async with asyncio.timeout(self._timeout):
                    # started in order on one channel, so published in order
                    await asyncio.gather(*(self._feed(body, key) for runs in batches for body, key in runs))
            except Exception as exc:
                if self._metrics is not None:
                    self._metrics.audit_feed_failures.inc(len(batches))
                self._feed_outage.failed(f"{type(exc).__name__}, batch left to the archive")
                failed_at = time.monotonic()
            else:
                # over only after a quiet while: a feed that flaps (its connection closed
                # and restored again and again) is one outage in the log, not one per flap
                if time.monotonic() - failed_at > FEED_QUIET:
                    self._feed_outage.ended()
            finally:
                for _ in batches:
                    self._feed_backlog.task_done()

    # --- the I/O thread -------------------------------------------------------------------

    def _write(self, state: _Log, data: bytes, where: _Written, written: Callable[[], None]) -> None:
        """In the I/O thread: append a whole batch and fsync it, or leave the file as it
        was. ``written`` is called between the two."""
        if state.handle is not None and not self._still_current(state):
            state.handle.close()
            state.handle = None
        if state.handle is None:
            fd = os.open(state.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            state.handle = os.fdopen(fd, "ab", buffering=0)
        handle = state.handle
        where.size, where.fd = os.fstat(handle.fileno()).st_size, os.dup(handle.fileno())
        try:
            if handle.write(data) != len(data):
                raise OSError(28, "short write")
            written()
            os.fsync(handle.fileno())
        except OSError:
            self._cut(where)
            state.handle = None  # opened anew for the next batch
            handle.close()
            raise

    @staticmethod
    def _still_current(state: _Log) -> bool:
        """Whether the open handle is still the file at the log's path. logrotate moves
        the file and then asks for a reopen (SIGHUP); should that signal not come (a
        postrotate that failed, an operator's own rotation), the next batch still goes
        to the new file instead of into one that will be compressed and removed. One
        stat per batch; a batch that races the rename itself lands in the moved file,
        which ``delaycompress`` leaves alone until the next rotation."""
        try:
            at_path = os.stat(state.path)
        except OSError:
            return False
        opened = os.fstat(state.handle.fileno())
        return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)

    @staticmethod
    def _cut(where: _Written) -> None:
        """In the I/O thread: take a batch that was not committed off its file again
        (appends that follow go to the new end: the trail's files are ``O_APPEND``)."""
        if where.fd is None or where.size is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(where.fd, where.size)
            os.fsync(where.fd)
        where.release()

    @staticmethod
    def _save_head(state: _Log, head: ChainHead, retracts: list[str]) -> None:
        """Where the chain stands, for a restart after the file was rotated away. Only
        a hint (the file itself is the truth), so a failure here fails nothing."""
        temporary = state.head_file.with_suffix(".head.tmp")
        with contextlib.suppress(OSError):
            # never blocks nor follows a link: a FIFO put there would hang the I/O thread
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_NOFOLLOW
            with os.fdopen(os.open(temporary, flags, 0o640), "wb") as handle:
                if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                    return
                handle.write(orjson.dumps({"seq": head.seq, "hash": head.hash, "retracts": retracts}))
            os.replace(temporary, state.head_file)

    # --- side files of records that could not be chained ----------------------------------

    def _read_back_unwritten(self, state: _Log, chained: set[str]) -> None:
        """At start, records of withheld replies that an earlier run could not chain (its
        side files, see ``_keep_unwritten_withheld``) join the first batch that commits;
        each side file goes once all its records are in the chain. A line the file's
        committed records say was read back already (``chained``: a run killed before it
        removed the side file) is not read again, and no more than ``MAX_WITHHELD``
        records are held. A file with a line that does not read as a withheld reply is
        left alone, for the operator."""
        for side in sorted(state.path.parent.glob(f"{state.path.stem}.unwritten-*")):
            try:
                _regular_file_at(side)
                lines = side.read_bytes().splitlines()
                records = [
                    (_unwritten_record(line, side, number), f"{side.name}:{number}")
                    for number, line in enumerate(lines, 1)
                    if line.strip()
                ]
            except (OSError, SamError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
                log.error("audit: %s left as it is: not readable as records (%s)", side, type(exc).__name__)
                continue
            waiting = [record for record, where in records if where not in chained]
            room = max(MAX_WITHHELD - len(state.withheld), 0)
            taken = waiting[:room]
            state.withheld += [_Pending(event, time_ms, None, origin=side) for event, time_ms in taken]
            whole = len(taken) == len(waiting)
            if taken:
                self._side_files[side] = (len(taken), whole)
            elif whole:  # everything in it was chained before
                _unlink(side)
            log.warning(
                "audit: %d records of withheld replies read back from %s (%d chained before)",
                len(taken),
                side,
                len(records) - len(waiting),
            )

    def _chained(self, batch: list[_Pending]) -> None:
        for pending in batch:
            if pending.origin is None or pending.origin not in self._side_files:
                continue
            left, whole = self._side_files[pending.origin]
            if left > 1:
                self._side_files[pending.origin] = (left - 1, whole)
                continue
            del self._side_files[pending.origin]
            if whole:
                self._io_job(_unlink, pending.origin)

    # --- shutdown -------------------------------------------------------------------------

    async def close(self) -> None:
        """Commit what is pending (within the audit time bound), hand the live feed what
        is committed, then stop."""
        self._closed = True
        self._wakeup.set()
        if self._flusher is not None:
            try:
                await asyncio.wait_for(self._flusher, self._timeout + GRACE)
            except TimeoutError:
                log.error("audit: pending records not committed within %s s at shutdown", self._timeout)
        if self._feeder is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._feed_backlog.join(), self._timeout)
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        if self._watcher is not None:
            self._watcher.cancel()
        self._keep_unwritten_withheld()
        self._io.submit(self._close_files)
        self._io.shutdown(wait=True, timeout=self._timeout)

    def _keep_unwritten_withheld(self) -> None:
        """At shutdown (say, with the HSM lost, so no checkpoint can be signed), records of
        withheld replies still waiting go to a side file beside the log — unchained and
        unsigned, but kept, and read back into the chain by the next start. A side file
        read back at this start goes once what is left of it is in the new one."""
        for state in self._logs.values():
            if not state.withheld:
                continue
            side = state.path.with_name(f"{state.path.stem}.unwritten-{time.time_ns()}")
            try:
                side.write_bytes(
                    b"".join(
                        orjson.dumps({**dataclasses.asdict(p.event), "time_ms": p.time_ms}) + b"\n"
                        for p in state.withheld
                    )
                )
            except OSError as exc:
                log.critical(
                    "audit: %d records of withheld replies could not be chained nor kept (%s)",
                    len(state.withheld),
                    _describe(exc),
                )
                continue
            log.error(
                "audit: %d records of withheld replies could not be chained; kept in %s for the next start",
                len(state.withheld),
                side,
            )
            for earlier in {p.origin for p in state.withheld if p.origin is not None}:
                if self._side_files.get(earlier, (0, False))[1]:  # all it held is in the new file
                    _unlink(earlier)
