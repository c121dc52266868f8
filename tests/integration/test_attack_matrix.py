"""The attack matrix: one row per attack, each refused with its code, audited, and
nothing signed. Broker-level attacks are refused by the broker itself."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from sam_devtools.pki import private_key_pem
from sam_devtools.raw_client import RawSamClient
from tests.integration.conftest import EC_SHA256, Harness, key_id, wire
from worker.client import RawReply, SamAccessRefused, SamTimeout
from worker.domain.contract import KeyPairObject

pytestmark = pytest.mark.integration

DIGEST = hashlib.sha256(b"attacked document").digest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Target:
    harness: Harness
    ssa: RawSamClient
    admin: RawSamClient
    key_pair: KeyPairObject  # certified, signer "victim"
    deleted: KeyPairObject
    unassigned_copy: KeyPairObject
    assigned_uncertified: KeyPairObject

    def claims(self, digests: list[bytes] | None = None, **changes: Any) -> dict[str, Any]:
        claims = self.harness.dev_as.sad_claims(
            self.harness.sam_id, "victim", key_id(self.key_pair), digests or [DIGEST]
        )
        claims.update(changes)
        return claims

    def body(
        self,
        digests: list[bytes] | None = None,
        algorithm: str = EC_SHA256,
        key_pair: KeyPairObject | None = None,
    ) -> bytes:
        return orjson.dumps(
            {
                "signature_algorithm": algorithm,
                "requests": [{"dtbs": base64.b64encode(d).decode()} for d in (digests or [DIGEST])],
                "key_pair": wire(key_pair or self.key_pair),
                "signer": {"id": "victim"},
            }
        )

    async def sign(self, sad: str, body: bytes | None = None) -> RawReply:
        reply = await self.ssa.send("signatures.create", body or self.body(), sad=sad)
        assert reply is not None
        return reply


def _unsigned_sad(t: Target) -> str:
    return f"{b64url(orjson.dumps({'alg': 'none', 'kid': 'dev-as'}))}.{b64url(orjson.dumps(t.claims()))}."


def _hmac_sad(t: Target) -> str:
    header = b64url(orjson.dumps({"alg": "HS256", "kid": "dev-as"}))
    payload = b64url(orjson.dumps(t.claims()))
    public = (t.harness.stack.pki.root / "dev-as" / "jws-pub.pem").read_bytes()
    mac = hmac.new(public, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(mac)}"


def _unknown_kid_sad(t: Target) -> str:
    return t.harness.dev_as.sign_claims(t.claims(), header={"kid": "evil-as"})


async def _sad_for_other_request_set(t: Target) -> RawReply:
    other = hashlib.sha256(b"what the signer agreed to").digest()
    return await t.sign(t.harness.dev_as.sign_claims(t.claims([other])))


async def _sad_reused(t: Target) -> RawReply:
    sad = t.harness.dev_as.sign_claims(t.claims())
    assert (await t.sign(sad)).status == 200
    second = hashlib.sha256(b"a second document").digest()
    return await t.sign(sad, t.body([second]))


async def _config_replay(t: Target) -> RawReply:
    """An administrator's earlier, validly signed configuration request sent again."""
    current = await t.admin.get_configuration()
    message_id = str(uuid.uuid4())
    body = orjson.dumps(wire(current))
    old_jws = t.admin.sign_request(body, message_id, "configurations.dynamic.put")
    reply = await t.admin.send("configurations.dynamic.put", body, request_jws=old_jws, message_id=message_id)
    assert reply is not None
    return reply


async def _config_rollback(t: Target) -> RawReply:
    current = await t.admin.get_configuration()
    reply = await t.admin.send(
        "configurations.dynamic.put", orjson.dumps({**wire(current), "version": max(1, current.version - 1)})
    )
    assert reply is not None
    return reply


