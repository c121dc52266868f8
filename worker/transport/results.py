"""``sam.results``: results kept for repeats of their request (the ``ResultStore`` port).

Every request that acted (signed, generated, changed a key pair) puts its result here,
confirmed, before its ``answered`` mark goes to ``sam.sad-use``. Nobody tails this
stream: a worker reads it only when a repeat of an answered request comes, with a
consumer of its own that starts a little before the time the mark names and stops at the
result — so ordinary requests cost one confirmed publish, and no worker holds or reads
the results of others. The stream's retention outlives the longest repeat window.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.errors import ErrorCode, SamError
from worker.ports import StoredResult
from worker.transport.topology import RESULTS_STREAM

__all__ = ["StreamResultStore"]

_REQUEST_HEADER = "sam-request"
_ATTEMPT_HEADER = "sam-attempt"
# The reader starts this much before the mark's time (taken just before the result was
# published): a stream is read from the chunk holding a timestamp, stamped by the broker's
# clock, not the worker's. Every second more is a second of everyone's results to read
# past on each repeat.
_READ_BACK_SECONDS = 2
# Reads at once per worker, and results kept once read: a caller repeating requests in a
# loop must not turn each repeat into a scan of the stream.
_READS_AT_ONCE = 4
_KEPT = 256


class StreamResultStore:
    """The ``ResultStore`` on ``sam.results``: ``put`` publishes with confirms on
    ``publish_channel`` (mandatory: no route is a failure); ``get`` consumes on
    ``read_channel`` (with a prefetch set) until it meets the result, then cancels its
    consumer. The read channel stays open: closing a channel while deliveries on it are
    still being acked makes RabbitMQ close the whole connection (504, "expected
    'channel.open'")."""

    def __init__(
        self,
        publish_channel: AbstractChannel,
        read_channel: AbstractChannel,
        timeout: float,
        stream: str = RESULTS_STREAM,
    ) -> None:
        self._channel = publish_channel
        self._reader = read_channel
        self._timeout = timeout
        self._stream = stream
        self._reads = asyncio.Semaphore(_READS_AT_ONCE)
        self._kept: collections.OrderedDict[tuple[str, int], StoredResult] = collections.OrderedDict()

    async def put(self, request: str, attempt: int, result: StoredResult) -> None:
        body = orjson.dumps(
            {"status": result.status, "body": base64.b64encode(result.body).decode(), "trace": result.trace}
        )
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={_REQUEST_HEADER: request, _ATTEMPT_HEADER: attempt},
        )
        try:
            async with asyncio.timeout(self._timeout):
                await self._channel.default_exchange.publish(
                    message, routing_key=self._stream, mandatory=True
                )
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise SamError(
                ErrorCode.ledger_unavailable, f"{self._stream} did not take a result ({type(exc).__name__})"
            ) from exc

    async def get(self, request: str, attempt: int, stored_at: int) -> StoredResult:
        kept = self._kept.get((request, attempt))
        if kept is not None:
            self._kept.move_to_end((request, attempt))
            return kept
        try:
            async with asyncio.timeout(self._timeout):
                async with self._reads:
                    result = await self._read(request, attempt, stored_at)
        except TimeoutError as exc:
            raise SamError(
                ErrorCode.ledger_unavailable, f"{self._stream} did not give the result in time"
            ) from exc
        self._kept[(request, attempt)] = result
        if len(self._kept) > _KEPT:
            self._kept.popitem(last=False)
        return result

    async def _read(self, request: str, attempt: int, stored_at: int) -> StoredResult:
        found: asyncio.Future[StoredResult] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            headers = message.headers or {}
            if (
                not found.done()
                and headers.get(_REQUEST_HEADER) == request
                and headers.get(_ATTEMPT_HEADER) == attempt
            ):
                try:
                    found.set_result(_parsed(message.body))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    found.set_exception(
                        SamError(ErrorCode.ledger_unavailable, f"{self._stream} holds an unreadable result")
                    )
            await message.ack()

        since = datetime.datetime.fromtimestamp(max(stored_at - _READ_BACK_SECONDS, 0), datetime.UTC)
        queue: AbstractQueue | None = None
        tag = ""
        try:
            queue = await self._reader.get_queue(self._stream, ensure=False)
            tag = await queue.consume(on_message, arguments={"x-stream-offset": since})
            return await found
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            message = f"{self._stream} did not give the result ({type(exc).__name__})"
            raise SamError(ErrorCode.ledger_unavailable, message) from exc
        finally:
            if queue is not None and tag:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(queue.cancel(tag), self._timeout)


def _parsed(body: bytes) -> StoredResult:
    content: dict[str, Any] = orjson.loads(body)
    trace = content["trace"]
    if not isinstance(trace, dict):
        raise TypeError("trace")
    return StoredResult(int(content["status"]), base64.b64decode(content["body"]), trace)
