"""TEST TOOLING: the bare signing worker of ``ops/bench`` — signing through the broker
with nothing of the SAM around it, the floor the SAM's own checks are measured against.

Per request it does what any remote signer must: check the caller's request JWS (with
the SAM's own ``verify_request_jws``), read the body, run the stateless HSM cycle
(unwrap, sign every DTBS/R, destroy) and answer on ``reply_to`` with confirms before the
ack. No SAD, no single-use ledger, no audit record, no result kept for repeats. Its keys
are its own, made and wrapped under the SAM's KEK at start; a request names one of them
(``bare_key``). The stateless cycle here is also the one the HSM baseline times.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.util.ec import encode_named_curve_parameters

from worker.client import ClientProfile
from worker.domain.authorization import RequestBinding, verify_request_jws
from worker.domain.configuration import Limits
from worker.domain.contract import HEADER_REQUEST_JWS, HEADER_STATUS
from worker.domain.keys import RegisteredKey, load_public_key
from worker.errors import SamError
from worker.hsm.pkcs11_hsm import UNWRAP_TEMPLATE
from worker.settings import load_infrastructure, read_secret
from worker.transport.amqp import connect

__all__ = [
    "BARE_KEYS",
    "BARE_QUEUE",
    "BenchKey",
    "answer_forever",
    "bare_server",
    "make_bench_key",
    "open_bench_session",
    "serve",
    "stateless_sign",
]

BARE_QUEUE = "bench.bare"
BARE_KEYS = ("p256", "rsa2048")
# what the operation a bare request's JWS binds is called: a signature request's
SIGN_OPERATION = "signatures.create"

_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


@dataclass(frozen=True)
class BenchKey:
    """A private key made for the bench, wrapped under the SAM's KEK."""

    key_type: KeyType
    mechanism: Mechanism
    wrapped: bytes

    def hsm_input(self, digest: bytes) -> bytes:
        """What the HSM signs for a SHA-256 DTBS/R: the digest for ECDSA, its DigestInfo
        for RSA PKCS#1 v1.5 (as the SAM signs RSA with SHA-256)."""
        return digest if self.key_type == KeyType.EC else _SHA256_DIGEST_INFO + digest


