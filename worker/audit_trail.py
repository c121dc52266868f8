"""The audit trail of one worker process: group commit of chained records into the
service and admin files, a signed checkpoint per batch, and publication to the broker.

``record`` returns only once its record is durable in its file (written and fsynced
together with the checkpoint that signs it) and every entry of its batch was confirmed
by ``publish`` (the broker adapter: ``sam.audit``, mandatory, confirmed). One message
carries a run of consecutive entries with the same routing key (``<log>.<operation>.
<outcome>``), one JSON entry per line, in chain order; the checkpoint is a message of its
own. Under load a batch is then two or three broker messages instead of one per request
(the broker's work per signature was twice an echo's). The fsync and the broker confirms
run side by side, once the batch is written. If that does
not happen within the configured time it raises ``audit_unavailable``, and the caller
must not release a result. While one batch is being written the next one gathers, so
under load one HSM signature and one fsync serve many requests.

File handling: a batch that fails to write is cut off again (``ftruncate``) and the
chain does not advance, so the file never holds a half batch. At start, anything after
the last checkpoint (a batch the process died writing — never confirmed to a caller) is
moved to a ``<log>.cut-<time>`` file beside it (not matched by ``<log>.jsonl*``), and
the chain continues from the last checkpoint, in the file or, after a rotation, in the
``.head`` file beside it. SIGHUP
(``reopen``) closes the files so the next batch opens them anew (logrotate ``create``,
no ``copytruncate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Histogram

from worker.domain.audit import AuditEvent, AuditLog, ChainHead, Outcome, chain_batch
from worker.errors import ErrorCode, SamError
from worker.metrics import Metrics

__all__ = ["AuditTrail", "audit_file", "runs_by_routing_key"]

log = logging.getLogger(__name__)

MAX_BATCH = 512


def audit_file(audit_dir: Path, instance: str, audit_log: AuditLog) -> Path:
    """Where a worker instance writes one of its audit logs."""
    return audit_dir / instance / f"{audit_log}.jsonl"


def _recover(path: Path, head_file: Path) -> ChainHead:
    """Cut an incomplete last batch off ``path``; return where the chain stands."""
    head = ChainHead()
    if head_file.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, orjson.JSONDecodeError):
            saved = orjson.loads(head_file.read_bytes())
            head = ChainHead(int(saved["seq"]), str(saved["hash"]))
    if not path.exists():
        return head
    keep, in_file = 0, None
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
            if entry.get("type") == "checkpoint":
                keep, in_file = offset, ChainHead(int(entry["seq"]), str(entry["hash"]))
    if path.stat().st_size != keep:
        # Kept beside the file for the auditor's eyes, never silently dropped.
        # named so that the files' glob (``service.jsonl*``) never takes it for the trail
        cut = path.with_name(f"{path.stem}.cut-{int(time.time())}")
        log.warning("audit: moving an unfinished batch from %s to %s", path, cut)
        with path.open("r+b") as handle:
            handle.seek(keep)
            cut.write_bytes(handle.read())
            handle.truncate(keep)
            os.fsync(handle.fileno())
    if in_file is not None and in_file.seq >= head.seq:
        return in_file
    return head


@dataclass
class _Pending:
    event: AuditEvent
    time_ms: int
    done: asyncio.Future[dict[str, Any]] | None  # None: nobody waits (a withheld-reply record)
    withheld_recorded: bool = False  # the caller got audit_unavailable and a record of that is queued


MAX_WITHHELD = 100_000


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


def _describe(failure: BaseException | None) -> str:
    strerror = failure.strerror if isinstance(failure, OSError) else None
    return f"{type(failure).__name__}: {strerror}"


def _withheld(event: AuditEvent, why: str) -> AuditEvent:
    """The record of what the caller actually got when its first record missed the bound."""
    return dataclasses.replace(
        event,
        outcome=Outcome.failure,
        status=ErrorCode.audit_unavailable.status,
        error_code=ErrorCode.audit_unavailable.name,
        detail=f"reply withheld: {why} (decided: {event.status} {event.error_code or 'ok'})",
    )


@dataclass
class _Log:
    path: Path
    head_file: Path
    head: ChainHead
    pending: list[_Pending] = field(default_factory=list)
    withheld: list[_Pending] = field(default_factory=list)  # written with the next batch that succeeds
    handle: Any = None


class AuditTrail:
    """The ``AuditSink`` of a worker process (see the module docstring): records are
    answered only once durable in their file and confirmed by the broker, else
    ``audit_unavailable`` within ``timeout``."""

    def __init__(
        self,
        node: str,
        instance: str,
        audit_dir: Path,
        sign_digest: Callable[[bytes], bytes],
        publish: Callable[[bytes, str], Awaitable[None]],
        timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._node = node
        self._instance = instance
        self._sign = sign_digest
        self._publish = publish
        self._timeout = timeout
        self._logs: dict[AuditLog, _Log] = {}
        for audit_log in AuditLog:
            path = audit_file(audit_dir, instance, audit_log)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            head_file = path.with_suffix(".head")
            self._logs[audit_log] = _Log(path, head_file, _recover(path, head_file))
        # One thread does all file I/O, so a slow disk never stalls the event loop and
        # writes stay in order.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-io")
        self._wakeup = asyncio.Event()
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        self._failing_since: float | None = None  # monotonic time of the first failure since a success

    def failing_for(self) -> float:
        """Seconds since batches began to fail without one succeeding since (0: none
        failing) — readiness turns false once this passes the audit bound."""
        return 0.0 if self._failing_since is None else time.monotonic() - self._failing_since

    def writable(self) -> bool:
        """Whether both audit files can be opened for appending now (for readiness)."""
        try:
            for state in self._logs.values():
                os.close(os.open(state.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        except OSError:
            return False
        return True

    def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

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

    async def record(self, event: AuditEvent) -> dict[str, Any]:
        if self._closed or self._flusher is None:
            raise SamError(ErrorCode.audit_unavailable, "the audit trail is not running")
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = _Pending(event, int(time.time() * 1000), done)
        self._logs[event.log].pending.append(pending)
        self._wakeup.set()
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(done)
        except TimeoutError:
            message = f"audit record not durable within {self._timeout} s"
            self._record_withheld(pending, message)
            raise SamError(ErrorCode.audit_unavailable, message) from None

    def _record_withheld(self, pending: _Pending, why: str) -> None:
        """Queue the record of a reply that became audit_unavailable, so the trail
        eventually says what every caller got."""
        if pending.withheld_recorded:
            return
        pending.withheld_recorded = True
        state = self._logs[pending.event.log]
        if len(state.withheld) >= MAX_WITHHELD:
            log.critical(
                "audit: %d withheld-reply records waiting; not keeping %s",
                MAX_WITHHELD,
                pending.event.request_id,
            )
            return
        state.withheld.append(_Pending(_withheld(pending.event, why), int(time.time() * 1000), None))

    async def _flush_forever(self) -> None:
        while True:
            waiting = any(state.withheld for state in self._logs.values())
            # withheld-reply records are tried again every few seconds even without traffic
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), 5 if waiting else None)
            self._wakeup.clear()
            if self._closed and not any(state.pending for state in self._logs.values()):
                return
            for audit_log, state in self._logs.items():
                if state.withheld and not state.pending:
                    state.pending, state.withheld = state.withheld, []
                while state.pending:
                    batch, state.pending = state.pending[:MAX_BATCH], state.pending[MAX_BATCH:]
                    if state.withheld:  # with the next batch, in the order they happened
                        batch, state.withheld = state.withheld + batch, []
                    self._wakeup.set()  # look again once this batch is done
                    try:
                        await self._flush(audit_log, state, batch)
                    except Exception as exc:  # the flusher must outlive any one batch
                        log.exception("audit batch failed unexpectedly")
                        self._fail(batch, f"audit failed ({type(exc).__name__})")

    async def _flush(self, audit_log: AuditLog, state: _Log, batch: list[_Pending]) -> None:
        """Chain and sign ``batch``, write it, then make it durable in the file and on the
        broker side by side; release its callers only when both hold."""
        try:
            entries, head = chain_batch(
                self._node,
                self._instance,
                audit_log,
                state.head,
                [(p.event, p.time_ms) for p in batch],
                int(time.time() * 1000),
                self._sign,
            )
        except SamError as exc:
            self._fail(batch, f"audit signing failed: {exc.message}")
            return
        lines = [orjson.dumps(entry) for entry in entries]
        started = time.perf_counter()
        durable = await self._written(state, lines, head)
        if isinstance(durable, BaseException):  # nothing left the worker
            self._fail(batch, f"audit file not writable ({_describe(durable)})")
            return
        routing = [p.event.routing_key for p in batch] + [f"{audit_log}.checkpoint.success"]
        metrics = self._metrics
        synced, *published = await asyncio.gather(
            self._timed(durable, started, metrics.audit_flush_seconds if metrics else None),
            *(
                self._timed(
                    self._publish(body, key), started, metrics.audit_confirm_seconds if metrics else None
                )
                for body, key in runs_by_routing_key(lines, routing)
            ),
            return_exceptions=True,
        )
        if isinstance(synced, BaseException):
            self._fail(batch, f"audit file not made durable ({_describe(synced)})")
            return
        state.head = head
        if metrics is not None:
            metrics.audit_batch_records.observe(len(batch))
        failure = next((r for r in published if isinstance(r, BaseException)), None)
        if failure is not None:
            self._fail(batch, f"audit exchange did not confirm ({type(failure).__name__})")
            return
        self._failing_since = None
        for pending, entry in zip(batch, entries, strict=False):
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(entry)

    async def _written(
        self, state: _Log, lines: list[bytes], head: ChainHead
    ) -> asyncio.Future[None] | BaseException:
        """Start the batch's I/O job and return, once its write went through, the future
        of its fsync — or the write's failure.

        One I/O job writes and then fsyncs (a SIGHUP's close cannot come in between);
        it signals when the write went through, and the broker publishes start then.
        The fsync and the broker's confirms run side by side: the reply waits for the
        slower one, not for both in a row. Only a failed fsync (the write itself went
        through) can now leave a batch on the broker that the file does not keep; its
        callers get audit_unavailable, the chain goes on from the file's last
        checkpoint, and the broker's copy shows a fork there (see the README)."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not written.done():
                written.set_result(None)

        def signal_written() -> None:
            loop.call_soon_threadsafe(settle)

        data = b"".join(line + b"\n" for line in lines)
        durable = loop.run_in_executor(self._io, self._write, state, data, head, signal_written)
        await asyncio.wait([written, durable], return_when=asyncio.FIRST_COMPLETED)
        if not written.done():  # the write failed (callbacks arrive in order)
            return durable.exception() or RuntimeError("audit write failed")
        return durable

    @staticmethod
    async def _timed(step: Awaitable[None], started: float, histogram: Histogram | None) -> None:
        await step
        if histogram is not None:
            histogram.observe(time.perf_counter() - started)

    def _write(self, state: _Log, data: bytes, head: ChainHead, written: Callable[[], None]) -> None:
        """In the I/O thread: append a whole batch and fsync it, or leave the file as it
        was. ``written`` is called between the two."""
        if state.handle is None:
            fd = os.open(state.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            state.handle = os.fdopen(fd, "ab", buffering=0)
        handle = state.handle
        size = os.fstat(handle.fileno()).st_size
        try:
            if handle.write(data) != len(data):
                raise OSError(28, "short write")
            written()
            os.fsync(handle.fileno())
        except OSError:
            self._cut(state, size)
            raise
        # Where the chain stands, for a restart after the file was rotated away. Only
        # a hint (the file itself is the truth), so a failure here fails nothing.
        with contextlib.suppress(OSError):
            temporary = state.head_file.with_suffix(".head.tmp")
            temporary.write_bytes(orjson.dumps({"seq": head.seq, "hash": head.hash}))
            os.replace(temporary, state.head_file)

    @staticmethod
    def _cut(state: _Log, size: int) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(state.handle.fileno(), size)
        state.handle.close()
        state.handle = None

    def _fail(self, batch: list[_Pending], message: str) -> None:
        log.error("audit batch of %d failed: %s", len(batch), message)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        if self._metrics is not None:
            self._metrics.audit_failures.inc()
        for pending in batch:
            if pending.done is None:  # a withheld-reply record: keep it for the next batch
                self._logs[pending.event.log].withheld.append(pending)
                continue
            if not pending.done.done():
                pending.done.set_exception(SamError(ErrorCode.audit_unavailable, message))
            self._record_withheld(pending, message)

    async def close(self) -> None:
        """Flush what is pending (within the audit time bound), then stop."""
        self._closed = True
        self._wakeup.set()
        if self._flusher is not None:
            try:
                await asyncio.wait_for(self._flusher, self._timeout)
            except TimeoutError:
                log.error("audit: pending records not flushed within %s s at shutdown", self._timeout)
        self._keep_unwritten_withheld()
        self._io.submit(self._close_files)
        self._io.shutdown(wait=True)

    def _keep_unwritten_withheld(self) -> None:
        """At shutdown (say, with the HSM lost, so no checkpoint can be signed), records of
        withheld replies still waiting go to a side file beside the log — unchained and
        unsigned, but kept for the auditor rather than lost."""
        for state in self._logs.values():
            waiting = [p for p in [*state.withheld, *state.pending] if p.done is None]
            if not waiting:
                continue
            side = state.path.with_name(f"{state.path.stem}.unwritten-{int(time.time())}")
            with contextlib.suppress(OSError):
                side.write_bytes(
                    b"".join(
                        orjson.dumps({**dataclasses.asdict(p.event), "time_ms": p.time_ms}) + b"\n"
                        for p in waiting
                    )
                )
                log.error(
                    "audit: %d records of withheld replies could not be chained; kept in %s",
                    len(waiting),
                    side,
                )
