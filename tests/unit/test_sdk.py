"""The SSA SDK without a broker: the JWS keys it accepts (and the SAM's verifier accepts
what it signs), the ones it refuses, client profiles, error codes, and the typed
operations — each request body is one the SAM's strict parser takes, each reply is
parsed into its model, and a reply that is not refuses with a clear ``SamReplyError``."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from joserfc import jws

from sam_devtools.raw_client import RawSamClient
from worker.client import (
    ClientProfile,
    RawReply,
    SamClient,
    SamClientError,
    SamConfigurationError,
    SamReplyError,
    SamRequestError,
)
from worker.domain.authorization import RequestBinding, verify_request_jws
from worker.domain.certification import build_certification_request_info
from worker.domain.contract import (
    REQUEST_MODELS,
    AuthorizationServer,
    DynamicConfiguration,
    ErrorBody,
    ErrorReply,
    KeyPairDeleteReply,
    KeyPairObject,
    KeyPairReply,
    KeyPairStatus,
    Operation,
    ProofOfPossessionReply,
    Signature,
    SignaturesReply,
    Signer,
    SigningServicePrivilegedUser,
)
from worker.domain.keys import load_public_key
from worker.domain.wire import parse_body
from worker.errors import ErrorCode
from worker.settings import TlsFiles

TLS = TlsFiles(ca_file=Path("ca.pem"), cert_file=Path("cert.pem"), key_file=Path("key.pem"))
PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL  # PKCS#1 for RSA, SEC1 for EC
PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
EC_SHA256 = "1.2.840.10045.4.3.2"

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_RSA = rsa.generate_private_key(65537, 2048)
_P256 = ec.generate_private_key(ec.SECP256R1())
_P384 = ec.generate_private_key(ec.SECP384R1())
_P521 = ec.generate_private_key(ec.SECP521R1())

ACCEPTED: list[tuple[str, Key, serialization.PrivateFormat, serialization.Encoding, str, str]] = [
    ("rsa-pkcs1", _RSA, TRADITIONAL, PEM, "BEGIN RSA PRIVATE KEY", "PS256"),
    ("rsa-pkcs8", _RSA, PKCS8, PEM, "BEGIN PRIVATE KEY", "PS256"),
    ("rsa-pkcs8-der", _RSA, PKCS8, DER, "", "PS256"),
    ("p256-sec1", _P256, TRADITIONAL, PEM, "BEGIN EC PRIVATE KEY", "ES256"),
    ("p256-pkcs8", _P256, PKCS8, PEM, "BEGIN PRIVATE KEY", "ES256"),
    ("p384-sec1", _P384, TRADITIONAL, PEM, "BEGIN EC PRIVATE KEY", "ES384"),
    ("p384-pkcs8", _P384, PKCS8, PEM, "BEGIN PRIVATE KEY", "ES384"),
    ("p521-pkcs8-der", _P521, PKCS8, DER, "", "ES512"),
]


def _private(
    key: Any, fmt: serialization.PrivateFormat = PKCS8, encoding: serialization.Encoding = PEM
) -> bytes:
    return bytes(key.private_bytes(encoding, fmt, serialization.NoEncryption()))


def _public_pem(key: Key) -> str:
    return key.public_key().public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _client(jws_key: bytes, kind: Callable[..., SamClient] = SamClient) -> SamClient:
    return kind("amqps://broker:5671/sam", TLS, "ssa-1", jws_key)


# --- JWS keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "fmt", "encoding", "label", "alg"),
    [row[1:] for row in ACCEPTED],
    ids=[row[0] for row in ACCEPTED],
)
def test_an_accepted_jws_key_signs_what_the_sam_verifies(
    key: Key, fmt: serialization.PrivateFormat, encoding: serialization.Encoding, label: str, alg: str
) -> None:
    data = _private(key, fmt, encoding)
    if label:  # the encoding under test, not another one
        assert data.decode().startswith(f"-----{label}-----")
    client = _client(data)
    body, message_id = b'{"key_template": {"algorithm": "ECDSA"}}', str(uuid.uuid4())
    token = client._sign_request(body, message_id, "key_pairs.create")
    assert jws.extract_compact(token.encode()).headers() == {"alg": alg, "kid": "ssa-1"}
    registered = load_public_key(_public_pem(key))
    binding = RequestBinding(body, message_id, "key_pairs.create", "ssa-1")
    verify_request_jws(token, registered, binding, int(time.time()), 60)  # raises if refused


def _refusal(data: bytes) -> str:
    with pytest.raises(SamConfigurationError) as refused:
        _client(data)
    message = str(refused.value)
    assert "RSA of 2048 bits or more (PKCS#1 or PKCS#8)" in message, message  # what is accepted
    assert "P-256, P-384 or P-521" in message, message
    # no traceback of cryptography's attached
    assert refused.value.__cause__ is None
    assert refused.value.__context__ is None or refused.value.__suppress_context__
    return message


def test_an_encrypted_key_is_refused_clearly() -> None:
    encrypted = _P256.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"secret"))
    assert "encrypted" in _refusal(encrypted)
    encrypted_der = _RSA.private_bytes(DER, PKCS8, serialization.BestAvailableEncryption(b"secret"))
    assert "encrypted" in _refusal(encrypted_der)


@pytest.mark.parametrize(
    ("key", "named"),
    [
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        (dsa.generate_private_key(2048), "DSA"),
        (ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
        (rsa.generate_private_key(65537, 1024), "1024 bits"),  # noqa: S505 — refused, the point
    ],
    ids=["ed25519", "dsa", "secp256k1", "rsa-1024"],
)
def test_a_key_the_sam_would_not_accept_is_refused_clearly(key: Any, named: str) -> None:
    assert named in _refusal(_private(key))


def test_what_is_no_private_key_is_refused_clearly() -> None:
    assert "cannot be read" in _refusal(_public_pem(_P256).encode())
    assert "cannot be read" in _refusal(b"not a key")


# --- profiles --------------------------------------------------------------------------


def _profile(folder: Path, **changes: Any) -> Path:
    key = folder / "jws-key.pem"
    key.write_bytes(_private(_P256, TRADITIONAL))
    document = {
        "url": "amqps://node-1:5671/sam,amqps://node-2:5671/sam",
        "user_id": "ssa-1",
        "ca_file": str(folder / "ca.pem"),
        "cert_file": str(folder / "ssa-1.pem"),
        "key_file": str(folder / "ssa-1.key"),
        "jws_key_file": str(key),
        **changes,
    }
    path = folder / "profile.json"
    path.write_text(json.dumps({k: v for k, v in document.items() if v is not None}))
    return path


def test_from_profile_gives_an_unconnected_client(tmp_path: Path) -> None:
    path = _profile(tmp_path)
    client = SamClient.from_profile(path, timeout=3, retries=0)
    assert type(client) is SamClient
    assert (client.user_id, client.urls, client.timeout, client.retries) == (
        "ssa-1",
        ("amqps://node-1:5671/sam", "amqps://node-2:5671/sam"),
        3,
        0,
    )
    assert client.tls == TlsFiles(
        ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "ssa-1.pem", key_file=tmp_path / "ssa-1.key"
    )
    assert client._connection is None  # nothing opened
    # a path as a string too, and the subclass of the test tooling gets its own kind
    assert type(RawSamClient.from_profile(str(path))) is RawSamClient
    # and the profile model says the same
    assert ClientProfile.read(path).client().user_id == "ssa-1"


@pytest.mark.parametrize(
    ("spoil", "said"),
    [
        (lambda path: path.unlink(), "cannot read the profile"),
        (lambda path: path.write_text("{not json"), "is not a client profile"),
        (lambda path: path.write_text('{"url": "amqps://x"}'), "is not a client profile"),
        (lambda path: path.write_text(path.read_text()[:-1] + ', "extra": 1}'), "is not a client profile"),
    ],
    ids=["missing", "not-json", "incomplete", "unknown-field"],
)
def test_from_profile_refuses_a_profile_it_cannot_use(
    tmp_path: Path, spoil: Callable[[Path], object], said: str
) -> None:
    path = _profile(tmp_path)
    spoil(path)
    with pytest.raises(SamConfigurationError, match=said) as refused:
        SamClient.from_profile(path)
    assert str(path) in str(refused.value)
    assert refused.value.__cause__ is None  # no pydantic or OS traceback attached


def test_a_profile_without_a_jws_key_cannot_send(tmp_path: Path) -> None:
    path = _profile(tmp_path, user_id="siem-1", jws_key_file=None)
    with pytest.raises(SamConfigurationError, match="siem-1 has no jws_key_file"):
        SamClient.from_profile(path)
    with pytest.raises(SamConfigurationError, match="has no jws_key_file"):
        ClientProfile.read(path).client()
    # a ValueError as well, as ClientProfile.client raised before
    with pytest.raises(ValueError, match="has no jws_key_file"):
        ClientProfile.read(path).client()


def test_a_profile_naming_a_missing_jws_key_is_refused(tmp_path: Path) -> None:
    path = _profile(tmp_path, jws_key_file=str(tmp_path / "nowhere.pem"))
    with pytest.raises(SamConfigurationError, match="cannot read the JWS key"):
        SamClient.from_profile(path)


def test_the_cli_still_exports_the_profile() -> None:
    from worker.cli import sam

    assert sam.ClientProfile is ClientProfile


# --- error codes -----------------------------------------------------------------------


def test_a_known_code_is_an_error_code_equal_to_its_name() -> None:
    refused = SamRequestError(401, "unknown_user", "who?", "m-1")
    code: ErrorCode | str = refused.code
    assert code == "unknown_user" and "unknown_user" == code  # noqa: SIM300 — both ways round
    assert code == ErrorCode.unknown_user
    assert code != "sad_invalid" and code != ErrorCode.sad_invalid
    assert code in {"unknown_user"} and code in ("unknown_user", "sad_invalid")
    by_code: dict[object, int] = {ErrorCode.unknown_user: 1}
    assert by_code["unknown_user"] == 1  # hashes as its name
    assert str(code) == f"{code}" == "unknown_user"
    assert str(refused) == "401 unknown_user: who?"
    assert isinstance(refused.code, ErrorCode) and refused.code is ErrorCode.unknown_user
    # an ErrorCode given is kept
    assert SamRequestError(403, ErrorCode.sad_invalid, "", None).code is ErrorCode.sad_invalid


def test_an_unknown_code_stays_a_string() -> None:
    refused = SamRequestError(418, "from_a_newer_sam", "new", None)
    assert type(refused.code) is str and refused.code == "from_a_newer_sam"
    assert str(refused) == "418 from_a_newer_sam: new"


def test_error_codes_still_compare_as_members() -> None:
    # what the worker relies on: identity, the name, (status, meaning), unequal to their value
    assert ErrorCode["sad_invalid"] is ErrorCode.sad_invalid
    assert ErrorCode.sad_invalid.value == (403, ErrorCode.sad_invalid.meaning)
    assert ErrorCode.sad_invalid != ErrorCode.sad_invalid.value
    assert ErrorCode.sad_invalid != 403
    assert len({code for code in ErrorCode}) == len(ErrorCode)
    assert repr(ErrorCode.sad_invalid).startswith("<ErrorCode.sad_invalid:")


# --- typed operations, over a fake exchange ---------------------------------------------

SPKI = _P256.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)
KEY_PAIR = KeyPairObject(  # every field, as the SAM returns a certified key pair
    sealed="eyJhbGciOiJFUzI1NiJ9.e30.c2ln",
    id="kp-1",
    algorithm="ECDSA",
    named_curve="secp256r1",
    public_key=base64.b64encode(SPKI).decode(),
    status=KeyPairStatus(assigned=True, certified=False, enabled=True),
    signer=Signer(id="alice"),
    subject="CN=alice,O=Example",
    revision=3,
    owner="ssa-1",
    authorization_server="dev-as",
    kek="kek-1",
    sam_factor="pin",
)
CONFIGURATION = DynamicConfiguration(
    version=7,
    authorization_servers=[AuthorizationServer(id="dev-as", public_key=_public_pem(_P256))],
    signing_service_privileged_users=[
        SigningServicePrivilegedUser(
            id="ssa-1", public_key=_public_pem(_P384), allowed_authorization_servers=["dev-as"]
        )
    ],
)


class FakeSam:
    """Stands in for ``_exchange``: keeps what was published, answers what it is told."""

    def __init__(self, client: SamClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[aio_pika.Message] = []
        self.replies: list[RawReply] = []
        monkeypatch.setattr(client, "_channel", object())  # "connected"
        monkeypatch.setattr(client, "_exchange", self._exchange)

    def answer(self, status: int, body: bytes | str) -> None:
        self.replies.append(RawReply(status, body.encode() if isinstance(body, str) else body, "c"))

    async def _exchange(
        self, message: aio_pika.Message, routing_key: str, seconds: float, wait: bool, retries: int
    ) -> RawReply:
        self.sent.append(message)
        return self.replies.pop(0)

    def request(self) -> tuple[Operation, Any]:
        """The last request as the SAM parses it (strictly: ``extra="forbid"``)."""
        message = self.sent[-1]
        assert message.type is not None
        operation = Operation(message.type)
        return operation, parse_body(REQUEST_MODELS[operation], message.body)


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch) -> tuple[SamClient, FakeSam]:
    client = _client(_private(_P256))
    return client, FakeSam(client, monkeypatch)


def _key_pair_reply(key_pair: KeyPairObject = KEY_PAIR) -> str:
    return KeyPairReply(key_pair=key_pair).model_dump_json(exclude_none=True)  # as the SAM sends it


async def test_key_pairs_go_in_and_come_out_as_models(sdk: tuple[SamClient, FakeSam]) -> None:
    client, sam = sdk
    created = KEY_PAIR.model_copy(
        update={"status": KeyPairStatus(assigned=False, certified=False, enabled=False)}
    )
    sam.answer(201, _key_pair_reply(created))
    got = await client.create_key_pair("ECDSA", named_curve="secp256r1")
    assert got == created and isinstance(got, KeyPairObject)
    operation, request = sam.request()
    assert operation is Operation.key_pairs_create
    assert (request.key_template.algorithm, request.key_template.named_curve) == ("ECDSA", "secp256r1")

    calls: list[tuple[Operation, Callable[[], Awaitable[KeyPairObject]]]] = [
        (
            Operation.signers_key_pairs_assign,
            lambda: client.assign_key_pair(
                got, "alice", "CN=alice,O=Example", skad="skad", pin="1234", authorization_server="dev-as"
            ),
        ),
        (
            Operation.key_pairs_update,
            lambda: client.update_key_pair(got, "alice", certificate=b"cert", chain=[b"ca"], enabled=False),
        ),
        (Operation.key_pairs_rewrap, lambda: client.rewrap_key_pair(got)),
        (Operation.key_pairs_bind, lambda: client.bind_key_pair(got, "ssa-2", "dev-as")),
    ]
    for expected, call in calls:
        sam.answer(200, _key_pair_reply())
        assert await call() == KEY_PAIR
        operation, request = sam.request()
        assert operation is expected
        # the copy sent is the copy returned: every field, none of them null
        assert request.key_pair == got
        assert b"null" not in sam.sent[-1].body
    assert sam.sent[1].headers is not None and sam.sent[1].headers["sam-sad"] == "skad"


async def test_every_field_of_a_returned_key_pair_round_trips_strictly(
    sdk: tuple[SamClient, FakeSam],
) -> None:
    client, sam = sdk
    sam.answer(200, _key_pair_reply())
    rewrapped = await client.rewrap_key_pair(KEY_PAIR)
    sam.answer(200, KeyPairDeleteReply(key_pair_id="kp-1", deleted=True).model_dump_json())
    deleted = await client.delete_key_pair(rewrapped, "alice", "deletion-sad")
    assert deleted == KeyPairDeleteReply(key_pair_id="kp-1", deleted=True)
    operation, request = sam.request()
    assert operation is Operation.key_pairs_delete
    assert request.key_pair == KEY_PAIR and request.signer == Signer(id="alice")
    sam.answer(200, KeyPairDeleteReply(key_pair_id="kp-1", deleted=True).model_dump_json())
    await client.delete_key_pair(KeyPairObject(sealed=KEY_PAIR.sealed), None)
    assert sam.request()[1].signer is None and b"signer" not in sam.sent[-1].body


async def test_signatures_and_proofs_come_back_as_bytes(sdk: tuple[SamClient, FakeSam]) -> None:
    client, sam = sdk
    digests = [bytes(32), bytes([1]) * 32]
    signatures = SignaturesReply(
        signatures=[
            Signature(signature=base64.b64encode(b"sig-%d" % n).decode(), signature_algorithm=EC_SHA256)
            for n in range(2)
        ]
    )
    sam.answer(200, signatures.model_dump_json())
    assert await client.sign(KEY_PAIR, "alice", EC_SHA256, digests, "sad", pin="1234") == [b"sig-0", b"sig-1"]
    operation, request = sam.request()
    assert operation is Operation.signatures_create
    assert [base64.b64decode(r.dtbs) for r in request.requests] == digests
    assert request.sam_factor is not None and request.sam_factor.value == "1234"

    sam.answer(
        200,
        ProofOfPossessionReply(
            signature=base64.b64encode(b"pop").decode(), signature_algorithm=EC_SHA256
        ).model_dump_json(),
    )
    der = await client.certification_request(KEY_PAIR, EC_SHA256)
    operation, request = sam.request()
    assert operation is Operation.proofs_of_possession_create
    info = build_certification_request_info(SPKI, "CN=alice,O=Example")
    assert base64.b64decode(request.request.dtbs) == info and info in der and der.endswith(b"pop")


async def test_the_configuration_goes_in_and_comes_out_as_a_model(sdk: tuple[SamClient, FakeSam]) -> None:
    client, sam = sdk
    sam.answer(204, b"")
    await client.put_configuration(CONFIGURATION)
    operation, request = sam.request()
    assert operation is Operation.configurations_dynamic_put and request == CONFIGURATION
    sam.answer(200, CONFIGURATION.model_dump_json(exclude_none=True))
    assert await client.get_configuration() == CONFIGURATION
    assert sam.request()[0] is Operation.configurations_dynamic_get and sam.sent[-1].body == b"{}"


async def test_call_is_the_untyped_escape_hatch(sdk: tuple[SamClient, FakeSam]) -> None:
    client, sam = sdk
    sam.answer(200, _key_pair_reply())
    document = await client.call("key_pairs.rewrap", {"key_pair": {"sealed": "x"}})
    assert document == json.loads(_key_pair_reply())
    sam.answer(204, b"")
    assert await client.call(Operation.configurations_dynamic_put, CONFIGURATION) is None
    assert sam.request()[1] == CONFIGURATION  # a model is sent as the methods send it


@pytest.mark.parametrize(
    "body",
    [b'{"key_pair": {"sealed": 5}}', b'{"key_pair": {"sealed": "x", "surprise": 1}}', b"not json", b""],
    ids=["wrong-type", "extra-field", "not-json", "empty"],
)
async def test_a_reply_that_is_not_its_model_is_a_clear_error(
    sdk: tuple[SamClient, FakeSam], body: bytes
) -> None:
    client, sam = sdk
    sam.answer(200, body)
    with pytest.raises(SamReplyError) as bad:
        await client.rewrap_key_pair(KEY_PAIR)
    assert isinstance(bad.value, SamClientError)
    assert str(bad.value).startswith("the reply to key_pairs.rewrap is not a valid KeyPairReply: "), bad.value
    assert bad.value.__cause__ is None and bad.value.__suppress_context__ and bad.value.problems


async def test_a_reply_with_a_signature_per_digest_only(sdk: tuple[SamClient, FakeSam]) -> None:
    client, sam = sdk
    sam.answer(200, SignaturesReply(signatures=[]).model_dump_json())
    with pytest.raises(SamReplyError, match="0 for 1 DTBS/R"):
        await client.sign(KEY_PAIR, "alice", EC_SHA256, [bytes(32)], "sad")
    sam.answer(200, b'{"signatures": [{"signature": "%%%", "signature_algorithm": "1.2.840.10045.4.3.2"}]}')
    with pytest.raises(SamReplyError, match="signature: not base64"):
        await client.sign(KEY_PAIR, "alice", EC_SHA256, [bytes(32)], "sad")


async def test_a_refusal_raises_its_code(sdk: tuple[SamClient, FakeSam]) -> None:
    client, sam = sdk
    refusal = ErrorReply(error=ErrorBody(code="key_pair_outdated", message="older", request_id="m-1"))
    sam.answer(409, refusal.model_dump_json())
    with pytest.raises(SamRequestError) as refused:
        await client.sign(KEY_PAIR, "alice", EC_SHA256, [bytes(32)], "sad")
    assert (refused.value.status, refused.value.code, refused.value.request_id) == (
        409,
        "key_pair_outdated",
        "m-1",
    )
    assert refused.value.code is ErrorCode.key_pair_outdated
    sam.answer(502, b"<html>bad gateway</html>")
    with pytest.raises(SamRequestError) as unreadable:
        await client.get_configuration()
    assert (unreadable.value.status, unreadable.value.code) == (502, "unknown")


async def test_a_key_pair_without_public_key_makes_no_certification_request(
    sdk: tuple[SamClient, FakeSam],
) -> None:
    client, sam = sdk
    with pytest.raises(SamClientError, match="no public_key or subject"):
        await client.certification_request(KeyPairObject(sealed="x"), EC_SHA256)
    assert not sam.sent


async def test_an_unconnected_client_says_so() -> None:
    with pytest.raises(SamClientError, match="not connected"):
        await _client(_private(_P256)).get_configuration()


def test_the_public_client_has_no_test_knobs() -> None:
    public = {name for name in dir(SamClient) if not name.startswith("_")}
    assert public == {
        "assign_key_pair",
        "bind_key_pair",
        "call",
        "certification_request",
        "close",
        "connect",
        "create_key_pair",
        "delete_key_pair",
        "from_profile",
        "get_configuration",
        "prove_possession",
        "put_configuration",
        "rewrap_key_pair",
        "sign",
        "update_key_pair",
    }
    assert {"send", "sign_request"} <= set(dir(RawSamClient))
