"""On the real broker, from an SSA's own account: every AMQP property and header with
bytes that are not UTF-8, out-of-range or oversized values, and replies aimed at queues
that are not the caller's. Each message gets its refusal (or, when reply_to is not the
caller's own queue, no reply anywhere) and one audit record; no worker restarts, drops
its connection or dead-letters anything, and the SAM's streams do not grow."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from typing import Any

import aio_pika
import orjson
import pytest

from sam_devtools.raw_client import RawSamClient
from tests.integration.conftest import EC_SHA256, Harness, key_id
from tests.raw_amqp import raw_encoding
from worker.client import ClientProfile
from worker.settings import TlsFiles
from worker.transport.amqp import tls_context
from worker.transport.codec import MAX_DEPTH

pytestmark = pytest.mark.integration

NOT_UTF8 = "\udcff\udcfe"  # sent as the bytes ff fe (see tests/raw_amqp.py)


class Sender:
    """ssa-1 on a raw aio-pika connection of its own, with its own reply queue."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.profile = ClientProfile.model_validate_json(harness.stack.profile("ssa-1").read_text())
        self.signer = RawSamClient.from_profile(harness.stack.profile("ssa-1"))
        self.replies: dict[str, dict[str, Any]] = {}
        self.uncorrelated: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.far_timestamps = False

    async def __aenter__(self) -> Sender:
        tls = TlsFiles(
            ca_file=self.profile.ca_file, cert_file=self.profile.cert_file, key_file=self.profile.key_file
        )
        self.connection = await aio_pika.connect(self.profile.url, ssl_context=tls_context(tls))
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.reply_queue = f"ssa-1.replies.envelope-{uuid.uuid4()}"
        queue = await self.channel.declare_queue(self.reply_queue, exclusive=True)
        await queue.consume(self._on_reply, no_ack=True)
        self.requests = await self.channel.get_exchange("sam.requests", ensure=False)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        reply = {"status": (message.headers or {}).get("sam-status"), **orjson.loads(message.body or b"{}")}
        if message.correlation_id:
            self.replies[message.correlation_id] = reply
        else:
            self.uncorrelated.append(reply)
        self.arrived.set()

    async def send(self, operation: str = "key_pairs.create", **properties: Any) -> tuple[str, str]:
        body = orjson.dumps({"key_template": {"algorithm": "ECDSA", "named_curve": "secp256r1"}})
        message_id = properties.pop("message_id", str(uuid.uuid4()))
        correlation_id = properties.pop("correlation_id", str(uuid.uuid4()))
        # the JWS binds what it can; a refusal of the envelope comes before it is read
        printable = [text.encode("utf-8", "replace").decode() for text in (message_id, operation)]
        headers: dict[str, Any] = {"sam-request-jws": self.signer.sign_request(body, *printable)}
        headers.update(properties.pop("headers", {}))
        message = aio_pika.Message(
            body,
            content_type=properties.pop("content_type", "application/json"),
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=properties.pop("reply_to", self.reply_queue),
            user_id="ssa-1",
            type=operation,
            headers=headers,
            **properties,
        )
        with raw_encoding(far_timestamps=self.far_timestamps):
            await self.requests.publish(message, routing_key="keys")
        return message_id, correlation_id

    async def reply(self, correlation_id: str) -> dict[str, Any]:
        async with asyncio.timeout(15):
            while correlation_id not in self.replies:
                self.arrived.clear()
                await self.arrived.wait()
        return self.replies.pop(correlation_id)


def _records(harness: Harness, code: str) -> list[dict[str, Any]]:
    return [r for r in harness.audit_records() if r["error_code"] == code]


def _key(record: dict[str, Any]) -> tuple[str, str, int]:
    return record["instance"], record["log"], record["seq"]


async def _new_records(
    harness: Harness, code: str, seen: set[tuple[str, str, int]], count: int
) -> list[dict[str, Any]]:
    """Records with ``code`` not among ``seen``, once there are ``count`` of them (the
    audit files of both workers are read one after the other, so order says nothing)."""
    new: list[dict[str, Any]] = []
    for _ in range(200):
        new = [r for r in _records(harness, code) if _key(r) not in seen]
        if len(new) >= count:
            break
        await asyncio.sleep(0.05)
    return new


def _seen(harness: Harness, code: str) -> set[tuple[str, str, int]]:
    return {_key(r) for r in _records(harness, code)}


