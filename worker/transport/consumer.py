"""The request consumer: the broker message becomes an ``IncomingRequest`` here, and
this is the one place that settles a delivery (ack / reject).

Every delivery the service processed is answered and then acked — refusals included —
so a bad request is never redelivered. A delivery is rejected without requeue (to the
dead-letter queue) only when the worker cannot process it at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.domain.contract import HEADER_REQUEST_JWS, HEADER_SAD, HEADER_STATUS, QueueClass
from worker.ports import IncomingRequest, Reply

__all__ = ["RequestConsumer", "to_request"]

log = logging.getLogger(__name__)


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def to_request(message: AbstractIncomingMessage) -> IncomingRequest:
    """The delivery as the service sees it: AMQP properties, body, request JWS and SAD headers
    (a header that is not ASCII text counts as absent). Refuses nothing; the service checks."""
    return IncomingRequest(
        operation=message.type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        user_id=message.user_id,
        body=message.body,
        request_jws=_header(message, HEADER_REQUEST_JWS),
        sad=_header(message, HEADER_SAD),
    )


class RequestConsumer:
    """Consumes the work queues: every delivery goes to ``process``, its reply to ``reply_to``,
    then it is acked; a delivery ``process`` raises on is dead-lettered, never requeued."""

    def __init__(
        self,
        process: Callable[[IncomingRequest], Awaitable[Reply]],
        consume_channel: AbstractChannel,
        reply_channel: AbstractChannel,
        publish_timeout: float,
    ) -> None:
        self._process = process
        self._consume_channel = consume_channel
        self._reply_channel = reply_channel
        self._timeout = publish_timeout
        self._queues: list[AbstractQueue] = []  # references kept (aio-pika #536)
        self._tags: list[tuple[AbstractQueue, str]] = []
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, queues: tuple[QueueClass, ...]) -> None:
        for queue_class in queues:
            queue = await self._consume_channel.get_queue(queue_class.queue_name, ensure=False)
            self._queues.append(queue)
            self._tags.append((queue, await queue.consume(self._on_message)))

    async def stop(self) -> None:
        """Stop taking deliveries; those in hand finish."""
        for queue, tag in self._tags:
            # the channel may be gone already (broker lost): nothing more will arrive then
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                await queue.cancel(tag)
        self._tags.clear()
        await self._idle.wait()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.in_flight += 1
        self._idle.clear()
        try:
            request = to_request(message)
            try:
                reply = await self._process(request)
            except Exception:
                log.exception("request %s could not be processed; dead-lettered", message.message_id)
                await message.reject(requeue=False)
                return
            if request.reply_to:
                await self._send_reply(request, reply)
            await message.ack()
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def _send_reply(self, request: IncomingRequest, reply: Reply) -> None:
        message = aio_pika.Message(
            reply.body,
            content_type="application/json",
            correlation_id=request.correlation_id,
            headers={HEADER_STATUS: reply.status},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # survives a broker restart
        )
        try:
            async with asyncio.timeout(self._timeout):
                # mandatory=False: a caller that left (or uses direct reply-to) is not a fault.
                await self._reply_channel.default_exchange.publish(
                    message, routing_key=request.reply_to or "", mandatory=False
                )
        except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
            log.error(
                "reply to %s for %s not confirmed: %s",
                request.reply_to,
                request.message_id,
                type(exc).__name__,
            )
