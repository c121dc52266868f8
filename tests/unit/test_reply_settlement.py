"""The one place that settles a delivery, over stand-in messages and channels: a reply
the broker does not confirm is published again; a result whose reply never is goes back
to its queue (its next delivery is a repeat, answered from the stored result), unless
the caller's own queue refused it; a refusal is acked (no caller makes one message cost
several passes). A dead letter is answered at most once; a request without a reply
queue is acked at once."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest

from worker.ports import IncomingRequest, Reply
from worker.transport import consumer as consumer_module
from worker.transport.consumer import RequestConsumer


class _Message:
    def __init__(self) -> None:
        self.type, self.message_id, self.correlation_id = "signatures.create", "m-1", "c-1"
        self.reply_to, self.user_id, self.content_type = "ssa-1.replies.x", "ssa-1", "application/json"
        self.content_encoding = self.app_id = self.cluster_id = None
        self.body, self.delivery_tag = b"{}", 1
        self.headers: dict[str, Any] = {}
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack requeue={requeue}")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject requeue={requeue}")


class _Exchange:
    def __init__(self, failures: int, nacked: bool) -> None:
        self.failures, self.nacked, self.published = failures, nacked, 0

    async def publish(self, message: Any, routing_key: str, mandatory: bool = True) -> None:
        self.published += 1
        if self.failures:
            self.failures -= 1
            if self.nacked:
                raise aio_pika.exceptions.DeliveryError(None, None)  # type: ignore[arg-type]
            raise TimeoutError


class _Channel:
    def __init__(self, failures: int, nacked: bool) -> None:
        self.default_exchange = _Exchange(failures, nacked)


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "REPLY_RETRY_PAUSES", (0.0, 0.0))


async def _deliver(
    failures: int, queue: str | None, reply_to: str | None, status: int, nacked: bool
) -> tuple[_Message, int]:
    async def process(request: IncomingRequest) -> Reply:
        return Reply(status, b"{}", reply_to=reply_to, correlation_id="c-1")

    channel = _Channel(failures, nacked)
    consumer = RequestConsumer(process, channel, channel, publish_timeout=1)  # type: ignore[arg-type]
    message = _Message()
    await consumer._on_message(queue, message)  # type: ignore[arg-type]
    return message, channel.default_exchange.published


@pytest.mark.parametrize(
    ("failures", "queue", "reply_to", "status", "nacked", "settled", "published"),
    [
        (0, "signatures", "q", 200, False, ["ack"], 1),  # confirmed at once
        (2, "signatures", "q", 200, False, ["ack"], 3),  # confirmed at the last try
        (3, "signatures", "q", 200, False, ["nack requeue=True"], 3),  # a result never confirmed: requeued
        # the caller's queue refused it: not sent again (a held delivery would slow every
        # tenant); acked, and a repeat recovers the result
        (3, "signatures", "q", 200, True, ["ack"], 1),
        (3, "signatures", "q", 400, False, ["ack"], 3),  # a refusal: acked, decided again on a repeat
        (3, None, "q", 200, False, ["ack"], 3),  # a dead letter: answered at most once
        (0, "signatures", None, 200, False, ["ack"], 0),  # no reply queue of the caller's own
    ],
)
async def test_a_delivery_is_settled_by_what_its_answer_was_and_whether_it_was_confirmed(
    failures: int,
    queue: str | None,
    reply_to: str | None,
    status: int,
    nacked: bool,
    settled: list[str],
    published: int,
) -> None:
    message, tries = await _deliver(failures, queue, reply_to, status, nacked)
    assert (message.settled, tries) == (settled, published)