async def _config_unknown_admin_key(t: Target) -> RawReply:
    current = await t.admin.get_configuration()
    body = orjson.dumps({**wire(current), "version": current.version + 1})
    message_id = str(uuid.uuid4())
    payload = orjson.dumps(
        {
            "body_sha256": b64url(hashlib.sha256(body).digest()),
            "message_id": message_id,
            "type": "configurations.dynamic.put",
            "user_id": "admin-1",
            "iat": int(time.time()),
        },
        option=orjson.OPT_SORT_KEYS,
    )
    rogue = ECKey.import_key(private_key_pem(ec.generate_private_key(ec.SECP256R1())).decode())
    forged = jws.serialize_compact({"alg": "ES256"}, payload, rogue)
    reply = await t.admin.send("configurations.dynamic.put", body, request_jws=forged, message_id=message_id)
    assert reply is not None
    return reply


async def _pop_as_oracle(t: Target) -> RawReply:
    body = orjson.dumps(
        {
            "key_pair": wire(t.assigned_uncertified),
            "request": {"dtbs": base64.b64encode(DIGEST).decode(), "signature_algorithm": EC_SHA256},
        }
    )
    reply = await t.ssa.send("proofs_of_possession.create", body)
    assert reply is not None
    return reply


async def _reassign_old_copy(t: Target) -> RawReply:
    body = orjson.dumps(
        {"key_pair": wire(t.unassigned_copy), "signer": {"id": "mallory"}, "subject": "CN=Mallory"}
    )
    reply = await t.ssa.send("signers.key_pairs.assign", body)
    assert reply is not None
    return reply


async def _deleted_key_pair(t: Target) -> RawReply:
    return await t.sign(
        t.harness.dev_as.sign_claims(
            {
                **t.claims(),
                "authorization_details": [
                    {**t.claims()["authorization_details"][0], "credentialID": key_id(t.deleted)}
                ],
            }
        ),
        t.body(key_pair=t.deleted),
    )


async def _foreign_sam_key_pair(t: Target) -> RawReply:
    payload = t.key_pair.sealed.split(".")[1]
    rogue = ECKey.import_key(private_key_pem(ec.generate_private_key(ec.SECP256R1())).decode())
    forged = jws.serialize_compact(
        {"alg": "ES256", "typ": "sam-key-pair+jws"},
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)),
        rogue,
    )
    return await t.sign(
        t.harness.dev_as.sign_claims(t.claims()),
        t.body(key_pair=t.key_pair.model_copy(update={"sealed": forged})),
    )


async def _sha1(t: Target) -> RawReply:
    sha1 = hashlib.sha1(b"weak").digest()  # noqa: S324 — the weak hash is the attack
    sad = t.harness.dev_as.sign_claims(
        t.claims(
            [sha1],
        )
    )
    return await t.sign(sad, t.body([sha1], algorithm="1.2.840.10045.4.1"))


async def _wrong_length(t: Target) -> RawReply:
    short = DIGEST[:16]
    return await t.sign(t.harness.dev_as.sign_claims(t.claims([short])), t.body([short]))


async def _raw(t: Target, body: bytes, operation: str = "key_pairs.create") -> RawReply:
    reply = await t.ssa.send(operation, body)
    assert reply is not None
    return reply


def _deep(depth: int) -> bytes:
    return b'{"key_template": ' + b"[" * depth + b"]" * depth + b"}"


def _many_digests(count: int) -> bytes:
    return (
        b'{"signature_algorithm": "1.2.840.10045.4.3.2", "requests": ['
        + b",".join([b'{"dtbs": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}'] * count)
        + b"]}"
    )


def _sad_with_sub_twice(t: Target) -> str:
    """A SAD whose payload names ``sub`` twice: a lenient parser takes the last one."""
    payload = orjson.dumps(t.claims()).replace(b'"sub":"victim"', b'"sub":"mallory","sub":"victim"')
    key = ECKey.import_key((t.harness.stack.pki.root / "dev-as" / "jws-key.pem").read_text())
    return jws.serialize_compact({"alg": "ES256", "kid": "dev-as"}, payload, key)


