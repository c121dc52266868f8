"""A request that dies in its queue before any worker takes it — its sender set a
per-message expiration, and the workers were busy or away — is answered from sam.dead
(request_expired, to the caller's own queue) and audited, instead of vanishing."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import Harness
from tests.integration.test_envelope import Sender

pytestmark = pytest.mark.integration


async def test_an_expired_request_is_answered_and_audited(harness: Harness) -> None:
    async with Sender(harness) as sender:
        async with harness.without_shared_workers():
            sent = [await sender.send(expiration=0.2) for _ in range(3)]  # 200 ms, nobody consuming
            await asyncio.sleep(1)
        for message_id, correlation_id in sent:
            reply = await sender.reply(correlation_id)
            assert (reply["status"], reply["error"]["code"]) == (503, "request_expired")
            record = harness.audit_record(message_id)
            assert (record["error_code"], record["actor"], record["operation"]) == (
                "request_expired",
                "ssa-1",
                "key_pairs.create",
            )
    assert await harness.queue_drained("sam.dead")
