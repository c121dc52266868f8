"""On the real broker: random raw messages each get one reply (or, without reply_to,
none) and leave nothing behind; a message no consumer can finish is dead-lettered
after the delivery limit instead of circling for ever."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from typing import Any

import pytest

from sam_devtools.bench import rss_kb
from tests.integration.conftest import Harness, key_id
from worker.client import SamClient
from worker.domain.contract import KeyPairObject
from worker.settings import TlsFiles
from worker.transport.amqp import connect
from worker.transport.topology import DEAD_LETTER_QUEUE, DELIVERY_LIMIT

pytestmark = pytest.mark.integration

CASES = int(os.environ.get("SAM_BROKER_FUZZ_CASES", "300"))
MEMORY_CASES_PER_ROUND = int(os.environ.get("SAM_MEMORY_FUZZ_CASES", "500"))
MEMORY_ROUNDS = 4
OPERATIONS = [
    "signatures.create",
    "key_pairs.create",
    "signers.key_pairs.assign",
    "configurations.dynamic.get",
    "no.such.operation",
    "",
]


def _hostile(generator: random.Random) -> tuple[str, bytes, dict[str, Any], bool, str]:
    """(operation, body, headers, sign, routing key) of one random raw message."""
    body = generator.choice(
        [
            os.urandom(generator.randint(0, 200)),
            b"{" * generator.randint(1, 50),
            b'{"requests": [' + b"1," * generator.randint(0, 300) + b"1]}",
            b'{"key_template": {"algorithm": "ECDSA", "named_curve": "'
            + os.urandom(4).hex().encode()
            + b'"}}',
        ]
    )
    headers: dict[str, Any] = generator.choice(
        [{}, {"sam-sad": os.urandom(8).hex()}, {"sam-sad": 12}, {"sam-request-jws": ""}]
    )
    operation = generator.choice(OPERATIONS)
    return (
        operation,
        body,
        headers,
        generator.random() < 0.5,
        generator.choice(["signatures", "keys", "admin"]),
    )


async def test_random_raw_messages_get_one_answer_and_leave_nothing(harness: Harness) -> None:
    generator = random.Random(7)
    async with harness.client("ssa-1") as ssa:
        expected = []
        for n in range(CASES):
            operation, body, headers, sign, routing_key = _hostile(generator)
            reply_to = "" if generator.random() < 0.9 else None
            reply = await ssa.send(
                operation,
                body,
                headers=headers,
                sign=sign,
                reply_to=reply_to,
                routing_key=routing_key,
                wait=reply_to is not None,
                reply_timeout=10,
            )
            if reply is not None:
                document = reply.json()
                assert reply.status >= 400 and "error" in document, document
                expected.append(document["error"]["request_id"])
            if n % 50 == 0:
                assert len(await ssa.sign(*(await _valid_signature(harness, ssa)))) == 1  # still serving
        await asyncio.sleep(0.5)
        assert not ssa.unmatched_replies  # no second answer to anything
    for request_id in expected[:50]:
        assert harness.audit_record(request_id)["outcome"] == "failure"
    for _ in range(60):
        depths = harness.queue_depths()
        if all(depths[q] == (0, 0) for q in ("sam.admin", "sam.keys", "sam.signatures")):
            break
        await asyncio.sleep(0.25)
    assert all(depths[q] == (0, 0) for q in ("sam.admin", "sam.keys", "sam.signatures")), depths


async def test_worker_memory_stays_flat_under_hostile_input(harness: Harness) -> None:
    """Rounds of hostile messages, 16 in flight: after a warm-up round, the resident
    memory of both workers grows by less than 8 MiB over the remaining rounds (a leak
    of one object per request would show: the rounds are thousands of requests)."""
    generator = random.Random(11)
    pids = {name: process.pid for name, process in harness.workers.items() if process.poll() is None}
    assert pids
    resident: list[dict[str, int]] = []
    gate = asyncio.Semaphore(16)
    async with harness.client("ssa-1") as ssa:

        async def one() -> None:
            operation, body, headers, sign, routing_key = _hostile(generator)
            async with gate:
                reply = await ssa.send(
                    operation, body, headers=headers, sign=sign, routing_key=routing_key, reply_timeout=20
                )
            assert reply is not None and reply.status >= 400, reply

        for _ in range(MEMORY_ROUNDS):
            await asyncio.gather(*(one() for _ in range(MEMORY_CASES_PER_ROUND)))
            resident.append({name: rss_kb(pid) for name, pid in pids.items()})
    print(f"resident KiB after each round of {MEMORY_CASES_PER_ROUND}: {resident}")
    for name in pids:
        growth = resident[-1][name] - resident[0][name]
        assert growth < 8 * 1024, (name, resident)


_VALID: dict[str, KeyPairObject] = {}


async def _valid_signature(
    harness: Harness, ssa: SamClient
) -> tuple[KeyPairObject, str, str, list[bytes], str]:
    import hashlib

    if "key_pair" not in _VALID:
        _VALID["key_pair"] = await harness.certified_key_pair(ssa, "fuzz-control")
    key_pair = _VALID["key_pair"]
    digest = hashlib.sha256(uuid.uuid4().bytes).digest()
    sad = harness.dev_as.issue_sad(harness.sam_id, "fuzz-control", key_id(key_pair), [digest])
    return key_pair, "fuzz-control", "1.2.840.10045.4.3.2", [digest], sad


async def test_a_message_nobody_can_finish_is_dead_lettered_and_then_answered(harness: Harness) -> None:
    """A consumer that fails on one message every time (as a worker crashing on it
    would): after the delivery limit the broker moves it to sam.dead, once; a worker
    then answers it (request_undeliverable, to the caller's own queue) and audits it."""
    worker_pki = harness.stack.pki.root / "sam-worker"
    tls = TlsFiles(
        ca_file=harness.stack.pki.ca_file, cert_file=worker_pki / "cert.pem", key_file=worker_pki / "key.pem"
    )
    marker = str(uuid.uuid4())
    deliveries = 0
    async with harness.client("ssa-1") as ssa:
        async with harness.without_shared_workers():
            await ssa.send("signatures.create", b"{}", message_id=marker, wait=False)
            connection = await connect(harness.stack.url, tls)
            try:
                channel = await connection.channel()
                await channel.set_qos(prefetch_count=1)
                queue = await channel.get_queue("sam.signatures", ensure=False)
                async with queue.iterator() as messages:
                    while True:
                        try:
                            message = await asyncio.wait_for(anext(messages), 3)
                        except TimeoutError:
                            break  # nothing redelivered any more
                        deliveries += message.message_id == marker
                        await message.nack(requeue=True)
            finally:
                await connection.close()
            for _ in range(40):
                if harness.queue_depths()[DEAD_LETTER_QUEUE][0] >= 1:
                    break
                await asyncio.sleep(0.25)
            assert harness.queue_depths()[DEAD_LETTER_QUEUE][0] >= 1  # in sam.dead while no worker runs
        # the workers are back: the dead letter is answered and audited once
        record: dict[str, object] = {}
        for _ in range(100):
            found = [r for r in harness.audit_records() if r["request_id"] == marker]
            if found:
                [record] = found
                break
            await asyncio.sleep(0.1)
        for _ in range(100):
            if ssa.unmatched_replies:
                break
            await asyncio.sleep(0.05)
        answered = sum(ssa.unmatched_replies.values())  # it came after send() stopped waiting
    assert answered == 1
    assert deliveries == DELIVERY_LIMIT + 1, deliveries  # the first delivery and the limit's redeliveries
    assert (record["error_code"], record["status"], record["actor"]) == (
        "request_undeliverable",
        500,
        "ssa-1",
    )
    assert await harness.queue_drained(DEAD_LETTER_QUEUE)