def _digest_with_foreign_characters(t: Target) -> str:
    spelled = b64url(DIGEST)
    claims = t.claims()
    claims["authorization_details"][0]["documentDigests"] = [{"hash": spelled[:7] + "!" + spelled[7:]}]
    return t.harness.dev_as.sign_claims(claims)


async def _with_headers(t: Target, headers: dict[str, Any]) -> RawReply:
    reply = await t.ssa.send("signatures.create", t.body(), headers=headers)
    assert reply is not None
    return reply


async def _on_queue(t: Target, routing_key: str) -> RawReply:
    """Key generation smuggled past the queue classes that keep it away from signing."""
    body = b'{"key_template": {"algorithm": "RSA", "size": 4096}}'
    reply = await t.ssa.send("key_pairs.create", body, routing_key=routing_key)
    assert reply is not None
    return reply


ROWS: list[tuple[str, str, Callable[[Target], Awaitable[RawReply]]]] = [
    (
        "admin operation from an SSA",
        "operation_not_permitted",
        lambda t: _raw(t, b"{}", "configurations.dynamic.get"),
    ),
    ("configuration replayed", "configuration_version_conflict", _config_replay),
    ("configuration rolled back", "configuration_version_conflict", _config_rollback),
    ("configuration under an unknown admin key", "request_signature_invalid", _config_unknown_admin_key),
    ("SAD with alg none", "sad_invalid", lambda t: t.sign(_unsigned_sad(t))),
    ("SAD as HMAC keyed with the AS public key", "sad_invalid", lambda t: t.sign(_hmac_sad(t))),
    ("SAD with an unknown kid", "sad_issuer_unknown", lambda t: t.sign(_unknown_kid_sad(t))),
    (
        "SAD with a far-future exp",
        "sad_expired",
        lambda t: t.sign(t.harness.dev_as.sign_claims(t.claims(exp=int(time.time()) + 10 * 365 * 86400))),
    ),
    ("SAD for another request set", "sad_digest_mismatch", _sad_for_other_request_set),
    ("SAD reused for another request set", "sad_digest_mismatch", _sad_reused),
    ("PoP as a signing oracle", "pop_not_a_certification_request", _pop_as_oracle),
    ("re-assignment through an old copy", "key_pair_already_assigned", _reassign_old_copy),
    ("a deleted key pair", "key_pair_deleted", _deleted_key_pair),
    ("a key pair from another SAM deployment", "key_pair_invalid", _foreign_sam_key_pair),
    ("SHA-1 signature algorithm", "unsupported_algorithm", _sha1),
    ("DTBS/R of the wrong length", "invalid_dtbs", _wrong_length),
    (
        "oversized JSON",
        "message_too_large",
        lambda t: _raw(t, b'{"key_template": {"algorithm": "' + b"R" * 400_000 + b'"}}'),
    ),
    ("deeply nested JSON", "malformed_message", lambda t: _raw(t, _deep(100_000)[:200_000])),
    ("nested JSON under the size limit", "malformed_message", lambda t: _raw(t, _deep(20_000))),
    (
        "a hundred thousand digests in one request",
        "message_too_large",
        lambda t: _raw(t, _many_digests(100_000), "signatures.create"),
    ),
    ("non-UTF-8 body", "malformed_message", lambda t: _raw(t, b'{"key_template": "\xff\xfe"}')),
    (
        "duplicate JSON keys",
        "malformed_message",
        lambda t: _raw(t, b'{"key_template": {"algorithm": "RSA", "size": 2048}, "key_template": {}}'),
    ),
    # strict parsing
    ("SAD naming sub twice", "sad_invalid", lambda t: t.sign(_sad_with_sub_twice(t))),
    (
        "SAD with exp as a string",
        "sad_invalid",
        lambda t: t.sign(t.harness.dev_as.sign_claims(t.claims(exp=str(int(time.time()) + 60)))),
    ),
    (
        "SAD digest with characters outside base64url",
        "sad_digest_mismatch",
        lambda t: t.sign(_digest_with_foreign_characters(t)),
    ),
    (
        "key size as a string",
        "schema_violation",
        lambda t: _raw(t, b'{"key_template": {"algorithm": "RSA", "size": "2048"}}'),
    ),
    # the envelope
    ("a SAD header that is a number", "invalid_properties", lambda t: _with_headers(t, {"sam-sad": 12})),
    ("a 250-byte operation name", "unknown_operation", lambda t: _raw(t, b"{}", "k" * 250)),
    ("key generation sent to the signature queue", "wrong_queue", lambda t: _on_queue(t, "signatures")),
    ("key generation sent to the admin queue", "wrong_queue", lambda t: _on_queue(t, "admin")),
]


