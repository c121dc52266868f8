"""The one place that settles a delivery, over stand-in messages and channels: a delivery
is acked only once its reply is confirmed; a reply the broker does not confirm is
published again, and if it never is, the delivery goes back to its queue (its next
delivery is a repeat, answered from the stored result). A dead letter is answered at
most once; a request without a reply queue is acked at once."""

from __future__ import annotations

from typing import Any

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
    def __init__(self, failures: int) -> None:
        self.failures, self.published = failures, 0

    async def publish(self, message: Any, routing_key: str, mandatory: bool = True) -> None:
        self.published += 1
        if self.failures:
            self.failures -= 1
            raise TimeoutError


class _Channel:
    def __init__(self, failures: int) -> None:
        self.default_exchange = _Exchange(failures)


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "REPLY_RETRY_PAUSES", (0.0, 0.0))


async def _deliver(
    failures: int, queue: str | None = "signatures", reply_to: str | None = "q"
) -> tuple[_Message, int]:
    async def process(request: IncomingRequest) -> Reply:
        return Reply(200, b"{}", reply_to=reply_to, correlation_id="c-1")

    channel = _Channel(failures)
    consumer = RequestConsumer(process, channel, channel, publish_timeout=1)  # type: ignore[arg-type]
    message = _Message()
    await consumer._on_message(queue, message)  # type: ignore[arg-type]
    return message, channel.default_exchange.published


@pytest.mark.parametrize(
    ("failures", "queue", "reply_to", "settled", "published"),
    [
        (0, "signatures", "q", ["ack"], 1),  # confirmed at once
        (2, "signatures", "q", ["ack"], 3),  # confirmed at the last try
        (3, "signatures", "q", ["nack requeue=True"], 3),  # never confirmed: back to its queue
        (3, None, "q", ["ack"], 3),  # a dead letter: answered at most once
        (0, "signatures", None, ["ack"], 0),  # no reply queue of the caller's own: nothing to confirm
    ],
)
async def test_a_delivery_is_settled_only_once_its_answer_is_confirmed(
    failures: int, queue: str | None, reply_to: str | None, settled: list[str], published: int
) -> None:
    message, tries = await _deliver(failures, queue, reply_to)
    assert (message.settled, tries) == (settled, published)
