"""SAD and request-JWS checks as a table: (mutation → error code)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from sam_devtools.pki import private_key_pem, public_key_pem
from worker.domain.authorization import (
    RequestBinding,
    SadExpectation,
    b64url,
    request_jws_payload,
    verify_request_jws,
    verify_sad,
)
from worker.domain.configuration import SadPolicy, parse_dynamic
from worker.domain.contract import DynamicConfiguration
from worker.domain.keys import load_public_key
from worker.errors import SamError

NOW = int(time.time())
DIGEST = hashlib.sha256(b"doc").digest()
AS_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_AS_KEY = ec.generate_private_key(ec.SECP256R1())
SSA_KEY = ec.generate_private_key(ec.SECP256R1())
POLICY = SadPolicy(max_lifetime_seconds=300, clock_skew_seconds=30, min_authentication_factors=2)

STATE = parse_dynamic(
    DynamicConfiguration.model_validate(
        {
            "version": 1,
            "authorization_servers": [
                {"id": "as-1", "public_key": public_key_pem(AS_KEY)},
                {"id": "as-2", "public_key": public_key_pem(OTHER_AS_KEY)},
            ],
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
EXPECTED = SadExpectation("ssa-1", "alice", "kp-1", "2.16.840.1.101.3.4.2.1", (DIGEST,))


def claims(**changes: Any) -> dict[str, Any]:
    detail = {
        "type": "credential",
        "credentialID": "kp-1",
        "hashAlgorithmOID": "2.16.840.1.101.3.4.2.1",
        "documentDigests": [{"hash": base64.b64encode(DIGEST).decode()}],
        "numSignatures": 1,
    }
    detail.update(changes.pop("detail", {}))
    base = {
        "iss": "as-1",
        "aud": "sam-1",
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 120,
        "jti": "0123456789abcdef",
        "amr": ["pwd", "otp"],
        "authorization_details": [detail],
    }
    base.update(changes)
    return base


def sad(body: dict[str, Any] | None = None, key: Any = AS_KEY, header: dict[str, Any] | None = None) -> str:
    protected = {k: v for k, v in {"alg": "ES256", "kid": "as-1", **(header or {})}.items() if v is not None}
    return jws.serialize_compact(
        protected, orjson.dumps(body or claims()), ECKey.import_key(private_key_pem(key).decode())
    )


def hmac_forgery() -> str:
    """HS256 keyed with the AS public key: the classic algorithm-confusion attack."""
    header = b64url(orjson.dumps({"alg": "HS256", "kid": "as-1"}))
    payload = b64url(orjson.dumps(claims()))
    mac = hmac.new(public_key_pem(AS_KEY).encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(mac)}"


def unsigned() -> str:
    return f"{b64url(orjson.dumps({'alg': 'none', 'kid': 'as-1'}))}.{b64url(orjson.dumps(claims()))}."


CASES = [
    ("valid", lambda: sad(), None),
    ("missing", lambda: "", "sad_missing"),
    ("not a JWS", lambda: "garbage", "sad_invalid"),
    ("alg none", unsigned, "sad_invalid"),
    ("HMAC keyed with the public key", hmac_forgery, "sad_invalid"),
    ("unknown kid", lambda: sad(header={"kid": "as-9"}), "sad_issuer_unknown"),
    ("no kid", lambda: sad(header={"kid": None}), "sad_issuer_unknown"),
    (
        "AS not allowed for this SSA",
        lambda: sad(claims(iss="as-2"), OTHER_AS_KEY, {"kid": "as-2"}),
        "sad_issuer_not_allowed",
    ),
    ("signed by another key", lambda: sad(key=OTHER_AS_KEY), "sad_signature_invalid"),
    ("iss differs from kid", lambda: sad(claims(iss="as-2")), "sad_invalid"),
    ("claims missing", lambda: sad({"iss": "as-1"}), "sad_invalid"),
    ("other audience", lambda: sad(claims(aud="sam-2")), "sad_audience_mismatch"),
    ("audience list", lambda: sad(claims(aud=["sam-2", "sam-1"])), None),
    ("expired", lambda: sad(claims(iat=NOW - 600, exp=NOW - 300)), "sad_expired"),
    ("not yet valid", lambda: sad(claims(iat=NOW + 600, exp=NOW + 700)), "sad_expired"),
    ("lives too long", lambda: sad(claims(exp=NOW + 3600)), "sad_expired"),
    ("other signer", lambda: sad(claims(sub="bob")), "sad_signer_mismatch"),
    ("other key pair", lambda: sad(claims(detail={"credentialID": "kp-2"})), "sad_key_pair_mismatch"),
    (
        "other hash algorithm",
        lambda: sad(claims(detail={"hashAlgorithmOID": "2.16.840.1.101.3.4.2.3"})),
        "sad_digest_mismatch",
    ),
    (
        "other digest",
        lambda: sad(claims(detail={"documentDigests": [{"hash": base64.b64encode(b"x" * 32).decode()}]})),
        "sad_digest_mismatch",
    ),
    (
        "digest twice",
        lambda: sad(claims(detail={"documentDigests": [{"hash": base64.b64encode(DIGEST).decode()}] * 2})),
        "sad_digest_mismatch",
    ),
    ("numSignatures off", lambda: sad(claims(detail={"numSignatures": 2})), "sad_digest_mismatch"),
    ("base64url digest", lambda: sad(claims(detail={"documentDigests": [{"hash": b64url(DIGEST)}]})), None),
    ("wrong detail type", lambda: sad(claims(detail={"type": "key_assignment"})), "sad_invalid"),
    ("one factor", lambda: sad(claims(amr=["pwd"])), "sad_authentication_insufficient"),
    ("same factor twice", lambda: sad(claims(amr=["pwd", "pwd"])), "sad_authentication_insufficient"),
    # strict claims: JSON numbers for dates, no name twice, nbf honoured, digests canonical
    ("exp as a string", lambda: sad(claims(exp=str(NOW + 120))), "sad_invalid"),
    ("iat as a boolean", lambda: sad(claims(iat=True)), "sad_invalid"),
    ("exp with a fraction", lambda: sad(claims(exp=NOW + 120.5)), "sad_invalid"),
    ("exp as a whole float", lambda: sad(claims(exp=float(NOW + 120))), None),
    (
        "sub twice",
        lambda: _raw_sad(claims(), b'"sub":"alice",', b'"sub":"mallory","sub":"alice",'),
        "sad_invalid",
    ),
    ("nbf in the future", lambda: sad(claims(nbf=NOW + 600)), "sad_expired"),
    ("nbf passed", lambda: sad(claims(nbf=NOW - 10)), None),
    ("nbf as a string", lambda: sad(claims(nbf=str(NOW))), "sad_invalid"),
    (
        "digest with characters outside base64url",
        lambda: sad(
            claims(detail={"documentDigests": [{"hash": b64url(DIGEST)[:5] + "!" + b64url(DIGEST)[5:]}]})
        ),
        "sad_digest_mismatch",
    ),
    ("numSignatures as a string", lambda: sad(claims(detail={"numSignatures": "1"})), "sad_invalid"),
]


def _raw_sad(body: dict[str, Any], old: bytes, new: bytes) -> str:
    """A SAD whose payload text is edited after serializing (to hold a name twice)."""
    payload = orjson.dumps(body).replace(old, new)
    assert payload != orjson.dumps(body)
    protected = {"alg": "ES256", "kid": "as-1"}
    return jws.serialize_compact(protected, payload, ECKey.import_key(private_key_pem(AS_KEY).decode()))


@pytest.mark.parametrize(("name", "token", "code"), CASES, ids=[c[0] for c in CASES])
def test_sad(name: str, token: Any, code: str | None) -> None:
    if code is None:
        assert verify_sad(token(), STATE, "sam-1", POLICY, EXPECTED, NOW).sub == "alice"
        return
    with pytest.raises(SamError) as refused:
        verify_sad(token(), STATE, "sam-1", POLICY, EXPECTED, NOW)
    assert refused.value.code.name == code


def test_rsa_registered_key_refuses_es_algorithms() -> None:
    pem = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    key = load_public_key(pem.decode())
    assert isinstance(key.jwk, RSAKey)
    assert "ES256" not in key.algorithms and not any(a.startswith("HS") for a in key.algorithms)


BINDING = RequestBinding(b'{"a":1}', "m-1", "key_pairs.create", "ssa-1")
SSA_JWK = ECKey.import_key(private_key_pem(SSA_KEY).decode())
SSA_REGISTERED = load_public_key(public_key_pem(SSA_KEY))


def request_jws(binding: RequestBinding = BINDING, iat: int = NOW, key: Any = SSA_JWK) -> str:
    return jws.serialize_compact({"alg": "ES256"}, request_jws_payload(binding, iat), key)


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (request_jws(), None),
        (None, "request_signature_missing"),
        ("a.b.c", "request_signature_invalid"),
        (
            request_jws(RequestBinding(b'{"a":2}', "m-1", "key_pairs.create", "ssa-1")),
            "request_signature_invalid",
        ),
        (
            request_jws(RequestBinding(b'{"a":1}', "m-2", "key_pairs.create", "ssa-1")),
            "request_signature_invalid",
        ),
        (
            request_jws(RequestBinding(b'{"a":1}', "m-1", "signatures.create", "ssa-1")),
            "request_signature_invalid",
        ),
        (
            request_jws(RequestBinding(b'{"a":1}', "m-1", "key_pairs.create", "ssa-2")),
            "request_signature_invalid",
        ),
        (request_jws(iat=NOW - 3600), "request_signature_invalid"),
        (request_jws(key=ECKey.generate_key("P-256")), "request_signature_invalid"),
    ],
)
def test_request_jws(token: str | None, code: str | None) -> None:
    if code is None:
        verify_request_jws(token, SSA_REGISTERED, BINDING, NOW, 300)
        return
    with pytest.raises(SamError) as refused:
        verify_request_jws(token, SSA_REGISTERED, BINDING, NOW, 300)
    assert refused.value.code.name == code
