"""Each bad input gets its documented error code, exactly one reply, one audit record,
is never redelivered, and the workers keep serving."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sam_devtools.authorization_server import DevAuthorizationServer
from sam_devtools.pki import private_key_pem
from sam_devtools.raw_client import RawSamClient
from tests.integration.conftest import Harness, key_id, wire
from worker.client import RawReply
from worker.domain.contract import KeyPairObject

pytestmark = pytest.mark.integration

EC_SHA256 = "1.2.840.10045.4.3.2"
DIGEST = hashlib.sha256(b"the document").digest()
OTHER_DIGEST = hashlib.sha256(b"another document").digest()


@dataclass
class World:
    harness: Harness
    ssa: RawSamClient
    admin: RawSamClient
    unregistered: RawSamClient
    key_pair: KeyPairObject  # EC P-256, assigned to alice
    other_key_pair_id: str
    dead_letters_before: set[tuple[str, str, int]]

    def sad(self, digests: list[bytes] | None = None, **changes: Any) -> str:
        claims = self.harness.dev_as.sad_claims(
            self.harness.sam_id, "alice", key_id(self.key_pair), digests if digests is not None else [DIGEST]
        )
        detail_changes = changes.pop("detail", {})
        claims.update(changes)
        claims["authorization_details"][0].update(detail_changes)
        return self.harness.dev_as.sign_claims(claims)

    def sign_body(self, digests: list[bytes] | None = None, key_pair: KeyPairObject | None = None) -> bytes:
        return orjson.dumps(
            {
                "signature_algorithm": EC_SHA256,
                "requests": [{"dtbs": base64.b64encode(d).decode()} for d in (digests or [DIGEST])],
                "key_pair": wire(key_pair or self.key_pair),
                "signer": {"id": "alice"},
            }
        )

    async def sign(self, sad: str, digests: list[bytes] | None = None, **options: Any) -> RawReply:
        reply = await self.ssa.send("signatures.create", self.sign_body(digests), sad=sad, **options)
        assert reply is not None
        return reply


def _tamper(sealed: str, part: int) -> str:
    pieces = sealed.split(".")
    middle = len(pieces[part]) // 2
    char = pieces[part][middle]
    pieces[part] = pieces[part][:middle] + ("A" if char != "A" else "B") + pieces[part][middle + 1 :]
    return ".".join(pieces)


def _rogue_as(kid: str) -> DevAuthorizationServer:
    return DevAuthorizationServer(kid, private_key_pem(ec.generate_private_key(ec.SECP256R1())))


async def _create(w: World) -> RawReply:
    reply = await w.ssa.send(
        "key_pairs.create", b'{"key_template": {"algorithm": "ECDSA", "named_curve": "secp256r1"}}'
    )
    assert reply is not None
    return reply


async def _replayed(w: World) -> RawReply:
    sad = w.sad()
    first = await w.sign(sad)
    assert first.status == 200, first.json()
    return await w.sign(sad)


async def _bad_jws(w: World) -> RawReply:
    message_id = str(uuid.uuid4())
    other = w.ssa.sign_request(b'{"key_template": {}}', message_id, "key_pairs.create")
    reply = await w.ssa.send(
        "key_pairs.create",
        b'{"key_template": {"algorithm": "RSA", "size": 2048}}',
        message_id=message_id,
        request_jws=other,
    )
    assert reply is not None
    return reply


async def _expired(w: World) -> RawReply:
    now = int(time.time())
    return await w.sign(w.sad(iat=now - 900, exp=now - 600))


async def _too_long_lived(w: World) -> RawReply:
    now = int(time.time())
    return await w.sign(w.sad(iat=now, exp=now + 86400))


async def _tampered_key_pair(w: World, part: int) -> RawReply:
    key_pair = w.key_pair.model_copy(update={"sealed": _tamper(w.key_pair.sealed, part)})
    reply = await w.ssa.send("signatures.create", w.sign_body(key_pair=key_pair), sad=w.sad())
    assert reply is not None
    return reply


async def _raw(w: World, client: str, operation: str, body: bytes, **options: Any) -> RawReply:
    sender = {"ssa": w.ssa, "admin": w.admin, "unregistered": w.unregistered}[client]
    reply = await sender.send(operation, body, **options)
    assert reply is not None
    return reply


async def _stale_config(w: World) -> RawReply:
    current = await w.admin.get_configuration()
    return await _raw(w, "admin", "configurations.dynamic.put", orjson.dumps(wire(current)))


CASES: list[tuple[str, str, Callable[[World], Awaitable[RawReply]]]] = [
    ("unregistered SSA", "unknown_user", lambda w: _raw(w, "unregistered", "key_pairs.create", b"{}")),
    (
        "missing request JWS",
        "request_signature_missing",
        lambda w: _raw(w, "ssa", "key_pairs.create", b"{}", sign=False),
    ),
    ("request JWS over another body", "request_signature_invalid", _bad_jws),
    (
        "request JWS not a JWS",
        "request_signature_invalid",
        lambda w: _raw(w, "ssa", "key_pairs.create", b"{}", request_jws="x.y.z"),
    ),
    ("SAD missing", "sad_missing", lambda w: _raw(w, "ssa", "signatures.create", w.sign_body())),
    (
        "SAD by unregistered AS",
        "sad_issuer_unknown",
        lambda w: w.sign(
            _rogue_as("rogue-as").issue_sad(w.harness.sam_id, "alice", key_id(w.key_pair), [DIGEST])
        ),
    ),
    (
        "SAD forged under a registered kid",
        "sad_signature_invalid",
        lambda w: w.sign(
            _rogue_as("dev-as").issue_sad(w.harness.sam_id, "alice", key_id(w.key_pair), [DIGEST])
        ),
    ),
    (
        "SAD by an AS this SSA may not use",
        "sad_issuer_not_allowed",
        lambda w: w.sign(
            w.harness.other_as.issue_sad(w.harness.sam_id, "alice", key_id(w.key_pair), [DIGEST])
        ),
    ),
    ("SAD expired", "sad_expired", _expired),
    ("SAD lifetime over the policy", "sad_expired", _too_long_lived),
    ("SAD for another audience", "sad_audience_mismatch", lambda w: w.sign(w.sad(aud="another-sam"))),
    ("SAD for another signer", "sad_signer_mismatch", lambda w: w.sign(w.sad(sub="mallory"))),
    (
        "SAD for another key pair",
        "sad_key_pair_mismatch",
        lambda w: w.sign(w.sad(detail={"credentialID": w.other_key_pair_id})),
    ),
    ("SAD for another digest", "sad_digest_mismatch", lambda w: w.sign(w.sad([OTHER_DIGEST]))),
    (
        "more digests than authorized",
        "sad_digest_mismatch",
        lambda w: w.sign(w.sad([DIGEST]), [DIGEST, OTHER_DIGEST]),
    ),
    ("SAD with one factor only", "sad_authentication_insufficient", lambda w: w.sign(w.sad(amr=["pwd"]))),
    ("SAD replayed", "sad_replayed", _replayed),
    ("key pair seal payload changed", "key_pair_invalid", lambda w: _tampered_key_pair(w, 1)),
    ("key pair seal signature changed", "key_pair_invalid", lambda w: _tampered_key_pair(w, 2)),
    (
        "malformed JSON",
        "malformed_message",
        lambda w: _raw(w, "ssa", "key_pairs.create", b'{"key_template": '),
    ),
    (
        "duplicate JSON keys",
        "malformed_message",
        lambda w: _raw(w, "ssa", "key_pairs.create", b'{"key_template": {}, "key_template": {}}'),
    ),
    (
        "body breaks the schema",
        "schema_violation",
        lambda w: _raw(w, "ssa", "key_pairs.create", b'{"key_template": {"algorithm": "DSA"}}'),
    ),
    (
        "unsupported key size",
        "unsupported_algorithm",
        lambda w: _raw(w, "ssa", "key_pairs.create", b'{"key_template": {"algorithm": "RSA", "size": 1024}}'),
    ),
    ("DTBS/R of the wrong length", "invalid_dtbs", lambda w: w.sign(w.sad([DIGEST[:20]]), [DIGEST[:20]])),
    ("unknown operation", "unknown_operation", lambda w: _raw(w, "ssa", "key_pairs.explode", b"{}")),
    (
        "body over the size limit",
        "message_too_large",
        lambda w: _raw(w, "ssa", "key_pairs.create", b" " * 300_000),
    ),
    ("configuration version not above current", "configuration_version_conflict", _stale_config),
    (
        "admin operation from an SSA",
        "operation_not_permitted",
        lambda w: _raw(w, "ssa", "configurations.dynamic.get", b"{}"),
    ),
]


@pytest.fixture(scope="module")
async def world(harness: Harness) -> AsyncIterator[World]:
    # clients of this module's own, so the replies they count are this module's only
    async with (
        harness.client("ssa-1") as ssa,
        harness.client("admin-1") as admin,
        harness.client("ssa-2") as unregistered,
    ):
        key_pair = await harness.certified_key_pair(ssa, "alice")
        other = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
        yield World(harness, ssa, admin, unregistered, key_pair, key_id(other), harness.dead_letter_records())


@pytest.mark.parametrize(("name", "code", "send"), CASES, ids=[c[0] for c in CASES])
async def test_refusal(
    world: World, name: str, code: str, send: Callable[[World], Awaitable[RawReply]]
) -> None:
    reply = await send(world)
    document = reply.json()
    assert reply.status >= 400, document
    assert document["error"]["code"] == code, document
    request_id = document["error"]["request_id"]
    record = world.harness.audit_record(request_id)
    assert (record["outcome"], record["error_code"], record["status"]) == ("failure", code, reply.status)


async def test_each_refusal_answered_once_and_never_redelivered(world: World) -> None:
    await asyncio.sleep(0.5)  # time for a duplicate reply or a redelivery to surface
    for client in (world.ssa, world.admin, world.unregistered):
        duplicates = dict(client.unmatched_replies)
        assert not duplicates, duplicates
    # RabbitMQ refreshes queue statistics every few seconds: allow them to catch up
    queues = ("sam.admin", "sam.keys", "sam.signatures")
    for _ in range(60):
        depths = world.harness.queue_depths()
        if all(depths[queue] == (0, 0) for queue in queues):
            break
        await asyncio.sleep(0.25)
    assert {queue: depths[queue] for queue in queues} == dict.fromkeys(queues, (0, 0))
    assert world.harness.dead_letter_records() == world.dead_letters_before, "a refusal was dead-lettered"
    # and the workers still serve
    digest = hashlib.sha256(b"after the storm").digest()
    sad = world.harness.dev_as.issue_sad(world.harness.sam_id, "alice", key_id(world.key_pair), [digest])
    assert len(await world.ssa.sign(world.key_pair, "alice", EC_SHA256, [digest], sad)) == 1


async def test_no_user_id_gets_no_reply_only_its_record(world: World) -> None:
    """Without a user_id the SAM cannot tell whose reply queue reply_to names, so it sends
    no reply at all (a forged reply_to must not carry answers into another SSA's queue)."""
    message_id = str(uuid.uuid4())
    await world.ssa.send("key_pairs.create", b"{}", user_id=None, message_id=message_id, wait=False)
    record: dict[str, Any] = {}
    for _ in range(100):
        found = [r for r in world.harness.audit_records() if r["request_id"] == message_id]
        if found:
            record = found[0]
            break
        await asyncio.sleep(0.05)
    assert (record["error_code"], record["status"], record["actor"]) == ("missing_user_id", 401, None)
    await asyncio.sleep(0.3)
    assert not world.ssa.unmatched_replies