@pytest.fixture(scope="module")
async def target(harness: Harness) -> Any:
    async with harness.client("ssa-1") as ssa, harness.client("admin-1") as admin:
        key_pair = await harness.certified_key_pair(ssa, "victim")
        unassigned = await ssa.create_key_pair("ECDSA", named_curve="secp256r1")
        assigned = await ssa.assign_key_pair(unassigned, "someone", "CN=Someone")
        deleted = await harness.certified_key_pair(ssa, "victim")
        await ssa.delete_key_pair(deleted, "victim")
        yield Target(harness, ssa, admin, key_pair, deleted, unassigned, assigned)


@pytest.mark.parametrize(("attack", "code", "attempt"), ROWS, ids=[row[0] for row in ROWS])
async def test_attack_is_refused_audited_and_signs_nothing(
    target: Target, attack: str, code: str, attempt: Callable[[Target], Awaitable[RawReply]]
) -> None:
    reply = await attempt(target)
    document = reply.json()
    assert reply.status >= 400 and "signatures" not in document and "signature" not in document, document
    assert document["error"]["code"] == code, (attack, document)
    record = target.harness.audit_record(document["error"]["request_id"])
    assert (record["outcome"], record["error_code"]) == ("failure", code)


async def test_another_ssas_user_id_is_refused_by_the_broker(harness: Harness) -> None:
    async with harness.client("ssa-1") as ssa:
        with pytest.raises(SamAccessRefused, match="PRECONDITION_FAILED - user_id property set to 'ssa-2'"):
            await ssa.send("key_pairs.create", b"{}", user_id="ssa-2", reply_timeout=5)


async def test_a_message_over_the_brokers_size_limit_never_reaches_a_worker(harness: Harness) -> None:
    """A million digests (48 MB) are over rabbitmq.conf's max_message_size (16 MiB): the
    broker refuses the publish and closes the channel; no worker holds such a message."""
    async with harness.client("ssa-1") as ssa:
        # refused (the channel closes) or unanswered: never a reply from a worker
        with pytest.raises((SamAccessRefused, ConnectionError, SamTimeout)):
            await ssa.send("signatures.create", _many_digests(1_000_000), reply_timeout=10)


async def test_another_ssas_reply_queue_cannot_be_read(harness: Harness) -> None:
    async with harness.client("ssa-2") as victim, harness.client("ssa-1") as attacker:
        assert victim._reply_queue is not None
        channel = await attacker._connection.channel()  # type: ignore[union-attr]
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            queue = await channel.get_queue(victim._reply_queue.name, ensure=False)
            await queue.consume(_ignore)
        own = await attacker._connection.channel()  # type: ignore[union-attr]
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await own.declare_queue(f"ssa-2.replies.{uuid.uuid4()}", exclusive=True)


def test_rows_cover_the_issue() -> None:
    assert len(ROWS) >= 20 and len({row[0] for row in ROWS}) == len(ROWS)
    json.dumps([row[:2] for row in ROWS])


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    raise AssertionError("an SSA read another SSA's reply")