def open_bench_session() -> tuple[Any, Any]:
    """A read-write session on the SAM's token and its current KEK, from the files the
    bench names in ``SAM_INFRASTRUCTURE_FILE`` and ``SAM_TOKEN_PIN_FILE``."""
    infrastructure = load_infrastructure(Path(os.environ["SAM_INFRASTRUCTURE_FILE"]))
    session = (
        pkcs11.lib(os.environ.get("SAM_PKCS11_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
        .get_token(token_label=infrastructure.token_label)
        .open(user_pin=read_secret(Path(os.environ["SAM_TOKEN_PIN_FILE"])), rw=True)
    )
    kek = session.get_key(object_class=ObjectClass.SECRET_KEY, label=infrastructure.kek_label)
    return session, kek


def make_bench_key(session: Any, kek: Any, name: str) -> tuple[BenchKey, Any]:
    """A new P-256 (``p256``) or RSA-2048 (``rsa2048``) key pair as session objects: its
    private key wrapped under ``kek`` as the SAM wraps the keys it generates, and the
    private key's session object (the persistent-key baseline signs with it)."""
    template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
    private: Any
    if name == "p256":
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.2.840.10045.3.1.7")},
            local=True,
        )
        _, private = params.generate_keypair(store=False, private_template=template)
        key_type, mechanism = KeyType.EC, Mechanism.ECDSA
    else:
        _, private = session.generate_keypair(KeyType.RSA, 2048, store=False, private_template=template)
        key_type, mechanism = KeyType.RSA, Mechanism.RSA_PKCS
    wrapped = bytes(kek.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    return BenchKey(key_type, mechanism, wrapped), private


def stateless_sign(kek: Any, key: BenchKey, inputs: list[bytes]) -> list[bytes]:
    """The stateless cycle: unwrap ``key`` as a sensitive session object, sign every
    input, destroy it — C_UnwrapKey, C_SignInit + C_Sign per input, C_DestroyObject."""
    private = kek.unwrap_key(
        ObjectClass.PRIVATE_KEY,
        key.key_type,
        key.wrapped,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        store=False,
        capabilities=MechanismFlag.SIGN,
        template=UNWRAP_TEMPLATE,  # as the SAM unwraps
    )
    try:
        return [bytes(private.sign(data, mechanism=key.mechanism)) for data in inputs]
    finally:
        private.destroy()


def _signatures(kek: Any, keys: dict[str, BenchKey], body: bytes) -> bytes:
    request = orjson.loads(body)
    key = keys[request["bare_key"]]
    inputs = [key.hsm_input(base64.b64decode(item["dtbs"], validate=True)) for item in request["requests"]]
    signatures = stateless_sign(kek, key, inputs)
    return orjson.dumps({"signatures": [base64.b64encode(s).decode() for s in signatures]})


def serve(profile_file: Path, ssa_public_key: Path, prefetch: int = 16) -> None:
    """``bare_server`` as the bench's subprocess: the client profile and the SSA's PEM
    public key read from their files."""
    profile = ClientProfile.model_validate_json(profile_file.read_text())
    asyncio.run(bare_server(profile, load_public_key(ssa_public_key.read_text()), prefetch))


async def bare_server(profile: ClientProfile, ssa: RegisteredKey, prefetch: int) -> None:
    """Consume ``bench.bare`` (a quorum queue, ``prefetch`` unacknowledged) and answer each
    request after the request JWS check and the stateless cycle; prints ``ready`` once
    consuming. The HSM is called on the event loop's thread, as the SAM's ``inline`` lane
    does: with a software HSM in the process, the cheapest way."""
    max_age = Limits().request_max_age_seconds
    session, kek = open_bench_session()
    keys: dict[str, BenchKey] = {}
    for name in BARE_KEYS:
        keys[name], private = make_bench_key(session, kek, name)
        private.destroy()  # from here on only the wrapped key, as in the SAM

    def answer(message: aio_pika.abc.AbstractIncomingMessage) -> tuple[bytes, int]:
        token = (message.headers or {}).get(HEADER_REQUEST_JWS)
        if isinstance(token, bytes):  # long strings arrive as bytes
            token = token.decode("ascii", errors="replace")
        binding = RequestBinding(
            message.body, message.message_id or "", SIGN_OPERATION, message.user_id or ""
        )
        try:
            verify_request_jws(
                token if isinstance(token, str) else None, ssa, binding, int(time.time()), max_age
            )
            return _signatures(kek, keys, message.body), 200
        except (SamError, PKCS11Error, ValueError, KeyError, TypeError) as exc:
            # the bench counts any refusal as a failed run: the name says enough
            return orjson.dumps({"error": type(exc).__name__}), 400

    await answer_forever(profile, BARE_QUEUE, prefetch, answer)


async def answer_forever(
    profile: ClientProfile,
    queue_name: str,
    prefetch: int,
    answer: Callable[[aio_pika.abc.AbstractIncomingMessage], tuple[bytes, int]],
) -> None:
    """The baselines' servers (echo and bare): consume ``queue_name`` (a quorum queue,
    ``prefetch`` unacknowledged), publish ``answer(message)``'s body and status on its
    ``reply_to`` with confirms, then ack — as a worker does; prints ``ready`` once
    consuming. One path for both, so they differ only in ``answer``."""
    connection = await connect(profile.url, profile.tls_files())
    publish = await connection.channel(publisher_confirms=True)
    consume = await connection.channel()
    await consume.set_qos(prefetch_count=prefetch)
    queue = await consume.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        reply, status = answer(message)
        await publish.default_exchange.publish(
            aio_pika.Message(reply, correlation_id=message.correlation_id, headers={HEADER_STATUS: status}),
            routing_key=message.reply_to or "",
            mandatory=False,
        )
        await message.ack()

    await queue.consume(on_message)
    print("ready", flush=True)
    await asyncio.Future()
