"""The audit trail of one worker process: chain, sign, write, fsync, publish.

``record`` returns only once the record is durable in its file (fsync) and its
``publish`` (the broker adapter: ``sam.audit``, mandatory, confirmed) succeeded; if it
cannot do both within the configured time it raises ``audit_unavailable`` and the
caller must not release a result. Records are chained per (node, instance, log) and
the chain continues from the last record in the file after a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from worker.domain.audit import GENESIS, AuditChain, AuditEvent, AuditLog
from worker.errors import ErrorCode, SamError

__all__ = ["AuditTrail", "audit_file"]


def audit_file(audit_dir: Path, instance: str, log: AuditLog) -> Path:
    return audit_dir / instance / f"{log}.jsonl"


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of ``path``; a torn final line is ignored."""
    if not path.exists():
        return None
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 65536))
        lines = handle.read().splitlines()
    for line in reversed(lines):
        try:
            record: dict[str, Any] = orjson.loads(line)
            return record
        except orjson.JSONDecodeError:
            continue
    return None


class AuditTrail:
    def __init__(
        self,
        node: str,
        instance: str,
        audit_dir: Path,
        sign_digest: Callable[[bytes], bytes],
        publish: Callable[[bytes, str], Awaitable[None]],
        timeout: float,
    ) -> None:
        self._sign = sign_digest
        self._publish = publish
        self._timeout = timeout
        self._chains: dict[AuditLog, AuditChain] = {}
        self._paths: dict[AuditLog, Path] = {}
        self._files: dict[AuditLog, BinaryIO] = {}
        for log in AuditLog:
            path = audit_file(audit_dir, instance, log)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            last = _last_record(path)
            seq, prev = (int(last["seq"]), str(last["hash"])) if last else (0, GENESIS)
            self._chains[log] = AuditChain(node, instance, log, seq, prev)
            self._paths[log] = path

    def _file(self, log: AuditLog) -> BinaryIO:
        handle = self._files.get(log)
        if handle is None:
            fd = os.open(self._paths[log], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            handle = self._files[log] = os.fdopen(fd, "ab")
        return handle

    def reopen(self) -> None:
        """Close the files so the next record opens them anew (logrotate, SIGHUP)."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    async def record(self, event: AuditEvent) -> dict[str, Any]:
        # Chain, sign and write happen without an await in between, so the file
        # order is the chain order even with many requests in flight.
        try:
            record = self._chains[event.log].append(event, int(time.time() * 1000), self._sign)
        except SamError as exc:
            raise SamError(ErrorCode.audit_unavailable, f"audit signing failed: {exc.message}") from exc
        line = orjson.dumps(record) + b"\n"
        try:
            handle = self._file(event.log)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            self._files.pop(event.log, None)
            raise SamError(
                ErrorCode.audit_unavailable, f"audit file not writable ({type(exc).__name__})"
            ) from exc
        try:
            async with asyncio.timeout(self._timeout):
                await self._publish(line[:-1], event.routing_key)
        except Exception as exc:  # any sink failure means: no durable record, no result
            raise SamError(
                ErrorCode.audit_unavailable, f"audit exchange did not confirm ({type(exc).__name__})"
            ) from exc
        return record

    def close(self) -> None:
        self.reopen()
