"""Repeats of a request — the same caller, message_id, operation, body and SAD — on two
replicas of the service over shared in-memory streams: a repeat of an answered request
gets the stored result (marked as a repeat) on any replica; a repeat of a request whose
attempt hung or died takes it over, and the slow attempt's result is then dropped
(``request_taken_over``), so exactly one attempt answers with a result. A *different*
request with a spent SAD is still ``sad_replayed``; a reused message_id is
``request_id_reused``."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import time
import uuid
from typing import Any

import orjson
import pytest

from tests.unit.test_hostile_input import EC_SHA256
from tests.unit.test_key_event_marks import Replicas
from worker.domain.audit import Outcome
from worker.domain.ledgers import Reducer, RequestIdentity, SadUseLog, Verdict
from worker.errors import ErrorCode, SamError
from worker.fakes import MemoryResults, ReplicaLedger, SharedStream
from worker.ports import IncomingRequest, Reply, StoredResult
from worker.service import RESULT_IN_MARK_BYTES, SamService


class Gate:
    """Holds attempt 0 of a request between signing and keeping its result, until
    ``release`` is set (an attempt that signed and then hung: SIGSTOP); ``failing``: the
    result cannot be kept (the store or the log does not answer)."""

    def __init__(self) -> None:
        self.gate_first = False
        self.failing = False
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def passing(self, attempt: int) -> None:
        if self.gate_first and attempt == 0:
            self.waiting.set()
            await self.release.wait()
        if self.failing:
            raise SamError(ErrorCode.ledger_unavailable, "the result could not be kept")


class GatedResults(MemoryResults):
    """A result store whose ``put`` passes the gate first."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    async def put(self, request: str, attempt: int, result: StoredResult) -> None:
        await self.gate.passing(attempt)
        await super().put(request, attempt, result)


class GatedMarks(ReplicaLedger):
    """A replica's sam.sad-use whose answered marks that carry their result pass the gate
    first."""

    def __init__(self, gate: Gate, stream: SharedStream, reducer: Reducer) -> None:
        super().__init__(stream, reducer)
        self.gate = gate

    async def append(self, data: dict[str, Any]) -> Verdict:
        if "result" in data:
            await self.gate.passing(int(data["attempt"]))
        return await super().append(data)


class Cluster(Replicas):
    """Two replicas; ``in_mark``: results travel in their answered marks (small ones do
    in production), else through the result store (large ones)."""

    def __init__(self, in_mark: bool) -> None:
        self.gated = Gate()
        self.in_mark = in_mark
        self.store = GatedResults(self.gated)
        super().__init__(
            self.store,
            functools.partial(GatedMarks, self.gated),
            RESULT_IN_MARK_BYTES if in_mark else 0,
        )

    def signature_request(self, text: bytes = b"document", message_id: str | None = None) -> IncomingRequest:
        digest = hashlib.sha256(text).digest()
        body = orjson.dumps(
            {
                "signature_algorithm": EC_SHA256,
                "requests": [{"dtbs": base64.b64encode(digest).decode()}],
                "key_pair": self.world.key_pair,
                "signer": {"id": "alice"},
            }
        )
        sad = self.world.authority.issue_sad("sam-1", "alice", self.world.key_pair["id"], [digest])
        return self.world.request("signatures.create", body, sad=sad, message_id=message_id or "m")

    def service(self, replica: int) -> SamService:
        return self.replicas[replica][0]

    def process(self, replica: int, request: IncomingRequest) -> Reply:
        return self.world.loop.run_until_complete(self.service(replica).process(request))


