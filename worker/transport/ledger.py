"""Append-then-read-back over a RabbitMQ stream.

``append`` publishes a record (with confirms) and waits until this worker's own tail
of the stream reaches it; the verdict the reducer gives then is the cluster-wide
outcome, because every replica applies the same records in the same order. ``sync``
appends a marker so a starting worker knows it has replayed everything before it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.domain.ledgers import Reducer
from worker.errors import ErrorCode, SamError

__all__ = ["StreamLedger"]

log = logging.getLogger(__name__)

_MARKER = "marker"


class StreamLedger:
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
        self._waiting: dict[str, asyncio.Future[SamError | None]] = {}
        self._queue: AbstractQueue | None = None  # kept: aio-pika needs the reference
        self.position = -1

    async def start(self) -> None:
        self._queue = await self._consume_channel.get_queue(self.stream, ensure=False)
        offset: Any = self._start_at if self._start_at is not None else "first"
        await self._queue.consume(self._on_record, arguments={"x-stream-offset": offset})
        await self.sync()

    async def sync(self) -> None:
        await self._append(_MARKER, {})

    async def append(self, data: dict[str, Any]) -> SamError | None:
        return await self._append("record", data)

    async def _append(self, kind: str, data: dict[str, Any]) -> SamError | None:
        record_id = str(uuid.uuid4())
        future: asyncio.Future[SamError | None] = asyncio.get_running_loop().create_future()
        self._waiting[record_id] = future
        body = orjson.dumps({"id": record_id, "kind": kind, "data": data})
        try:
            async with asyncio.timeout(self._timeout):
                await self._publish_channel.default_exchange.publish(
                    aio_pika.Message(body, content_type="application/json"), routing_key=self.stream
                )
                return await future
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            raise SamError(
                ErrorCode.ledger_unavailable, f"{self.stream} did not confirm in time ({type(exc).__name__})"
            ) from exc
        finally:
            self._waiting.pop(record_id, None)

    async def _on_record(self, message: AbstractIncomingMessage) -> None:
        verdict: SamError | None = None
        try:
            record = orjson.loads(message.body)
            if record.get("kind") != _MARKER:
                verdict = self.reducer.apply(record.get("data") or {})
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            log.error("unreadable record in %s: %s", self.stream, type(exc).__name__)
            record = {}
        offset = (message.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            self.position = offset
        future = self._waiting.get(str(record.get("id")))
        if future is not None and not future.done():
            future.set_result(verdict)
        await message.ack()
