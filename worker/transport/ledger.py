"""Append-then-read-back over a RabbitMQ stream, with appends coalesced.

``append`` queues a record; a single publisher sends every record queued meanwhile as
one stream message (with confirms), so under load one broker round trip serves many
requests. The worker's own tail of the stream applies each record with the reducer, in
log order; the verdict a record gets there is the cluster-wide outcome, because every
replica applies the same records in the same order. At start the ledger joins the next
message without a record: once it is read back, everything appended anywhere before
has been applied here. ``read_to`` writes nothing: it waits until this worker's tail
has applied the stream up to an offset learnt elsewhere (a key-events mark in
``sam.sad-use``, see ``SadUseLog``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.domain.ledgers import Reducer, Verdict
from worker.errors import ErrorCode, SamError

__all__ = ["StreamLedger"]

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    records: list[dict[str, Any]] = field(default_factory=list)
    waiters: list[asyncio.Future[Verdict]] = field(default_factory=list)
    syncs: list[asyncio.Future[None]] = field(default_factory=list)


class StreamLedger:
    """One ledger: appends records to a RabbitMQ stream and applies every record of it, in log
    order, with ``reducer``. ``start``, ``append`` and ``read_to`` raise a ``SamError`` with
    ``ledger_unavailable`` when the stream does not answer in time."""

    def __init__(
        self,
        stream: str,
        reducer: Reducer,
        consume_channel: AbstractChannel,
        publish_channel: AbstractChannel,
        timeout: float,
        start_at: datetime.datetime | None = None,
    ) -> None:
        self.stream = stream
        self.reducer = reducer
        self._consume_channel = consume_channel
        self._publish_channel = publish_channel
        self._timeout = timeout
        self._start_at = start_at
        self._next = _Batch()
        self._sent: dict[str, _Batch] = {}
        self._readers: list[tuple[int, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._queue: AbstractQueue | None = None  # kept: aio-pika needs the reference
        self.position = -1
        self._failing_since: float | None = None  # monotonic time of the first unanswered wait
        self._probe: asyncio.Task[None] | None = None

    def failing_for(self) -> float:
        """Seconds since a wait on this stream first timed out or a publish failed without
        a record read back since (0: answering) — readiness turns false past the bound.
        While failing, each call makes sure a probe (an empty batch) is on its way, so an
        idle worker that an orchestrator stopped feeding still finds out it recovered."""
        if self._failing_since is None:
            return 0.0
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._sync_probe())
        return time.monotonic() - self._failing_since

    async def _sync_probe(self) -> None:
        with contextlib.suppress(SamError):
            await self._sync(while_progressing=False)

    def _failed(self) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()

    async def start(self) -> None:
        self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())
        self._queue = await self._consume_channel.get_queue(self.stream, ensure=False)
        offset: Any = self._start_at if self._start_at is not None else "first"
        await self._queue.consume(self._on_message, arguments={"x-stream-offset": offset})
        await self._replay()

    async def stop(self) -> None:
        for task in (self._probe, self._publisher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def append(self, data: dict[str, Any]) -> Verdict:
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._next.records.append(data)
        self._next.waiters.append(future)
        self._wakeup.set()
        verdict: Verdict = await self._wait(future)
        return verdict

    async def _replay(self) -> None:
        """Join the next message without a record and wait until it is read back: then
        everything appended before the start has been applied here. The stream grows with
        the deployment (every key pair change stays in sam.key-events), so this fails only
        when the timeout passes without a single message read, not after the timeout in all."""
        await self._sync(while_progressing=True)

    async def _sync(self, while_progressing: bool) -> None:
        """Publish a message without a record and return once it is read back."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next.syncs.append(future)
        self._wakeup.set()
        await self._wait(future, while_progressing=while_progressing)

    async def read_to(self, position: int) -> None:
        """Return once this worker has applied the stream up to ``position``."""
        if self.position >= position:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readers.append((position, future))
        await self._wait(future)

    async def _wait(self, future: asyncio.Future[Any], while_progressing: bool = False) -> Any:
        while True:
            seen = self.position
            try:
                async with asyncio.timeout(self._timeout):
                    return await asyncio.shield(future)
            except TimeoutError:
                if not while_progressing or self.position == seen:
                    self._failed()
                    raise SamError(
                        ErrorCode.ledger_unavailable, f"{self.stream} did not answer in time"
                    ) from None
                log.info("%s: replaying, at offset %d", self.stream, self.position)

    async def _publish_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            batch, self._next = self._next, _Batch()
            if not batch.waiters and not batch.syncs:
                continue
            self._sent[batch.id] = batch
            body = orjson.dumps({"id": batch.id, "records": batch.records})
            try:
                await self._publish_channel.default_exchange.publish(
                    aio_pika.Message(body, content_type="application/json"), routing_key=self.stream
                )
            except Exception as exc:  # the publisher must outlive any one failure
                self._failed()
                self._sent.pop(batch.id, None)
                error = SamError(
                    ErrorCode.ledger_unavailable, f"{self.stream} refused a record ({type(exc).__name__})"
                )
                waiters: list[asyncio.Future[Any]] = [*batch.waiters, *batch.syncs]
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(error)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        offset = (message.headers or {}).get("x-stream-offset")
        position = offset if isinstance(offset, int) else -1
        try:
            content = orjson.loads(message.body)
            batch_id, records = str(content.get("id")), content.get("records") or []
            verdicts = [self.reducer.apply(r if isinstance(r, dict) else {}, position) for r in records]
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("unreadable message in %s: %s", self.stream, type(exc).__name__)
            batch_id, verdicts = "", []
        if isinstance(offset, int):
            self.position = offset
            if self._readers:
                self._release_readers()
        batch = self._sent.pop(batch_id, None)
        if batch is not None:
            self._failing_since = None  # our own record came back: the stream answers
            for waiter, verdict in zip(batch.waiters, verdicts, strict=False):
                if not waiter.done():
                    waiter.set_result(verdict)
            for sync in batch.syncs:
                if not sync.done():
                    sync.set_result(None)
        await message.ack()

    def _release_readers(self) -> None:
        waiting = []
        for position, future in self._readers:
            if future.done():
                continue  # timed out meanwhile
            if position <= self.position:
                future.set_result(None)
            else:
                waiting.append((position, future))
        self._readers = waiting
