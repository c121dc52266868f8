"""Repeats through the real broker and workers: a request sent again unchanged (even with a
fresh request JWS) gets the original signature, marked as a repeat, from whichever worker
takes it; a worker stopped (SIGSTOP) with the request in hand loses nothing to the SDK's
retry — the SSA gets its signature, the stopped worker, resumed, answers its copy with
the same stored result, and the trail holds one result made."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import signal
import uuid
from typing import Any

import orjson
import pytest

from sam_devtools.raw_client import RawSamClient
from tests.integration.conftest import EC_SHA256, Harness, key_id, wire
from worker.client import SamRequestError
from worker.domain.contract import KeyPairObject

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def key_pair(harness: Harness, ssa: RawSamClient) -> KeyPairObject:
    return await harness.certified_key_pair(ssa, "repeat-signer")


# one signature's result travels in its answered mark (sam.sad-use); sixty's is too
# large for that and goes to sam.results (RESULT_IN_MARK_BYTES): both ways are tried
KEPT_IN = pytest.mark.parametrize("digests", [1, 60], ids=["result in its mark", "result in sam.results"])


def _request(harness: Harness, key_pair: KeyPairObject, digests: int = 1) -> tuple[str, bytes, str]:
    message_id = str(uuid.uuid4())
    dtbs = [hashlib.sha256(f"{message_id}/{n}".encode()).digest() for n in range(digests)]
    body = orjson.dumps(
        {
            "signature_algorithm": EC_SHA256,
            "requests": [{"dtbs": base64.b64encode(digest).decode()} for digest in dtbs],
            "key_pair": wire(key_pair),
            "signer": {"id": "repeat-signer"},
        }
    )
    return (
        message_id,
        body,
        harness.dev_as.issue_sad(harness.sam_id, "repeat-signer", key_id(key_pair), dtbs),
    )


def _made(harness: Harness, request_id: str) -> list[dict[str, Any]]:
    """The records of ``request_id`` that made its result (not the answers of its repeats)."""
    return [
        r
        for r in harness.audit_records()
        if r["request_id"] == request_id
        and r["status"] == 200
        and not (r.get("detail") or "").startswith("a repeat")
    ]


@KEPT_IN
async def test_a_repeat_gets_the_original_signature(
    harness: Harness, ssa: RawSamClient, key_pair: KeyPairObject, digests: int
) -> None:
    message_id, body, sad = _request(harness, key_pair, digests)
    first = await ssa.send("signatures.create", body, sad=sad, message_id=message_id)
    repeats = [await ssa.send("signatures.create", body, sad=sad, message_id=message_id) for _ in range(4)]
    assert first is not None and first.status == 200 and not first.repeat
    for repeat in repeats:  # each with a request JWS of its own; the two shared workers take turns
        assert repeat is not None and (repeat.status, repeat.body, repeat.repeat) == (200, first.body, True)
    await asyncio.sleep(1)  # the last records' batch
    assert len(_made(harness, message_id)) == 1
    records = [r for r in harness.audit_records() if r["request_id"] == message_id]
    assert len(records) == 5 and all(r["dtbs_sha256"] == records[0]["dtbs_sha256"] for r in records)


async def test_the_same_sad_in_another_request_is_still_a_replay(
    harness: Harness, ssa: RawSamClient, key_pair: KeyPairObject
) -> None:
    message_id, body, sad = _request(harness, key_pair)
    first = await ssa.send("signatures.create", body, sad=sad, message_id=message_id)
    replay = await ssa.send("signatures.create", body, sad=sad)  # a new message_id
    reused = await ssa.send("signatures.create", body + b" ", sad=sad, message_id=message_id)
    assert first is not None and first.status == 200
    assert replay is not None and replay.code == "sad_replayed"
    assert reused is not None and reused.code == "request_id_reused"


async def test_a_stopped_worker_loses_nothing_to_the_retry(
    harness: Harness, ssa: RawSamClient, key_pair: KeyPairObject
) -> None:
    """The issue's case: the SDK sends again after its timeout while the worker holding the
    request is stopped. Before, the retry got sad_replayed and the stopped worker, resumed,
    signed — a signature the SSA was told had failed."""
    message_id, body, sad = _request(harness, key_pair)
    retried = ssa.retried
    async with harness.without_shared_workers():
        stopped = await asyncio.to_thread(harness.start_worker, "worker-stopped")
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            sending = asyncio.ensure_future(
                ssa.send(
                    "signatures.create", body, sad=sad, message_id=message_id, reply_timeout=4, retries=3
                )
            )
            await asyncio.sleep(0.5)  # the first copy sits in the stopped worker's prefetch
            await asyncio.to_thread(harness.start_worker, "worker-taker")
            reply = await sending
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        copies = 1 + ssa.retried - retried
        unmatched = sum(ssa.unmatched_replies.values())
        for _ in range(40):  # the resumed worker answers its copy too, and so on
            if sum(ssa.unmatched_replies.values()) - unmatched == copies - 1:
                break
            await asyncio.sleep(0.25)
        late = sum(ssa.unmatched_replies.values()) - unmatched
        await harness.stop_worker("worker-stopped")
        await harness.stop_worker("worker-taker")
    assert reply is not None and reply.status == 200
    assert copies >= 2 and late == copies - 1  # every copy answered, the stopped worker's too
    assert len(_made(harness, message_id)) == 1  # one signature released, to the SSA
    codes = {r["error_code"] for r in harness.audit_records() if r["request_id"] == message_id}
    assert codes <= {None, "request_taken_over"}, codes


@KEPT_IN
async def test_a_worker_started_later_answers_a_repeat_with_the_original_result(
    harness: Harness, ssa: RawSamClient, key_pair: KeyPairObject, digests: int
) -> None:
    """Claims and results live in the streams, not in a worker: one started after the
    answer (every worker that saw the request gone) replays the claim and reads the result."""
    message_id, body, sad = _request(harness, key_pair, digests)
    first = await ssa.send("signatures.create", body, sad=sad, message_id=message_id)
    async with harness.without_shared_workers():
        await asyncio.to_thread(harness.start_worker, "worker-later")
        try:
            again = await ssa.send("signatures.create", body, sad=sad, message_id=message_id)
        finally:
            await harness.stop_worker("worker-later")
    assert first is not None and first.status == 200
    assert again is not None and (again.status, again.body, again.repeat) == (200, first.body, True)


async def test_a_request_the_sdk_gave_up_on_is_never_signed(
    harness: Harness, ssa: RawSamClient, key_pair: KeyPairObject
) -> None:
    """No worker runs while the SDK waits and sends again; when one starts after the SDK
    gave up, the copies still queued have expired there (and are answered
    request_expired from sam.dead), so nothing is signed that the SSA holds as unknown."""
    from worker.client import SamTimeout

    message_id, body, sad = _request(harness, key_pair)
    async with harness.without_shared_workers():
        with pytest.raises(SamTimeout):
            await ssa.send(
                "signatures.create", body, sad=sad, message_id=message_id, reply_timeout=1.5, retries=1
            )
        await asyncio.sleep(1)
        await asyncio.to_thread(harness.start_worker, "worker-after")
        try:
            for _ in range(60):
                if [r for r in harness.audit_records() if r["request_id"] == message_id]:
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(1)
        finally:
            await harness.stop_worker("worker-after")
    records = [r for r in harness.audit_records() if r["request_id"] == message_id]
    assert records and {r["error_code"] for r in records} == {"request_expired"}, records


async def test_the_sdk_recovers_its_reply_queue_when_it_is_deleted(
    harness: Harness, key_pair: KeyPairObject
) -> None:
    """Without its reply queue every reply is dropped unseen: the SDK notices the broker
    cancelling its consumer and opens everything anew."""
    async with harness.client("ssa-1") as ssa:
        harness.stack.rabbitmqctl("delete_queue", "-p", "sam", ssa._reply_queue_name)
        for _ in range(40):
            if ssa.reconnects:
                break
            await asyncio.sleep(0.25)
        message_id, body, sad = _request(harness, key_pair)
        reply = await ssa.send("signatures.create", body, sad=sad, message_id=message_id, reply_timeout=10)
    assert ssa.reconnects >= 1
    assert reply is not None and reply.status == 200


async def test_a_lost_answer_to_an_assignment_is_recovered_with_its_message_id(
    harness: Harness, ssa: RawSamClient
) -> None:
    """Without it, the SSA's copy of a key pair whose assignment answer was lost is one the
    SAM no longer takes (already assigned, outdated) — for good."""
    created = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
    message_id = str(uuid.uuid4())
    first = await ssa.assign_key_pair(created, "dora", "CN=Dora,O=Example", message_id=message_id)
    # the answer above is the one "lost"; the same call with its id gets that result again
    again = await ssa.assign_key_pair(created, "dora", "CN=Dora,O=Example", message_id=message_id)
    assert again == first and again.status is not None and again.status.assigned
    with pytest.raises(SamRequestError) as fresh:  # a new request with the old copy
        await ssa.assign_key_pair(created, "dora", "CN=Dora,O=Example")
    assert fresh.value.code == "key_pair_already_assigned"
