"""The request consumer: the broker message becomes an ``IncomingRequest`` here, and
this is the one place that settles a delivery (ack / reject).

Every delivery the service processed is answered and then acked — refusals included —
so a bad request is never redelivered. A delivery is rejected without requeue (to the
dead-letter queue) only when the worker cannot process it at all.

A reply that the broker does not confirm is published again (``REPLY_RETRY_PAUSES``);
one the caller's queue refuses (a nack) is not: the delivery would hold a prefetch slot
through every pause, so one SSA's self-refusing reply queue could slow every tenant.
If it never is, what happens to the delivery depends on what the answer was:

- a **result** (its request acted, and the result is stored for repeats) whose reply
  timed out or was lost with the channel: the delivery goes back to its queue (nack with
  requeue) rather than being acked away — its next delivery is a repeat, answered with the
  stored result (``worker.service``), the queue's delivery limit bounds the round trips,
  and past it the dead-letter path answers with the stored result too;
- a result whose reply the caller's own queue **refused** (a nack: full, or set to reject
  publishes) is acked: sending it again would meet the same refusal, and a repeat of the
  request recovers the result;
- a **refusal** is acked: nothing was released, and a repeat is decided again — so no
  caller can make one unauthenticated message cost a worker several passes.

Retrying the publish comes first because a requeue costs a whole pass through the
pipeline and one more audit record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from worker.domain.contract import (
    HEADER_ANSWER_BY,
    HEADER_REPEAT,
    HEADER_REQUEST_JWS,
    HEADER_SAD,
    HEADER_STATUS,
    QueueClass,
)
from worker.ports import IncomingRequest, Reply
from worker.transport.codec import undecodable as undecodable_value
from worker.transport.topology import DEAD_LETTER_QUEUE

__all__ = ["REPLY_RETRY_PAUSES", "RequestConsumer", "to_request"]

log = logging.getLogger(__name__)

# seconds to wait before each further try of a reply the broker did not confirm
REPLY_RETRY_PAUSES = (0.2, 1.0)
# a reply queue's refusals are logged once in this many seconds (a flood is one line)
REFUSAL_LOG_SECONDS = 60.0


# every short-string property a publisher sets; the SAM reads some, but any of them that
# was not UTF-8 on the wire refuses the message (see ``worker.transport.codec``)
_STRING_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "message_id",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
)


_DEATH_REASONS = {"expired", "rejected", "maxlen", "delivery_limit"}


def _death_reason(headers: Mapping[str, object]) -> str:
    """Why RabbitMQ dead-lettered a message (its latest ``x-death`` entry), from a closed set."""
    deaths = headers.get("x-death")
    latest = deaths[0] if isinstance(deaths, list) and deaths else None
    reason = latest.get("reason") if isinstance(latest, dict) else None
    return reason if isinstance(reason, str) and reason in _DEATH_REASONS else "unknown"


def to_request(message: AbstractIncomingMessage, queue: str | None) -> IncomingRequest:
    """The delivery from the ``queue`` class (``None``: from ``sam.dead``) as the service's
    input, every value as decoded (the envelope gate checks them), and the names of the
    properties and headers that were not UTF-8."""
    headers = message.headers or {}
    dead = queue is None
    undecodable = [name for name in _STRING_PROPERTIES if undecodable_value(getattr(message, name, None))]
    if undecodable_value(headers):
        undecodable.append("headers")
    return IncomingRequest(
        operation=message.type,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        user_id=message.user_id,
        body=message.body,
        request_jws=headers.get(HEADER_REQUEST_JWS),
        sad=headers.get(HEADER_SAD),
        content_type=message.content_type,
        undecodable=tuple(undecodable),
        queue=queue,
        # a SAM reply (it carries sam-status) or a dead letter (x-death) that came back;
        # in sam.dead every message has its x-death
        returned=HEADER_STATUS in headers or ("x-death" in headers and not dead),
        dead_letter=_death_reason(headers) if dead else None,
        answer_by=headers.get(HEADER_ANSWER_BY),
    )


class _Sent(Enum):
    confirmed = "confirmed"
    refused = "refused"  # nacked: the caller's own queue would not take it
    unconfirmed = "unconfirmed"  # no confirm came (timeout, channel or connection lost)


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
        self._refusals_logged: dict[str, float] = {}  # reply_to's owner → when last logged

    async def start(self, queues: tuple[QueueClass, ...]) -> None:
        """Consume the request queues of ``queues`` and, on every worker, ``sam.dead``: a
        request that died unprocessed (expired, or past the delivery limit) still gets its
        answer and its audit record."""
        for queue_class in queues:
            await self._consume(
                queue_class.queue_name, functools.partial(self._on_message, queue_class.value)
            )
        await self._consume(DEAD_LETTER_QUEUE, functools.partial(self._on_message, None))

    async def _consume(
        self, name: str, on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> None:
        queue = await self._consume_channel.get_queue(name, ensure=False)
        self._queues.append(queue)
        self._tags.append((queue, await queue.consume(on_message)))

    async def stop(self) -> None:
        """Stop taking deliveries; those in hand finish."""
        for queue, tag in self._tags:
            # the channel may be gone already (broker lost): nothing more will arrive then
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                await queue.cancel(tag)
        self._tags.clear()
        await self._idle.wait()

    async def _on_message(self, queue: str | None, message: AbstractIncomingMessage) -> None:
        """One delivery from a request queue (``queue``: its class) or from ``sam.dead``
        (``None``). A dead letter that cannot be processed is dropped, not dead-lettered
        again (at-most-once: it must not circle)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            try:
                reply = await self._process(to_request(message, queue))
            except Exception:
                # the delivery tag is ours; the message id is the sender's, so never logged raw
                log.exception("delivery %d could not be processed; dead-lettered", message.delivery_tag or 0)
                await message.reject(requeue=False)
                return
            sent = _Sent.confirmed if reply.reply_to is None else await self._send_reply(reply)
            # a dead letter is answered at most once (sam.dead has no delivery limit)
            if sent is _Sent.unconfirmed and reply.status < 400 and queue is not None:
                with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                    await message.nack(requeue=True)
                return
            await message.ack()
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def _log_refusal(self, reply_to: str) -> None:
        owner = reply_to.split(".replies.", 1)[0]
        now = time.monotonic()
        if now - self._refusals_logged.get(owner, -REFUSAL_LOG_SECONDS) < REFUSAL_LOG_SECONDS:
            return
        if len(self._refusals_logged) > 10_000:  # owners are broker users; bounded anyway
            self._refusals_logged.clear()
        self._refusals_logged[owner] = now
        log.warning(
            "reply to %s refused by the queue (full or rejecting publishes); not sent again, and further "
            "refusals by %s's queues are not logged for %d s",
            reply_to,
            owner,
            REFUSAL_LOG_SECONDS,
        )

    async def _send_reply(self, reply: Reply) -> _Sent:
        """Publish the reply until the broker confirms it, or give up."""
        headers: dict[str, Any] = {HEADER_STATUS: reply.status}
        if reply.repeat:
            headers[HEADER_REPEAT] = True
        message = aio_pika.Message(
            reply.body,
            content_type="application/json",
            correlation_id=reply.correlation_id,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,  # survives a broker restart
        )
        failure, sent = "", _Sent.unconfirmed
        for pause in (0.0, *REPLY_RETRY_PAUSES):
            await asyncio.sleep(pause)
            try:
                async with asyncio.timeout(self._timeout):
                    # mandatory=False: a caller that left (or uses direct reply-to) is not a fault.
                    await self._reply_channel.default_exchange.publish(
                        message, routing_key=reply.reply_to or "", mandatory=False
                    )
                return _Sent.confirmed
            except aio_pika.exceptions.DeliveryError:
                # the caller's own queue said no (full, or set to reject publishes): it would
                # say so again, and a repeat of the request recovers a result
                self._log_refusal(reply.reply_to or "")
                return _Sent.refused
            except (TimeoutError, aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                failure, sent = type(exc).__name__, _Sent.unconfirmed
        log.warning(
            "reply to %s not confirmed after %d tries (%s)",
            reply.reply_to,
            1 + len(REPLY_RETRY_PAUSES),
            failure,
        )
        return sent
