"""The CSC gateway's pure parts, as tables: what each signHash body becomes or which
CSC error it gets (v1 and v2 names, bounds, disagreeing spellings); which CSC error
each SAM refusal becomes; what each service token gets; the idempotency key; and the
SQLite store's migrations and per-user lookups."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sam_devtools.authorization_server import DevAuthorizationServer
from worker.csc.protocol import CscError, SignHashRequest, error_for_sam_code, sign_hash_message_id
from worker.csc.store import (
    MIGRATIONS,
    Credential,
    CredentialState,
    CredentialStoreError,
    SqliteCredentialStore,
)
from worker.csc.tokens import ServiceTokenVerifier, ServiceUser
from worker.domain.keys import load_public_key

DIGEST = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
V2: dict[str, Any] = {
    "credentialID": "kp-1",
    "SAD": "a.b.c",
    "hashes": [DIGEST],
    "hashAlgorithmOID": "2.16.840.1.101.3.4.2.1",
    "signAlgo": "1.2.840.10045.4.3.2",
}
V1: dict[str, Any] = {
    "credentialID": "kp-1",
    "SAD": "a.b.c",
    "hash": [DIGEST],
    "hashAlgo": "2.16.840.1.101.3.4.2.1",
    "signAlgo": "1.2.840.10045.4.3.2",
}


def test_v1_and_v2_names_make_the_same_request() -> None:
    assert SignHashRequest.of(V1) == SignHashRequest.of(V2) == SignHashRequest.of({**V1, **V2})
    assert SignHashRequest.of(V2).hashes == (hashlib.sha256(b"x").digest(),)


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in V2.items() if k != name}


@pytest.mark.parametrize(
    ("body", "described"),
    [
        ([], "JSON object"),
        (_without("credentialID"), "credentialID"),
        (_without("SAD"), "SAD"),
        (_without("hashes"), "hashes"),
        (_without("signAlgo"), "signAlgo"),
        ({**V2, "credentialID": 7}, "credentialID"),  # wrong JSON type
        ({**V2, "credentialID": "k" * 257}, "credentialID"),  # too long
        ({**V2, "SAD": "s" * 20_000}, "SAD"),
        ({**V2, "hashes": []}, "hashes"),
        ({**V2, "hashes": [DIGEST] * 10_001}, "hashes"),
        ({**V2, "hashes": ["not base64 !"]}, "hashes"),
        ({**V2, "hashes": ["A" * 200]}, "hashes"),  # no hash is that long
        ({**V2, "hash": ["AAAA"]}, "disagree"),  # the two spellings of one parameter
        ({**V2, "hashAlgo": "1.2.3"}, "disagree"),
        ({**V2, "signAlgo": "1.2.840.113549.1.1.5"}, "signAlgo"),  # SHA-1: not offered
        ({**V2, "signAlgo": "1.2.840.113549.1.1.10"}, "signAlgoParams"),  # PSS without its parameters
        ({**V2, "operationMode": "A"}, "operationMode"),  # asynchronous: not offered
        ({**V2, "hashes": "AAAA"}, "hashes"),
        ({**V2, "hashAlgorithmOID": "2.16.840.1.101.3.4.2.2"}, "hashAlgorithmOID"),  # SHA-384 with ES256
        ({**V2, "hashes": [""]}, "hashes"),  # empty
        ({**V2, "hashes": ["===="]}, "hashes"),
        ({**V2, "hashes": ["!" + DIGEST]}, "hashes"),  # no character is silently dropped
        ({**V2, "hashes": [" " + DIGEST]}, "hashes"),
        ({**V2, "signAlgo": "1.2.840.113549.1.1.10", "signAlgoParams": "!!!"}, "signAlgoParams"),
        ({**V2, "SAD": "x"}, "SAD"),  # not a compact JWT: the SAM would call it a bad envelope
        ({**V2, "SAD": "a.b c.d"}, "SAD"),
        ({**V2, "SAD": "a.b.c\n"}, "SAD"),
        ({**V2, "SAD": "a.bé.c"}, "SAD"),
    ],
)
def test_a_bad_sign_hash_is_an_invalid_request_naming_its_parameter(body: Any, described: str) -> None:
    with pytest.raises(CscError) as refused:
        SignHashRequest.of(body)
    assert (refused.value.status, refused.value.error) == (400, "invalid_request")
    assert described in refused.value.description


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("sad_replayed", (400, "invalid_request", "SAD already used")),
        ("sad_expired", (400, "invalid_request", "SAD expired")),
        ("sad_digest_mismatch", (400, "invalid_request", "Invalid parameter SAD (sad_digest_mismatch)")),
        ("sad_signer_mismatch", (400, "invalid_request", "Invalid parameter SAD (sad_signer_mismatch)")),
        ("audit_unavailable", (503, "temporarily_unavailable", None)),
        ("hsm_unavailable", (503, "temporarily_unavailable", None)),
        ("ledger_unavailable", (503, "temporarily_unavailable", None)),
        ("too_many_digests", (400, "invalid_request", None)),
        ("key_pair_disabled", (400, "invalid_request", "The credential is disabled")),
        ("key_pair_deleted", (400, "invalid_request", "Invalid parameter credentialID")),
        ("request_signature_invalid", (500, "server_error", None)),  # the gateway's own fault
        ("key_pair_not_owned", (500, "server_error", None)),  # its store holds another SSA's key pair
        ("invalid_properties", (400, "invalid_request", None)),  # any other 4xx: what was sent
        ("schema_violation", (400, "invalid_request", None)),
        ("some_future_outage", (503, "temporarily_unavailable", None)),  # a code of a newer SAM, by status
    ],
)
def test_a_sam_refusal_becomes_its_csc_error_with_the_sam_request_id(
    code: str, expected: tuple[int, str, str | None]
) -> None:
    status = {"invalid_properties": 400, "schema_violation": 400, "some_future_outage": 503}.get(code, 400)
    error = error_for_sam_code(code, status, "request-1")
    assert (error.status, error.error) == expected[:2]
    if expected[2] is not None:
        assert error.description == expected[2]
    assert error.body()["request_id"] == "request-1"


def test_the_idempotency_key_follows_every_part_of_the_call() -> None:
    base = SignHashRequest.of(V2)
    key = sign_hash_message_id("as", "alice", base)
    assert key == sign_hash_message_id("as", "alice", SignHashRequest.of(dict(V1)))
    others = [
        sign_hash_message_id("as", "bob", base),
        sign_hash_message_id("other-as", "alice", base),
        sign_hash_message_id("as", "alice", SignHashRequest.of({**V2, "SAD": "a.b.d"})),
        sign_hash_message_id("as", "alice", SignHashRequest.of({**V2, "credentialID": "kp-2"})),
        sign_hash_message_id(
            "as", "alice", SignHashRequest.of({**V2, "hashes": [base64.b64encode(b"y" * 32).decode()]})
        ),
    ]
    assert key not in others and len(set(others)) == len(others)


# --- service tokens ------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())
_PEM = _KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
)
AS = DevAuthorizationServer("as-1", _PEM)
OTHER = DevAuthorizationServer(
    "as-1",  # the same name, another key
    ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ),
)
VERIFIER = ServiceTokenVerifier(
    {
        "as-1": load_public_key(
            _KEY.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
    },
    "gw",
)


def test_a_good_service_token_names_its_user() -> None:
    token = AS.issue_service_token("gw", "alice")
    assert VERIFIER.user(f"Bearer {token}", int(time.time())) == ServiceUser("as-1", "alice")
    assert VERIFIER.user(f"bearer {token}", int(time.time())).subject == "alice"


# the table's tokens are made when the module is collected, which may be minutes before
# its test runs: they are checked at the time they were made
MINTED = int(time.time())


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, 401),
        ("", 401),
        ("Basic YWxpY2U6cHc=", 401),
        ("Bearer ", 401),
        ("Bearer not.a.jwt", 401),
        ("Bearer " + "a" * 9000, 401),
        ("Bearer " + AS.issue_service_token("other-gw", "alice"), 401),
        ("Bearer " + AS.issue_service_token("gw", "alice", lifetime=-120), 401),
        ("Bearer " + AS.issue_service_token("gw", "alice", lifetime=100_000), 401),
        ("Bearer " + AS.issue_service_token("gw", "alice", iat=MINTED + 3600), 401),
        ("Bearer " + AS.issue_service_token("gw", ""), 401),
        ("Bearer " + OTHER.issue_service_token("gw", "alice"), 401),  # signed by another key
        ("Bearer " + AS.sign_claims({"iss": "as-9", "aud": "gw", "sub": "a"}), 401),  # unknown issuer
        ("Bearer " + AS.sign_claims({"iss": "as-1", "aud": "gw", "sub": "a", "exp": "x", "iat": 1}), 401),
        ("Bearer " + AS.issue_service_token("gw", "alice", nbf=MINTED + 10_000), 401),
        ("Bearer " + AS.issue_service_token("gw", "alice", nbf="now"), 401),
        ("Bearer " + AS.issue_service_token("gw", "alice", scope="credential"), 403),
        ("Bearer " + AS.issue_service_token("gw", "alice", scope=["service"]), 403),  # type: ignore[arg-type]
    ],
)
def test_a_bad_service_token_is_refused(header: str | None, expected: int) -> None:
    with pytest.raises(CscError) as refused:
        VERIFIER.user(header, MINTED)
    assert refused.value.status == expected
    assert refused.value.error == ("invalid_token" if expected == 401 else "insufficient_scope")


# --- the SQLite store ---------------------------------------------------------------


def _credential(credential_id: str, subject: str, issuer: str = "as-1") -> Credential:
    return Credential(
        credential_id,
        issuer,
        subject,
        subject,
        f'{{"id": "{credential_id}"}}',
        CredentialState.enabled,
        "ECDSA",
        named_curve="secp256r1",
        chain=(b"leaf", b"root"),
    )


def test_the_store_migrates_once_and_finds_a_credential_only_for_its_user(tmp_path: Path) -> None:
    store = SqliteCredentialStore(tmp_path / "store.sqlite3")
    assert store.migrate() == len(MIGRATIONS) == store.migrate()

    async def scenario() -> None:
        await store.put(_credential("kp-1", "alice"))
        await store.put(_credential("kp-2", "bob"))
        assert [c.credential_id for c in await store.of_user("as-1", "alice")] == ["kp-1"]
        assert (await store.get("as-1", "alice", "kp-1")) == _credential("kp-1", "alice")
        assert await store.get("as-1", "alice", "kp-2") is None  # bob's
        assert await store.get("as-2", "alice", "kp-1") is None  # another AS's alice
        with pytest.raises(CredentialStoreError):  # a credential does not change owner
            await store.put(_credential("kp-1", "mallory"))

    asyncio.run(scenario())


def test_a_store_newer_than_the_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    SqliteCredentialStore(path).migrate()
    with sqlite3.connect(path) as connection:
        connection.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
    with pytest.raises(CredentialStoreError):
        SqliteCredentialStore(path).migrate()
