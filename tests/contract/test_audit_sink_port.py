"""One suite for the ``AuditSink`` port, run over the in-memory sink and over
``AuditTrail`` writing real files and publishing to a real broker queue with
confirms: a record comes back as its chained entry once durable, every entry of the
trail verifies (hash chain and signed checkpoints), the service and admin logs are
chains of their own, and a sink that cannot make a record durable refuses with
``audit_unavailable`` instead of answering."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sam_devtools.stack import Stack
from worker.audit_trail import ArchiveRefused, AuditTrail, audit_file
from worker.client import ClientProfile
from worker.domain.audit import AuditEvent, AuditLog, Outcome, verify_entries
from worker.errors import ErrorCode, SamError
from worker.fakes import MemoryAudit, SoftwareHsm
from worker.ports import AuditSink
from worker.settings import TlsFiles
from worker.transport.amqp import tls_context


@dataclass
class Subject:
    sink: AuditSink
    trails: Callable[[], Awaitable[list[list[bytes]]]]  # every copy of the trail, as raw lines
    fail: Callable[[], None]  # from now on the sink cannot make records durable
    repair: Callable[[], None]  # and from now on it can again
    public_key: ec.EllipticCurvePublicKey


def _public_key(hsm: SoftwareHsm) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(hsm.audit_public_pem().encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


async def _trail_on_broker(stack: Stack, audit_dir: Path) -> AsyncIterator[Subject]:
    profile = ClientProfile.model_validate_json(stack.profile("bench").read_text())
    tls = TlsFiles(ca_file=profile.ca_file, cert_file=profile.cert_file, key_file=profile.key_file)
    connection = await aio_pika.connect(profile.url, ssl_context=tls_context(tls))
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    archive = await channel.declare_queue(f"bench.audit-archive-{uuid.uuid4()}", exclusive=True)
    feed = await channel.declare_queue(f"bench.audit-feed-{uuid.uuid4()}", exclusive=True)
    target = {"queue": archive.name}

    async def to_archive(body: bytes) -> None:  # as the worker's adapter does
        message = aio_pika.Message(body, content_type="application/x-ndjson", delivery_mode=2)
        try:
            await channel.default_exchange.publish(message, routing_key=target["queue"], mandatory=True)
        except aio_pika.exceptions.DeliveryError as exc:
            raise ArchiveRefused(type(exc).__name__) from exc

    async def to_feed(body: bytes, routing_key: str) -> None:
        message = aio_pika.Message(body, content_type="application/x-ndjson", delivery_mode=2)
        await channel.default_exchange.publish(message, routing_key=feed.name)

    hsm = SoftwareHsm()
    trail = AuditTrail(
        "node-1", "contract", audit_dir, hsm.sign_audit_digest, to_archive, timeout=2.0, feed=to_feed
    )
    trail.start()
    archived: list[bytes] = []
    fed: list[bytes] = []

    async def drain(queue: aio_pika.abc.AbstractQueue, into: list[bytes]) -> None:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            into.extend(message.body.splitlines())

    async def trails() -> list[list[bytes]]:
        files = []
        for audit_log in AuditLog:
            path = audit_file(audit_dir, "contract", audit_log)
            files += path.read_bytes().splitlines() if path.exists() else []
        await drain(archive, archived)
        for _ in range(50):  # the live feed follows the commit, unawaited
            await drain(feed, fed)
            if len(fed) >= len(files):
                break
            await asyncio.sleep(0.05)
        return [files, list(archived), list(fed)]

    def fail() -> None:
        target["queue"] = f"bench.no-such-queue-{uuid.uuid4()}"  # unroutable: returned, not confirmed

    def repair() -> None:
        target["queue"] = archive.name

    try:
        yield Subject(trail, trails, fail, repair, _public_key(hsm))
    finally:
        await trail.close()
        await connection.close()


@pytest.fixture(params=["memory", pytest.param("trail", marks=pytest.mark.integration)])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Subject]:
    if request.param == "trail":
        async for subject in _trail_on_broker(request.getfixturevalue("stack"), tmp_path):
            yield subject
        return
    hsm = SoftwareHsm()
    sink = MemoryAudit(hsm.sign_audit_digest)

    async def trails() -> list[list[bytes]]:
        return [list(sink.lines)]

    def fail() -> None:
        sink.failing = True

    def repair() -> None:
        sink.failing = False

    yield Subject(sink, trails, fail, repair, _public_key(hsm))


def _event(log: AuditLog = AuditLog.service, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "operation": "signatures.create",
        "outcome": Outcome.success,
        "status": 200,
        "actor": "ssa-1",
        "request_id": str(uuid.uuid4()),
        "signer": "alice",
        "key_pair": "kp-1",
        "sad_jti": "jti-0001",
        "dtbs_sha256": ("ab" * 32,),
        **fields,
    }
    return AuditEvent(log=log, **values)


async def test_a_record_comes_back_as_its_chained_entry(subject: Subject) -> None:
    event = _event(error_code=None)
    entry = await subject.sink.record(event)
    assert entry["type"] == "record"
    for name in ("operation", "status", "error_code", "actor", "request_id", "signer", "key_pair", "sad_jti"):
        assert entry[name] == getattr(event, name), name
    assert entry["outcome"] == "success" and entry["dtbs_sha256"] == ["ab" * 32]
    assert len(entry["hash"]) == 64 and entry["seq"] >= 1


async def test_every_copy_of_the_trail_verifies_and_holds_every_record(subject: Subject) -> None:
    events = [_event(), _event(AuditLog.admin, operation="configurations.dynamic.put", status=204)]
    events.append(_event(outcome=Outcome.failure, status=403, error_code="sad_replayed"))
    entries = [await subject.sink.record(event) for event in events]
    copies = await subject.trails()
    assert all(sorted(copy) == sorted(copies[0]) for copy in copies)  # the file and the broker agree
    for lines in copies:
        report = verify_entries([("trail", n, line) for n, line in enumerate(lines, 1)], subject.public_key)
        assert report.ok, [str(problem) for problem in report.problems]
        hashes = {orjson.loads(line)["hash"] for line in lines}
        assert {entry["hash"] for entry in entries} <= hashes
        assert len(report.chains) == 2  # service and admin chain apart


async def test_a_sink_that_cannot_make_a_record_durable_refuses(subject: Subject) -> None:
    assert (await subject.sink.record(_event()))["type"] == "record"
    subject.fail()
    with pytest.raises(SamError) as refused:
        await subject.sink.record(_event(request_id="refused"))
    assert refused.value.code is ErrorCode.audit_unavailable


async def test_a_refused_request_is_recorded_once_saying_what_its_caller_got(subject: Subject) -> None:
    """Once the sink is back, the trail holds the refused request exactly once — as the
    audit_unavailable its caller got, never as the success that was decided."""
    subject.fail()
    with pytest.raises(SamError):
        await subject.sink.record(_event(request_id="withheld"))
    subject.repair()
    for _ in range(40):  # the next try waits for the backoff's first step
        try:
            await subject.sink.record(_event(request_id="after"))
            break
        except SamError:
            await asyncio.sleep(0.1)
    for lines in await subject.trails():
        records = [e for e in map(orjson.loads, lines) if e["type"] == "record"]
        (withheld,) = [r for r in records if r["request_id"] == "withheld"]
        assert (withheld["status"], withheld["error_code"]) == (503, "audit_unavailable")
        assert withheld["detail"].startswith("reply withheld")