def _worker_pids(harness: Harness) -> dict[str, int]:
    assert all(p.poll() is None for p in harness.workers.values()), "a worker exited"
    return {name: p.pid for name, p in harness.workers.items()}


# (what is broken, the AMQP properties to send): every short string a publisher sets
# (user_id is checked by the broker against the certificate and cannot be forged)
NOT_UTF8_CASES: list[tuple[str, dict[str, Any]]] = [
    ("type", {"operation": "key_pairs.create" + NOT_UTF8}),
    ("app_id", {"app_id": NOT_UTF8}),
    ("content_type", {"content_type": "application/json" + NOT_UTF8}),
    ("content_encoding", {"content_encoding": NOT_UTF8}),
    ("message_id", {"message_id": "m-" + NOT_UTF8}),
    ("header name", {"headers": {"x-" + NOT_UTF8: "v"}}),
    ("header value in a table", {"headers": {"x-nested": {"k" + NOT_UTF8: 1}}}),
    ("the SAD header's value", {"headers": {"sam-sad": "a.b.c" + NOT_UTF8}}),
]


async def test_properties_that_are_not_utf8_are_refused_and_the_workers_serve_on(harness: Harness) -> None:
    pids = _worker_pids(harness)
    before = _seen(harness, "invalid_properties")
    dead_before = harness.dead_letter_records()
    async with Sender(harness) as sender:
        sent = []
        for name, properties in NOT_UTF8_CASES:
            operation = properties.pop("operation", "key_pairs.create")
            sent.append((name, *await sender.send(operation, **dict(properties))))
        for name, _, correlation_id in sent:
            reply = await sender.reply(correlation_id)
            assert (reply["status"], reply.get("error", {}).get("code")) == (400, "invalid_properties"), name
            assert "not UTF-8" in reply["error"]["message"] or "sam-sad" in reply["error"]["message"], name
    records = await _new_records(harness, "invalid_properties", before, len(NOT_UTF8_CASES))
    assert len(records) == len(NOT_UTF8_CASES)
    for record in records:
        assert record["operation"] in ("key_pairs.create", "unknown")
        assert record["request_id"] is None or "\\udc" not in record["request_id"]
        assert record["actor"] == "ssa-1" and record["status"] == 400
    assert _worker_pids(harness) == pids
    assert harness.dead_letter_records() == dead_before  # nothing died in a request queue


async def test_binary_header_values_the_sam_does_not_read_are_no_fault(harness: Harness) -> None:
    """AMQP long strings may hold any bytes (pamqp hands them over as bytes): a header
    the SAM does not read may be binary; its own headers may not (see above)."""
    async with Sender(harness) as sender:
        _, correlation_id = await sender.send(
            headers={"x-binary": "b" + NOT_UTF8, "x-list": ["a" + NOT_UTF8]}
        )
        assert (await sender.reply(correlation_id))["status"] == 201


async def test_out_of_range_and_oversized_values_are_refused_or_ignored(harness: Harness) -> None:
    pids = _worker_pids(harness)
    deep: dict[str, Any] = {"x": 1}
    for _ in range(MAX_DEPTH + 10):
        deep = {"d": deep}
    async with Sender(harness) as sender:
        # a header table nested beyond what the codec reads: refused, not a RecursionError
        _, deep_id = await sender.send(headers={"x-deep": deep})
        # a 250-byte type: unknown_operation, audited as "unknown" (its routing key stays short)
        _, long_type_id = await sender.send("k" * 250)
        # a request JWS header of 60 kB
        _, big_jws_id = await sender.send(headers={"sam-request-jws": "a." * 30_000 + "b"})
        # a 255-byte correlation id: refused; the reply cannot carry it, so it comes uncorrelated
        await sender.send(correlation_id="c" * 255)
        assert (await sender.reply(deep_id))["error"]["code"] == "invalid_properties"
        long_type = await sender.reply(long_type_id)
        assert long_type["error"]["code"] == "unknown_operation"
        assert (await sender.reply(big_jws_id))["error"]["code"] == "invalid_properties"
        for _ in range(100):
            if sender.uncorrelated:
                break
            await asyncio.sleep(0.05)
        assert [r["error"]["code"] for r in sender.uncorrelated] == ["invalid_properties"]
    record = harness.audit_record(long_type["error"]["request_id"])
    assert (record["operation"], record["error_code"]) == ("unknown", "unknown_operation")
    assert _worker_pids(harness) == pids