@pytest.fixture(params=[True, False], ids=["result in its mark", "result in the store"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    return Cluster(request.param)


def _code(reply: Reply) -> str | None:
    return orjson.loads(reply.body)["error"]["code"] if reply.status >= 400 else None


def _again(request: IncomingRequest, **changes: Any) -> IncomingRequest:
    """The same message delivered once more (a redelivery, or the SDK's retry)."""
    fields = {**request.__dict__, **changes}
    return IncomingRequest(**fields)


@pytest.mark.parametrize("replica", [0, 1])
def test_a_repeat_of_an_answered_signature_gets_the_same_signature(cluster: Cluster, replica: int) -> None:
    request = cluster.signature_request()
    first = cluster.process(0, request)
    again = cluster.process(replica, _again(request))
    assert (first.status, again.status) == (200, 200)
    assert again.body == first.body and again.repeat and not first.repeat
    record = cluster.world.audit.events[-1]
    assert record.outcome is Outcome.success and "a repeat" in (record.detail or "")
    assert record.dtbs_sha256 == cluster.world.audit.events[-2].dtbs_sha256  # said of the request again


def test_another_request_with_a_spent_sad_is_still_a_replay(cluster: Cluster) -> None:
    request = cluster.signature_request()
    assert cluster.process(0, request).status == 200
    another = cluster.world.request("signatures.create", request.body, sad=str(request.sad))
    replay = cluster.process(1, another)
    assert _code(replay) == "sad_replayed"


def test_a_reused_message_id_for_another_request_is_refused(cluster: Cluster) -> None:
    message_id = str(uuid.uuid4())
    assert cluster.process(0, cluster.signature_request(b"one", message_id)).status == 200
    for replica in (0, 1):  # known locally, or learnt from the log at the claim
        other = cluster.process(replica, cluster.signature_request(b"two", message_id))
        assert _code(other) == "request_id_reused"


@pytest.mark.parametrize("repeat_on", [0, 1])
def test_a_repeat_takes_over_from_an_attempt_that_hung_after_signing(
    cluster: Cluster, repeat_on: int
) -> None:
    """The first attempt signs and hangs before its result is stored; the repeat (on the
    same replica, which knows the claim; or on another, which learns it at its own claim)
    takes over and signs; the hung attempt, resumed, is refused and releases nothing."""
    cluster.gated.gate_first = True
    request = cluster.signature_request()

    async def scenario() -> tuple[Reply, Reply]:
        first = asyncio.ensure_future(cluster.service(0).process(request))
        await cluster.gated.waiting.wait()
        repeat = await cluster.service(repeat_on).process(_again(request))
        cluster.gated.release.set()
        return await first, repeat

    first, repeat = cluster.world.loop.run_until_complete(scenario())
    assert (_code(first), repeat.status) == ("request_taken_over", 200)
    successes = [e for e in cluster.world.audit.events if e.outcome is Outcome.success]
    assert len(successes) == 1
    # and any later repeat gets the taker's result
    assert cluster.process(1 - repeat_on, _again(request)).body == repeat.body


def test_a_repeat_takes_over_from_an_attempt_that_died_after_its_claim(cluster: Cluster) -> None:
    request = cluster.signature_request()
    identity = RequestIdentity.of(
        "ssa-1", str(request.message_id), "signatures.create", request.body, str(request.sad)
    )
    cluster.sad_use.records.append(
        SadUseLog.claim(identity, int(time.time()), 2**40)
    )  # the dead attempt's claim
    reply = cluster.process(1, _again(request))
    assert reply.status == 200 and not reply.repeat  # not sad_replayed: the same request
    log = SadUseLog(30)
    for record in cluster.sad_use.records:
        log.apply(record)
    # the dead attempt, had it lived on, could not answer now
    assert log.apply(SadUseLog.answered(identity, 0, 0, int(time.time()))).code.name == "request_taken_over"  # type: ignore[union-attr]


def test_a_key_pair_change_taken_over_finds_its_own_change_made(cluster: Cluster) -> None:
    """A deletion hung after its key event and before its result: the repeat on another
    replica finds the key pair deleted — by this very request — and answers as the
    deletion would have; the hung attempt releases nothing."""
    cluster.gated.gate_first = True
    body = orjson.dumps({"key_pair": cluster.world.key_pair, "signer": {"id": "alice"}})
    request = cluster.world.request("key_pairs.delete", body)

    async def scenario() -> tuple[Reply, Reply]:
        first = asyncio.ensure_future(cluster.service(0).process(request))
        await cluster.gated.waiting.wait()
        repeat = await cluster.service(1).process(_again(request))
        cluster.gated.release.set()
        return await first, repeat

    first, repeat = cluster.world.loop.run_until_complete(scenario())
    assert (_code(first), repeat.status) == ("request_taken_over", 200)
    assert orjson.loads(repeat.body) == {"key_pair_id": "kp-1", "deleted": True}
    assert len(cluster.key_events.records) == 2  # the change twice, the second idempotent
    after = cluster.process(0, cluster.signature_request(b"after"))
    assert _code(after) == "key_pair_deleted"


def test_a_repeat_of_a_key_pair_creation_gets_the_same_key_pair(cluster: Cluster) -> None:
    body = b'{"key_template": {"algorithm": "ECDSA", "named_curve": "secp256r1"}}'
    request = cluster.world.request("key_pairs.create", body)
    first = cluster.process(0, request)
    again = cluster.process(1, _again(request))
    assert (first.status, again.status) == (201, 201)
    assert orjson.loads(again.body)["key_pair"]["id"] == orjson.loads(first.body)["key_pair"]["id"]


def test_a_result_that_could_not_be_stored_is_not_released_and_a_repeat_signs(cluster: Cluster) -> None:
    request = cluster.signature_request()
    cluster.gated.failing = True
    failed = cluster.process(0, request)
    assert _code(failed) == "ledger_unavailable"  # the signature was made and dropped
    cluster.gated.failing = False
    assert cluster.process(1, _again(request)).status == 200  # not sad_replayed


def test_a_dead_letter_of_an_answered_request_gets_its_result(cluster: Cluster) -> None:
    """A request answered whose reply could not be confirmed goes back to its queue; past
    the delivery limit it dies — and its dead letter still gets the result."""
    request = cluster.signature_request()
    answered = cluster.process(0, request)
    dead = cluster.process(0, _again(request, dead_letter="delivery_limit"))
    assert (dead.status, dead.body, dead.repeat) == (200, answered.body, True)
    other = cluster.signature_request(b"other")
    assert _code(cluster.process(0, _again(other, dead_letter="delivery_limit"))) == "request_undeliverable"


def _forget_claims(cluster: Cluster) -> None:
    """The claims' window passes (the request JWS and SAD are long expired)."""
    for replica in (0, 1):
        cluster.service(replica)._sad_use.forget_expired(2**40)


def test_a_message_id_used_again_after_its_window_is_a_new_request_not_a_repeat(cluster: Cluster) -> None:
    """Once a claim is forgotten, the same message_id is a new request: it must not
    inherit the first request's standing — not its key event (a second assignment of one
    key pair, to another signer), not its stored result (a signature over another
    document)."""
    body = b'{"key_template": {"algorithm": "ECDSA", "named_curve": "secp256r1"}}'
    created = orjson.loads(cluster.process(0, cluster.world.request("key_pairs.create", body)).body)[
        "key_pair"
    ]
    message_id = str(uuid.uuid4())

    def assign(signer: str) -> Reply:
        document = {
            "key_pair": created,
            "signer": {"id": signer},
            "subject": f"CN={signer}",
            "authorization_server": "as-1",
        }
        return cluster.process(
            0,
            cluster.world.request("signers.key_pairs.assign", orjson.dumps(document), message_id=message_id),
        )

    assert assign("alice").status == 200
    _forget_claims(cluster)
    assert _code(assign("mallory")) == "key_pair_already_assigned"

    reused = str(uuid.uuid4())
    request_a = cluster.signature_request(b"document A", message_id=reused)
    signed_a = cluster.process(0, request_a)
    assert cluster.process(0, _again(request_a)).body == signed_a.body  # now kept by replica 0
    _forget_claims(cluster)
    request_b = cluster.signature_request(b"document B", message_id=reused)
    signed_b = cluster.process(0, request_b)
    again = cluster.process(0, _again(request_b))
    assert (signed_a.status, signed_b.status, again.status) == (200, 200, 200)
    assert again.repeat and again.body == signed_b.body != signed_a.body


def test_no_result_is_released_once_the_caller_stopped_waiting(cluster: Cluster) -> None:
    """``sam-answer-by`` passed: refused before anything runs; passed while the attempt
    was held up after signing: its result is dropped, not marked answered — and the
    caller's later repeat takes the request over instead of being told it was replayed."""
    late = _again(cluster.signature_request(), answer_by=int((time.time() - 1) * 1000))
    records = len(cluster.sad_use.records)
    assert _code(cluster.process(0, late)) == "request_expired"
    assert len(cluster.sad_use.records) == records  # nothing claimed, no SAD spent

    request = _again(cluster.signature_request(), answer_by=int((time.time() + 0.3) * 1000))
    hsm, signed, release = cluster.world.hsm, asyncio.Event(), asyncio.Event()
    sign = hsm.sign_with_wrapped_key

    async def sign_and_hang(*args: Any, **kwargs: Any) -> Any:
        signatures = await sign(*args, **kwargs)
        signed.set()
        await release.wait()
        return signatures

    async def held_past_its_deadline() -> Reply:
        first = asyncio.ensure_future(cluster.service(0).process(request))
        await signed.wait()
        await asyncio.sleep(0.5)
        release.set()
        return await first

    hsm.sign_with_wrapped_key = sign_and_hang  # type: ignore[method-assign]

    dropped = cluster.world.loop.run_until_complete(held_past_its_deadline())
    hsm.sign_with_wrapped_key = sign  # type: ignore[method-assign]
    assert _code(dropped) == "request_expired"
    again = cluster.process(1, _again(request, answer_by=None))
    assert again.status == 200 and not again.repeat


@pytest.mark.parametrize(("digests", "in_mark"), [(1, True), (60, False)])
def test_a_small_result_travels_in_its_mark_and_a_large_one_in_the_store(digests: int, in_mark: bool) -> None:
    """With the production bound (``RESULT_IN_MARK_BYTES``): one signature's result rides
    in its answered mark and costs the store nothing; sixty's goes to the store and the
    mark only says when. A repeat on the other replica gets it either way."""
    cluster = Cluster(in_mark=True)
    dtbs = [hashlib.sha256(b"%d" % n).digest() for n in range(digests)]
    body = orjson.dumps(
        {
            "signature_algorithm": EC_SHA256,
            "requests": [{"dtbs": base64.b64encode(d).decode()} for d in dtbs],
            "key_pair": cluster.world.key_pair,
            "signer": {"id": "alice"},
        }
    )
    sad = cluster.world.authority.issue_sad("sam-1", "alice", cluster.world.key_pair["id"], dtbs)
    request = cluster.world.request("signatures.create", body, sad=sad)
    first = cluster.process(0, request)
    marks = [r for r in cluster.sad_use.records if "answered" in r]
    assert first.status == 200 and len(marks) == 1
    assert ("result" in marks[0], len(cluster.store.results)) == (in_mark, 0 if in_mark else 1)
    again = cluster.process(1, _again(request))
    assert (again.status, again.body, again.repeat) == (200, first.body, True)
