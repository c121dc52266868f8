"""Results kept for repeats of their request: ``sam.results`` (the ``ResultStore`` port)
and the ``answered`` marks of ``sam.sad-use`` (the ``MarkReader`` port).

Every request that acted (signed, generated, changed a key pair) keeps its result before
its ``answered`` mark is read back from ``sam.sad-use``. A small result (a few
signatures, most key-pair changes) travels in the mark itself, so it costs no message of
its own, and every replica notes where in the log that mark is: a repeat reads that one
message back (``MarkedResults``). A larger one is put in ``sam.results`` first,
confirmed, and the mark names only when: nobody tails that stream; a reader reads it
only while repeats of answered requests wait for their results, from a little before the
earliest time their marks name, and stops when none waits — a burst of repeats costs one
pass over the stream, not one each. No worker holds the results of others. Both streams'
retention outlives the longest repeat window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from worker.domain.ledgers import SadUseLog
from worker.errors import ErrorCode, SamError
from worker.ports import StoredResult
from worker.transport.topology import RESULTS_STREAM, SAD_USE_STREAM

__all__ = ["MarkedResults", "StreamResultStore"]

_REQUEST_HEADER = "sam-request"
_ATTEMPT_HEADER = "sam-attempt"
# The reader starts this much before the mark's time (taken just before the result was
# published): a stream is read from the chunk holding a timestamp, stamped by the broker's
# clock, not the worker's. Every second more is a second of everyone's results to read
# past.
_READ_BACK_SECONDS = 2
# results kept once read, so a caller repeating one request in a loop reads nothing
_KEPT = 256


class StreamResultStore:
    """The ``ResultStore`` on ``sam.results``: ``put`` publishes one message a result, with
    confirms, on ``publish_channel`` (mandatory: no route is a failure); ``get`` waits for
    one reader, shared by every waiting ``get``, that consumes on ``read_channel`` (with a
    prefetch set) from the earliest time wanted and stops when nothing is wanted any more.
    The read channel stays open: closing a channel while deliveries on it are still being
    acked makes RabbitMQ close the whole connection (504, "expected 'channel.open'")."""

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
        self._wanted: dict[tuple[str, int], tuple[int, asyncio.Future[StoredResult]]] = {}
        self._wakeup = asyncio.Event()
        self._scanning: asyncio.Task[None] | None = None
        self._start = 0  # the time the running pass started at
        self._passed = 0.0  # the latest time stamped on a result the running pass read
        self._rewind = False  # a result wanted now may lie behind the running pass
        # by request, attempt and time: the same request sent again after its window is
        # claimed anew, and its attempt 0 is not the earlier one's
        self._kept: collections.OrderedDict[tuple[str, int, int], StoredResult] = collections.OrderedDict()

    async def put(self, request: str, attempt: int, result: StoredResult) -> None:
        record = result.as_record(request, attempt)
        message = aio_pika.Message(
            orjson.dumps(record),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={_REQUEST_HEADER: request, _ATTEMPT_HEADER: attempt},
            # not before the time the answered mark names: a reader that has passed a
            # result stamped later than a wanted time knows to go back for it
            timestamp=datetime.datetime.now(datetime.UTC),
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

    async def stop(self) -> None:
        """Stop reading (at shutdown): repeats still waiting get ``ledger_unavailable``."""
        if self._scanning is not None:
            self._scanning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanning

    async def get(self, request: str, attempt: int, stored_at: int) -> StoredResult:
        key, kept_as = (request, attempt), (request, attempt, stored_at)
        kept = self._kept.get(kept_as)
        if kept is not None:
            self._kept.move_to_end(kept_as)
            return kept
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = (stored_at, asyncio.get_running_loop().create_future())
            self._wanted[key] = wanted
            if stored_at - _READ_BACK_SECONDS < max(self._start, self._passed):
                self._rewind = True  # the running pass may be beyond it (harmless if none runs)
            self._wakeup.set()
        if self._scanning is None or self._scanning.done():
            self._scanning = asyncio.get_running_loop().create_task(self._scan())
        try:
            async with asyncio.timeout(self._timeout):
                result = await asyncio.shield(wanted[1])
        except TimeoutError as exc:
            raise SamError(
                ErrorCode.ledger_unavailable, f"{self._stream} did not give the result in time"
            ) from exc
        finally:
            if self._wanted.get(key) is wanted and not wanted[1].done():
                del self._wanted[key]  # given up on: the reader stops when nothing is wanted
                self._wakeup.set()
        self._kept[kept_as] = result
        if len(self._kept) > _KEPT:
            self._kept.popitem(last=False)
        return result

    async def _scan(self) -> None:
        """Read the stream while results are wanted: from the earliest time wanted, and
        again from there when a result comes to be wanted that the pass may have gone by."""
        while self._wanted:
            self._start = min(stored_at for stored_at, _ in self._wanted.values()) - _READ_BACK_SECONDS
            self._passed, self._rewind = 0.0, False
            queue: AbstractQueue | None = None
            tag = ""
            try:
                queue = await self._reader.get_queue(self._stream, ensure=False)
                since = datetime.datetime.fromtimestamp(max(self._start, 0), datetime.UTC)
                tag = await queue.consume(self._on_message, arguments={"x-stream-offset": since})
                while self._wanted and not self._rewind:
                    self._wakeup.clear()
                    await self._wakeup.wait()
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                error = SamError(
                    ErrorCode.ledger_unavailable, f"{self._stream} cannot be read ({type(exc).__name__})"
                )
                for _, future in self._wanted.values():
                    if not future.done():
                        future.set_exception(error)
                self._wanted.clear()
            finally:
                if queue is not None and tag:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(queue.cancel(tag), self._timeout)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if isinstance(message.timestamp, datetime.datetime):
            self._passed = max(self._passed, message.timestamp.timestamp())
        headers = message.headers or {}
        request, attempt = headers.get(_REQUEST_HEADER), headers.get(_ATTEMPT_HEADER)
        wanted = (
            self._wanted.pop((request, attempt), None)
            if isinstance(request, str) and isinstance(attempt, int)
            else None
        )
        if wanted is not None and not wanted[1].done():  # only a wanted result is parsed
            try:
                wanted[1].set_result(StoredResult.from_record(orjson.loads(message.body)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                wanted[1].set_exception(
                    SamError(ErrorCode.ledger_unavailable, f"{self._stream} holds an unreadable result")
                )
            self._wakeup.set()
        await message.ack()


class MarkedResults:
    """The ``MarkReader`` on ``sam.sad-use``, whose messages are ``StreamLedger`` batches of
    records: each read is a consumer of its own from the mark's offset, cancelled once
    that message is read — a repeat costs one message read, and no other repeat (however
    old, however many) stands before it. At most ``concurrent`` reads run at once (a
    burst of repeats waits its turn, first come first served, within the timeout).

    The reads have a channel of their own, opened on ``connection`` when needed and again
    if the broker closed it, with a small prefetch (a read wants one message, not the
    stream after it). A timeout never cancels a consume or cancel RPC midway — aiormq
    closes the whole channel when one is — so both run to their end in the background,
    and a read that gave up still takes its consumer away."""

    def __init__(
        self,
        connection: AbstractConnection,
        timeout: float,
        stream: str = SAD_USE_STREAM,
        concurrent: int = 8,
        prefetch: int = 8,
    ) -> None:
        self._connection = connection
        self._timeout = timeout
        self._stream = stream
        self._prefetch = prefetch
        self._slots = asyncio.Semaphore(concurrent)
        self._channel: AbstractChannel | None = None
        self._opening: asyncio.Task[AbstractChannel] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def read(self, position: int, request: str, attempt: int) -> StoredResult:
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                body = await self._message_at(position)
        except TimeoutError:
            raise SamError(
                ErrorCode.ledger_unavailable, f"{self._stream} did not give the result in time"
            ) from None
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise SamError(
                ErrorCode.ledger_unavailable, f"{self._stream} cannot be read ({type(exc).__name__})"
            ) from exc
        try:
            for record in orjson.loads(body).get("records") or ():
                result = SadUseLog.result_in(record, request, attempt)
                if result is not None:
                    return StoredResult.from_record(result)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
        raise SamError(ErrorCode.ledger_unavailable, f"{self._stream} holds no such result at {position}")

    async def _open_channel(self) -> AbstractChannel:
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        return channel

    async def _channel_now(self) -> AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open_channel())
        self._channel = await asyncio.shield(self._opening)
        return self._channel

    async def _message_at(self, position: int) -> bytes:
        """The body of the message at ``position``: a stream consumer starts at the chunk
        holding it, so the messages before it in that chunk are passed over."""
        found: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            offset = (message.headers or {}).get("x-stream-offset")
            if isinstance(offset, int) and offset >= position and not found.done():
                found.set_result(message.body if offset == position else b"{}")
            with contextlib.suppress(Exception):  # the channel may be going: nothing to ack then
                await message.ack()

        queue = await (await self._channel_now()).get_queue(self._stream, ensure=False)
        consuming = asyncio.ensure_future(queue.consume(on_message, arguments={"x-stream-offset": position}))
        try:
            await asyncio.shield(consuming)
            return await found
        finally:
            task = asyncio.ensure_future(self._cancel_once_consuming(queue, consuming))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    @staticmethod
    async def _cancel_once_consuming(queue: AbstractQueue, consuming: asyncio.Future[str]) -> None:
        with contextlib.suppress(Exception):
            tag = await consuming
            await queue.cancel(tag)