async def test_a_timestamp_beyond_any_calendar_costs_no_connection(harness: Harness) -> None:
    """pamqp reads a 64-bit timestamp into a datetime; 2**63-1 seconds fails that. The
    worker reads it as no timestamp (it does not use the property)."""
    pids = _worker_pids(harness)
    async with Sender(harness) as sender:
        sender.far_timestamps = True
        _, correlation_id = await sender.send(timestamp=datetime.datetime.now(datetime.UTC))
        assert (await sender.reply(correlation_id))["status"] == 201
    assert _worker_pids(harness) == pids


async def test_replies_go_only_to_the_callers_own_queue(harness: Harness, stack: Any) -> None:
    """reply_to naming another SSA's reply queue, a SAM stream or a request queue gets no
    reply there (nor anywhere), and one audit record of the refusal."""
    before = _seen(harness, "reply_to_not_permitted")
    key_events_before = await _settled_stream_length(harness, "sam.key-events")
    async with harness.client("admin-1") as admin, Sender(harness) as sender:
        # a queue of another user that exists and that we can watch
        victim = f"admin-1.replies.watch-{uuid.uuid4()}"
        watched = await admin._channel.declare_queue(victim, exclusive=True)  # type: ignore[union-attr]
        targets = [
            victim,
            "sam.key-events",
            "sam.signatures",
            "sam.audit.archive",
            "ssa-1.replies",
            "amq.rabbitmq.reply-to.g2dkABN",
        ]
        for target in targets:
            await sender.send(reply_to=target)
        records = await _new_records(harness, "reply_to_not_permitted", before, len(targets))
        assert len(records) == len(targets)
        await asyncio.sleep(0.5)
        assert watched.declaration_result.message_count == 0
        assert await watched.get(no_ack=True, fail=False) is None
        assert not sender.replies and not sender.uncorrelated
    assert await _settled_stream_length(harness, "sam.key-events") == key_events_before
    # and the SAM still answers its callers
    async with harness.client("ssa-1") as ssa:
        key_pair = await harness.certified_key_pair(ssa, "alice")
        digest = bytes(32)
        sad = harness.dev_as.issue_sad(harness.sam_id, "alice", key_id(key_pair), [digest])
        assert len(await ssa.sign(key_pair, "alice", EC_SHA256, [digest], sad)) == 1


async def _settled_stream_length(harness: Harness, name: str) -> int:
    """The stream's message count once two reads a statistics interval apart agree
    (RabbitMQ refreshes queue statistics every 5 s)."""
    length = _stream_length(harness, name)
    for _ in range(6):
        await asyncio.sleep(5.5)
        again = _stream_length(harness, name)
        if again == length:
            return length
        length = again
    return length


def _stream_length(harness: Harness, name: str) -> int:
    out = harness.stack.rabbitmqctl(
        "list_queues", "-p", "sam", "name", "messages", "--no-table-headers", "-q"
    ).stdout
    for line in out.splitlines():
        queue, messages = line.split("\t")
        if queue == name:
            return int(messages)
    raise AssertionError(f"no queue {name}")


async def test_a_reply_bounced_into_a_request_queue_is_no_request(harness: Harness) -> None:
    """An SSA may declare its reply queue with a dead-letter exchange of its choosing: the
    SAM's reply then expires there and comes back into sam.keys. It is refused as no
    request, answered nowhere, and the original request's reply stays the only answer."""
    before = _seen(harness, "invalid_properties")
    async with Sender(harness) as sender:
        bouncer = f"ssa-1.replies.bounce-{uuid.uuid4()}"
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": "sam.requests",
            "x-dead-letter-routing-key": "keys",
            "x-message-ttl": 0,
        }
        await sender.channel.declare_queue(bouncer, exclusive=True, arguments=arguments)
        message_id, _ = await sender.send(reply_to=bouncer)
        records = await _new_records(harness, "invalid_properties", before, 1)
        bounced = [r for r in records if "no request" in (r["detail"] or "")]
        assert len(bounced) == 1, records
        assert bounced[0]["actor"] is None
        assert harness.audit_record(message_id)["status"] == 201  # the request itself: one record
        assert not sender.replies and not sender.uncorrelated
    assert await harness.queue_drained("sam.keys")
