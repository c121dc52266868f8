"""Property-based hostile input against the service (software HSM, in-memory ledgers):
whatever the body, headers and AMQP properties, ``process`` answers with a documented
status and error code, writes exactly one audit event, and signs only what a valid SAD
authorizes. CI runs a few thousand cases; SAM_FUZZ_EXAMPLES=100000 runs the full set."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey

from sam_devtools.authorization_server import DevAuthorizationServer
from sam_devtools.pki import private_key_pem, public_key_pem
from worker.domain.algorithms import KeyType, key_spec_from_template
from worker.domain.authorization import RequestBinding, request_jws_payload
from worker.domain.configuration import StaticConfiguration, parse_dynamic
from worker.domain.contract import DynamicConfiguration, KeyPairStatus, Operation
from worker.domain.key_pair import KeyPairSealer, SealedKeyPair
from worker.domain.keys import load_public_key
from worker.domain.ledgers import ConfigurationLog, KeyEventLog, SadUseLog
from worker.errors import ErrorCode
from worker.fakes import MarkedResultsIn, MemoryAudit, MemoryLedger, MemoryResults, SoftwareHsm
from worker.ports import IncomingRequest
from worker.service import SamService

EXAMPLES = int(os.environ.get("SAM_FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
STATUS = {code.name: code.status for code in ErrorCode}
SSA_KEY, ADMIN_KEY, AS_KEY = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
EC_SHA256 = "1.2.840.10045.4.3.2"


class World:
    def __init__(self) -> None:
        self.hsm = SoftwareHsm()
        static = StaticConfiguration.model_validate(
            {
                "sam_id": "sam-1",
                "administrators": [{"id": "admin-1", "public_key": public_key_pem(ADMIN_KEY)}],
            }
        )
        self.configuration = ConfigurationLog(static)
        self.configuration.state = parse_dynamic(
            DynamicConfiguration.model_validate(
                {
                    "version": 1,
                    "authorization_servers": [{"id": "as-1", "public_key": public_key_pem(AS_KEY)}],
                    "signing_service_privileged_users": [
                        {
                            "id": "ssa-1",
                            "public_key": public_key_pem(SSA_KEY),
                            "allowed_authorization_servers": ["as-1"],
                        }
                    ],
                }
            )
        )
        self.key_events, self.sad_use = KeyEventLog(), SadUseLog(30)
        self.sealer = KeyPairSealer(
            "sam-1", "state", load_public_key(self.hsm.state_public_pem()), self.hsm.sign_with_state_key
        )
        self.audit = MemoryAudit()
        self.results = MemoryResults()
        sad_use_ledger = MemoryLedger(self.sad_use)
        self.service = SamService(
            static,
            self.configuration,
            self.key_events,
            self.sad_use,
            {
                "config": MemoryLedger(self.configuration),
                "key_events": MemoryLedger(self.key_events),
                "sad_use": sad_use_ledger,
            },
            self.hsm,
            self.sealer,
            self.audit,
            self.results,
            MarkedResultsIn(sad_use_ledger.records),
        )
        self.loop = asyncio.new_event_loop()
        generated = self.loop.run_until_complete(
            self.hsm.generate_key_pair(key_spec_from_template("ECDSA", None, "secp256r1"))
        )
        key_pair = SealedKeyPair(
            sam="sam-1",
            id="kp-1",
            algorithm=KeyType.EC,
            named_curve="secp256r1",
            public_key=base64.b64encode(generated.public_key_der).decode(),
            wrapped_private_key=base64.b64encode(generated.wrapped_private_key).decode(),
            kek="fake-kek",
            wrap_mechanism="AES_KEY_WRAP_PAD",
            status=KeyPairStatus(assigned=True, certified=True, enabled=True),
            signer="alice",
            subject="CN=alice",
            owner="ssa-1",
            authorization_server="as-1",
            revision=2,
            created=0,
        )
        seal = self.loop.run_until_complete(self.sealer.seal(key_pair))
        self.key_pair = key_pair.readable(seal).model_dump(exclude_none=True)
        self.authority = DevAuthorizationServer("as-1", private_key_pem(AS_KEY))

    def request(
        self,
        operation: str | None,
        body: bytes,
        *,
        user: str | None = "ssa-1",
        sign: bool = True,
        sad: str | None = None,
        jws_token: str | None = None,
        message_id: str | None = "m",
        reply_to: str | None = "own",
        correlation_id: str | None = "c",
    ) -> IncomingRequest:
        message_id = message_id if message_id != "m" else str(uuid.uuid4())
        reply_to = f"{user}.replies.test" if reply_to == "own" else reply_to
        if sign and jws_token is None and user and message_id:
            key = ADMIN_KEY if user == "admin-1" else SSA_KEY
            payload = request_jws_payload(
                RequestBinding(body, message_id, operation or "", user), int(time.time())
            )
            jws_token = jws.serialize_compact(
                {"alg": "ES256"}, payload, ECKey.import_key(private_key_pem(key).decode())
            )
        return IncomingRequest(operation, message_id, correlation_id, reply_to, user, body, jws_token, sad)

    def process(self, request: IncomingRequest) -> tuple[int, Any]:
        before = len(self.audit.events)
        reply = self.loop.run_until_complete(self.service.process(request))
        assert len(self.audit.events) == before + 1, "exactly one audit record per request"
        document: Any = orjson.loads(reply.body) if reply.body else None
        if reply.status >= 400:
            code = document["error"]["code"]
            assert STATUS[code] == reply.status, (code, reply.status)
            assert set(document) == {"error"}
            assert self.audit.events[-1].error_code == code
        return reply.status, document


WORLD = World()
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
operations = st.sampled_from([str(o) for o in Operation]) | st.text(max_size=30) | st.none()


@FUZZ
@given(
    operation=operations,
    body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    user=st.sampled_from(["ssa-1", "admin-1", "ssa-2", "", None]) | st.text(max_size=10),
    sign=st.booleans(),
    sad=st.none() | st.text(max_size=200),
    jws_token=st.none() | st.text(max_size=200),
    message_id=st.sampled_from(["m", None, ""]),
    reply_to=st.sampled_from(["own", "r", None, "ssa-2.replies.x", "sam.key-events", "sam.signatures"]),
)
def test_any_message_gets_one_documented_answer(
    operation: str | None,
    body: bytes,
    user: str | None,
    sign: bool,
    sad: str | None,
    jws_token: str | None,
    message_id: str | None,
    reply_to: str | None,
) -> None:
    status, _ = WORLD.process(
        WORLD.request(
            operation,
            body,
            user=user,
            sign=sign and jws_token is None,
            sad=sad,
            jws_token=jws_token,
            message_id=message_id,
            reply_to=reply_to,
        )
    )
    if operation == "signatures.create":
        assert status != 200, "no signature without a valid SAD"


def _valid_signature_body(digest: bytes) -> dict[str, Any]:
    return {
        "signature_algorithm": EC_SHA256,
        "requests": [{"dtbs": base64.b64encode(digest).decode()}],
        "key_pair": WORLD.key_pair,
        "signer": {"id": "alice"},
    }


def _mutate(document: Any, path: list[Any], value: Any, delete: bool) -> Any:
    if not path or not isinstance(document, (dict, list)) or not document:
        return value
    key = path[0] % len(document) if isinstance(document, list) else sorted(document)[path[0] % len(document)]
    copy = list(document) if isinstance(document, list) else dict(document)
    if delete and len(path) == 1:
        del copy[key]
    else:
        copy[key] = _mutate(copy[key], path[1:], value, delete)
    return copy


@FUZZ
@given(
    path=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=4),
    value=json_values,
    delete=st.booleans(),
    sad_changes=st.dictionaries(
        st.sampled_from(["aud", "sub", "iat", "exp", "jti", "amr", "iss", "authorization_details"]),
        json_values,
        max_size=2,
    ),
)
def test_mutated_valid_signature_requests(
    path: list[int], value: Any, delete: bool, sad_changes: dict[str, Any]
) -> None:
    digest = hashlib.sha256(os.urandom(8)).digest()
    body = _mutate(_valid_signature_body(digest), path, value, delete)
    claims = {**WORLD.authority.sad_claims("sam-1", "alice", "kp-1", [digest]), **sad_changes}
    status, document = WORLD.process(
        WORLD.request("signatures.create", json.dumps(body).encode(), sad=WORLD.authority.sign_claims(claims))
    )
    if status == 200:
        # only a request still asking for exactly what the SAD authorizes may be signed
        assert body["requests"] == _valid_signature_body(digest)["requests"]
        assert body["signer"] == {"id": "alice"}
        assert body["signature_algorithm"] == EC_SHA256
        assert len(document["signatures"]) == 1


def test_a_valid_request_is_signed() -> None:
    digest = hashlib.sha256(b"valid").digest()
    sad = WORLD.authority.issue_sad("sam-1", "alice", "kp-1", [digest])
    status, document = WORLD.process(
        WORLD.request("signatures.create", orjson.dumps(_valid_signature_body(digest)), sad=sad)
    )
    assert status == 200 and len(document["signatures"]) == 1
    again = WORLD.process(
        WORLD.request("signatures.create", orjson.dumps(_valid_signature_body(digest)), sad=sad)
    )
    assert again[0] == 403 and again[1]["error"]["code"] == "sad_replayed"


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deep_nesting(depth: int) -> None:
    body = b"[" * depth + b"]" * depth
    status, document = WORLD.process(WORLD.request("key_pairs.create", body))
    assert status == 400 and document["error"]["code"] in ("malformed_message", "message_too_large")
