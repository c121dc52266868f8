"""The key pair lifecycle as tables of (key pair state, request) → outcome, over the pure
decisions in ``worker.domain.lifecycle``: no HSM, no broker, milliseconds."""

from __future__ import annotations

import base64
import datetime
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from worker.domain import lifecycle
from worker.domain.algorithms import KeyType
from worker.domain.authorization import SAD_TYPE_DELETION, SAD_TYPE_SIGNATURE, SKAD_TYPE_ASSIGNMENT
from worker.domain.certification import build_certification_request_info
from worker.domain.configuration import SadPolicy
from worker.domain.contract import (
    AssignRequest,
    KeyPairBindRequest,
    KeyPairDeleteRequest,
    KeyPairStatus,
    KeyPairUpdateRequest,
    ProofOfPossessionRequest,
    SamFactor,
    SignaturesCreateRequest,
)
from worker.domain.key_pair import SealedKeyPair
from worker.errors import ErrorCode, SamError

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
SPKI = KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
EC_SHA256, EC_SHA384, RSA_SHA256 = "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.113549.1.1.11"
SUBJECT = "CN=alice,O=Example"
SEALED = {"sealed": "x"}  # the seal is opened by the service; the decisions get its payload


def key_pair(state: str, **changes: Any) -> SealedKeyPair:
    """A P-256 key pair in one of the lifecycle's states."""
    assigned = state != "created"
    certified = state in ("certified", "enabled")
    fields: dict[str, Any] = {
        "sam": "sam-1",
        "id": "kp-1",
        "algorithm": KeyType.EC,
        "named_curve": "secp256r1",
        "public_key": base64.b64encode(SPKI).decode(),
        "wrapped_private_key": base64.b64encode(b"wrapped").decode(),
        "kek": "kek-1",
        "wrap_mechanism": "AES_KEY_WRAP_PAD",
        "status": KeyPairStatus(assigned=assigned, certified=certified, enabled=state == "enabled"),
        "signer": "alice" if assigned else None,
        "subject": SUBJECT if assigned else None,
        "owner": "ssa-1",
        "authorization_server": "as-1" if assigned else None,
        "certificate": base64.b64encode(certificate()).decode() if certified else None,
        "revision": 3,
        "created": 0,
    }
    return SealedKeyPair(**{**fields, **changes})


NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
SIGNING_USAGE = x509.KeyUsage(True, True, False, False, False, False, False, False, False)


def _name(text: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(text)


def _ca(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, Any] | None = None, **validity: Any
) -> Any:
    """A CA certificate for ``key`` (self-signed, or by ``issuer`` = (name, key))."""
    issuer_name, issuer_key = issuer or (name, key)
    built = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity.get("not_before", NOW - DAY))
        .not_valid_after(validity.get("not_after", NOW + 30 * DAY))
        .add_extension(x509.BasicConstraints(ca=validity.get("ca", True), path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return built


ANCHOR = _ca("CN=dev CA", OTHER_KEY)
ANCHORS = (ANCHOR,)
INTERMEDIATE_KEY = ec.generate_private_key(ec.SECP256R1())
INTERMEDIATE = _ca("CN=issuing CA", INTERMEDIATE_KEY, ("CN=dev CA", OTHER_KEY))


def certificate(
    public_key: ec.EllipticCurvePublicKey | None = None,
    subject: str = "alice",
    *,
    issuer: tuple[str, Any] = ("CN=dev CA", OTHER_KEY),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    usage: x509.KeyUsage | None = SIGNING_USAGE,
) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"CN={subject},O=Example"))
        .issuer_name(_name(issuer[0]))
        .public_key(public_key or KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + DAY)
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return builder.sign(issuer[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def refusal(decide: Any, *args: Any) -> str:
    try:
        decide(*args)
    except SamError as exc:
        return exc.code.name
    return "ok"


# --- assignment -------------------------------------------------------------------------


def assign_request(**changes: Any) -> AssignRequest:
    return AssignRequest.model_validate(
        {"key_pair": SEALED, "signer": {"id": "alice"}, "subject": SUBJECT, **changes}
    )


OPTIONAL, REQUIRED = SadPolicy(assignment_skad="optional"), SadPolicy(assignment_skad="required")
ONE_AS = frozenset({"as-1"})


@pytest.mark.parametrize(
    ("state", "request_changes", "policy", "skad_given", "expected"),
    [
        ("created", {}, OPTIONAL, False, "ok"),
        ("created", {}, OPTIONAL, True, "ok"),
        ("created", {}, REQUIRED, False, "ok"),
        ("assigned", {}, OPTIONAL, False, "key_pair_already_assigned"),
        ("enabled", {}, OPTIONAL, True, "key_pair_already_assigned"),
        ("created", {"subject": "not a name"}, OPTIONAL, False, "invalid_subject"),
    ],
)
def test_assignment(
    state: str, request_changes: dict[str, Any], policy: SadPolicy, skad_given: bool, expected: str
) -> None:
    assert (
        refusal(
            lifecycle.plan_assignment,
            key_pair(state),
            assign_request(**request_changes),
            "ssa-1",
            ONE_AS,
            policy,
            skad_given,
        )
        == expected
    )


@pytest.mark.parametrize(
    ("policy", "skad_given", "skad_expected"),
    [(OPTIONAL, False, False), (OPTIONAL, True, True), (REQUIRED, False, True), (REQUIRED, True, True)],
)
def test_assignment_asks_for_the_signers_skad_when_given_or_required(
    policy: SadPolicy, skad_given: bool, skad_expected: bool
) -> None:
    plan = lifecycle.plan_assignment(
        key_pair("created"), assign_request(), "ssa-1", ONE_AS, policy, skad_given
    )
    assert (plan.skad is not None) is skad_expected
    if plan.skad is not None:
        assert (plan.skad.ssa, plan.skad.signer, plan.skad.key_pair_id) == ("ssa-1", "alice", "kp-1")
        assert plan.skad.detail_type == SKAD_TYPE_ASSIGNMENT and plan.skad.digests == ()


def test_an_assigned_key_pair_is_the_next_revision_bound_to_its_signer() -> None:
    plan = lifecycle.plan_assignment(
        key_pair("created"),
        assign_request(subject="2.5.4.3=alice,O=Example"),
        "ssa-1",
        ONE_AS,
        OPTIONAL,
        False,
    )
    result = plan.result(None)
    assert (result.signer, result.subject, result.revision) == ("alice", "CN=alice,O=Example", 4)
    assert result.status == KeyPairStatus(assigned=True, certified=False, enabled=False)
    assert result.factor_verifier is None


def test_an_enrolled_factor_keeps_only_its_verifier() -> None:
    request = assign_request(sam_factor={"type": "pin", "value": "123456"})
    plan = lifecycle.plan_assignment(key_pair("created"), request, "ssa-1", ONE_AS, OPTIONAL, False)
    with pytest.raises(SamError):
        plan.result(None)  # a factor without its HSM verifier is a fault, never silently dropped
    result = plan.result(b"mac")
    assert (result.factor_type, result.factor_verifier) == ("pin", base64.b64encode(b"mac").decode())
    assert "123456" not in result.model_dump_json()


# --- proof of possession ----------------------------------------------------------------


def pop_request(info: bytes | str, algorithm: str = EC_SHA256) -> ProofOfPossessionRequest:
    dtbs = info if isinstance(info, str) else base64.b64encode(info).decode()
    return ProofOfPossessionRequest.model_validate(
        {"key_pair": SEALED, "request": {"dtbs": dtbs, "signature_algorithm": algorithm}}
    )


OTHER_SPKI = OTHER_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)


@pytest.mark.parametrize(
    ("state", "request_", "expected"),
    [
        ("assigned", pop_request(build_certification_request_info(SPKI, SUBJECT)), "ok"),
        ("created", pop_request(build_certification_request_info(SPKI, SUBJECT)), "key_pair_not_assigned"),
        ("certified", pop_request(build_certification_request_info(SPKI, SUBJECT)), "key_pair_certified"),
        ("enabled", pop_request(build_certification_request_info(SPKI, SUBJECT)), "key_pair_certified"),
        (
            "assigned",
            pop_request(build_certification_request_info(OTHER_SPKI, SUBJECT)),
            "pop_public_key_mismatch",
        ),
        (
            "assigned",
            pop_request(build_certification_request_info(SPKI, "CN=mallory")),
            "pop_subject_mismatch",
        ),
        ("assigned", pop_request(hashlib.sha256(b"any data").digest()), "pop_not_a_certification_request"),
        ("assigned", pop_request("not base64!"), "pop_not_a_certification_request"),
        (
            "assigned",
            pop_request(build_certification_request_info(SPKI, SUBJECT), RSA_SHA256),
            "algorithm_key_mismatch",
        ),
        (
            "assigned",
            pop_request(build_certification_request_info(SPKI, SUBJECT), "1.2.3.4"),
            "unsupported_algorithm",
        ),
    ],
)
def test_proof_of_possession(state: str, request_: ProofOfPossessionRequest, expected: str) -> None:
    assert refusal(lifecycle.plan_proof_of_possession, key_pair(state), request_, "ssa-1") == expected


def test_a_proof_of_possession_signs_the_hash_of_the_certification_request_info() -> None:
    info = build_certification_request_info(SPKI, SUBJECT)
    proof = lifecycle.plan_proof_of_possession(key_pair("assigned"), pop_request(info, EC_SHA384), "ssa-1")
    assert proof.digest == hashlib.sha384(info).digest()
    assert proof.info_sha256 == hashlib.sha256(info).hexdigest()


# --- update -----------------------------------------------------------------------------


def update_request(
    status: tuple[bool, bool, bool],
    certificate_der: bytes | None = None,
    signer: str = "alice",
    chain: tuple[Any, ...] = (),
) -> KeyPairUpdateRequest:
    assigned, certified, enabled = status
    body: dict[str, Any] = {
        "key_pair": SEALED,
        "signer": {"id": signer},
        "status": {"assigned": assigned, "certified": certified, "enabled": enabled},
    }
    if certificate_der is not None:
        body["certificate"] = base64.b64encode(certificate_der).decode()
    if chain:
        body["certificate_chain"] = [
            base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain
        ]
    return KeyPairUpdateRequest.model_validate(body)


@pytest.mark.parametrize(
    ("state", "request_", "expected"),
    [
        ("assigned", update_request((True, True, True), certificate()), "ok"),
        ("assigned", update_request((True, True, False), certificate()), "ok"),
        ("certified", update_request((True, True, True)), "ok"),
        ("enabled", update_request((True, True, False)), "ok"),
        ("created", update_request((True, True, True), certificate()), "key_pair_not_assigned"),
        ("assigned", update_request((True, True, True), certificate(), signer="bob"), "signer_mismatch"),
        ("enabled", update_request((False, True, True)), "status_transition_invalid"),
        ("enabled", update_request((True, False, False)), "status_transition_invalid"),
        ("assigned", update_request((True, False, False), certificate()), "status_transition_invalid"),
        ("assigned", update_request((True, True, True)), "certificate_required"),
        ("assigned", update_request((True, True, True), b"not a certificate"), "certificate_invalid"),
        (
            "assigned",
            update_request((True, True, True), certificate(OTHER_KEY.public_key())),
            "certificate_key_mismatch",
        ),
        (
            "assigned",
            update_request((True, True, True), certificate(subject="mallory")),
            "certificate_subject_mismatch",
        ),
    ],
)
def test_update(state: str, request_: KeyPairUpdateRequest, expected: str) -> None:
    assert refusal(lifecycle.updated, key_pair(state), request_, "ssa-1", ANCHORS, NOW) == expected


def test_an_update_is_the_next_revision_with_the_new_status_and_certificate() -> None:
    der = certificate()
    result = lifecycle.updated(
        key_pair("assigned"), update_request((True, True, True), der), "ssa-1", ANCHORS, NOW
    )
    assert result.status == KeyPairStatus(assigned=True, certified=True, enabled=True)
    assert base64.b64decode(result.certificate or "") == der and result.revision == 4
    disabled = lifecycle.updated(result, update_request((True, True, False)), "ssa-1", ANCHORS, NOW)
    assert disabled.certificate == result.certificate and not disabled.status.enabled


# --- deletion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "signer", "sad_given", "expected", "sad_expected"),
    [
        ("created", None, False, "ok", False),
        ("enabled", "alice", False, "ok", False),
        ("enabled", "alice", True, "ok", True),
        ("enabled", None, False, "signer_mismatch", False),
        ("enabled", "bob", True, "signer_mismatch", False),
    ],
)
def test_deletion(state: str, signer: str | None, sad_given: bool, expected: str, sad_expected: bool) -> None:
    body: dict[str, Any] = {"key_pair": SEALED} | ({"signer": {"id": signer}} if signer else {})
    request = KeyPairDeleteRequest.model_validate(body)
    assert refusal(lifecycle.plan_deletion, key_pair(state), request, "ssa-1", sad_given) == expected
    if expected == "ok":
        plan = lifecycle.plan_deletion(key_pair(state), request, "ssa-1", sad_given)
        assert (plan.sad is not None) is sad_expected
        assert plan.result.revision == 4
        if plan.sad is not None:
            assert plan.sad.detail_type == SAD_TYPE_DELETION and plan.sad.signer == "alice"


# --- re-wrap ----------------------------------------------------------------------------


def test_rewrap_only_under_another_kek_and_as_the_next_revision() -> None:
    current = key_pair("enabled")
    assert not lifecycle.rewrap_needed(current, "kek-1", "ssa-1")
    assert lifecycle.rewrap_needed(current, "kek-2", "ssa-1")
    result = lifecycle.rewrapped(current, b"new", "kek-2", "AES_KEY_WRAP_PAD")
    assert (result.kek, result.wrapped_key_bytes, result.revision) == ("kek-2", b"new", 4)
    assert result.status == current.status and result.signer == current.signer


# --- signing ----------------------------------------------------------------------------

DIGEST = base64.b64encode(hashlib.sha256(b"doc").digest()).decode()


def sign_request(**changes: Any) -> SignaturesCreateRequest:
    body = {
        "signature_algorithm": EC_SHA256,
        "requests": [{"dtbs": DIGEST}],
        "key_pair": SEALED,
        "signer": {"id": "alice"},
        **changes,
    }
    return SignaturesCreateRequest.model_validate(body)


@pytest.mark.parametrize(
    ("state", "request_", "expected"),
    [
        ("enabled", sign_request(), "ok"),
        ("enabled", sign_request(requests=[{"dtbs": DIGEST, "signature_algorithm": EC_SHA256}] * 3), "ok"),
        ("created", sign_request(), "key_pair_not_assigned"),
        ("assigned", sign_request(), "key_pair_not_certified"),
        ("certified", sign_request(), "key_pair_disabled"),
        ("enabled", sign_request(signer={"id": "bob"}), "signer_mismatch"),
        ("enabled", sign_request(signature_algorithm=RSA_SHA256), "algorithm_key_mismatch"),
        ("enabled", sign_request(signature_algorithm="1.2.3.4"), "unsupported_algorithm"),
        (
            "enabled",
            sign_request(requests=[{"dtbs": DIGEST, "signature_algorithm": EC_SHA384}]),
            "unsupported_algorithm",
        ),
        ("enabled", sign_request(requests=[{"dtbs": "not base64!"}]), "invalid_dtbs"),
        ("enabled", sign_request(requests=[{"dtbs": base64.b64encode(b"short").decode()}]), "invalid_dtbs"),
        (
            "enabled",
            sign_request(signature_algorithm=EC_SHA384),
            "invalid_dtbs",
        ),  # a SHA-256 hash for SHA-384
    ],
)
def test_signing(state: str, request_: SignaturesCreateRequest, expected: str) -> None:
    assert refusal(lifecycle.plan_signing, key_pair(state), request_, "ssa-1", NOW) == expected


def test_signing_asks_for_a_sad_for_exactly_these_digests() -> None:
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    request = sign_request(requests=[{"dtbs": base64.b64encode(d).decode()} for d in digests])
    plan = lifecycle.plan_signing(key_pair("enabled"), request, "ssa-1", NOW)
    assert plan.digests == tuple(digests)
    assert plan.sad.digests == tuple(digests) and plan.sad.hash_oid == "2.16.840.1.101.3.4.2.1"
    assert (plan.sad.ssa, plan.sad.signer, plan.sad.key_pair_id) == ("ssa-1", "alice", "kp-1")
    assert plan.sad.detail_type == SAD_TYPE_SIGNATURE
    assert plan.dtbs_sha256 == [hashlib.sha256(d).hexdigest() for d in digests]


@pytest.mark.parametrize(("count", "expected"), [(1, "ok"), (100, "ok"), (101, "too_many_digests")])
def test_digests_per_request_are_capped(count: int, expected: str) -> None:
    assert (
        refusal(lifecycle.check_digest_count, sign_request(requests=[{"dtbs": DIGEST}] * count), 100)
        == expected
    )


@pytest.mark.parametrize(
    ("enrolled", "factor", "expected"),
    [
        (False, None, "ok"),
        (False, {"type": "pin", "value": "123456"}, "ok"),
        (True, None, "sam_factor_missing"),
        (True, {"type": "pin", "value": "123456"}, "ok"),
    ],
)
def test_a_sam_managed_factor_is_asked_for_only_when_enrolled(
    enrolled: bool, factor: dict[str, str] | None, expected: str
) -> None:
    changes = {"factor_type": "pin", "factor_verifier": base64.b64encode(b"mac").decode()} if enrolled else {}
    given = SamFactor.model_validate(factor) if factor else None
    assert refusal(lifecycle.check_factor, key_pair("enabled", **changes), given) == expected
    if enrolled and given is not None:
        assert lifecycle.check_factor(key_pair("enabled", **changes), given) == lifecycle.factor_input(
            "kp-1", given
        )


def test_the_factor_mac_must_match_the_enrolled_verifier() -> None:
    enrolled = key_pair("enabled", factor_type="pin", factor_verifier=base64.b64encode(b"mac").decode())
    lifecycle.verify_factor_mac(enrolled, b"mac")
    assert refusal(lifecycle.verify_factor_mac, enrolled, b"other mac") == ErrorCode.sam_factor_invalid.name
    assert lifecycle.factor_input("kp-1", SamFactor(type="pin", value="1234")) != lifecycle.factor_input(
        "kp-2", SamFactor(type="pin", value="1234")
    )


# --- tenants: the owner, and the authorization server that speaks for the signer ------

TWO_AS = frozenset({"as-1", "as-2"})
INFO = build_certification_request_info(SPKI, SUBJECT)


def _every_operation(state: str, ssa: str, **changes: Any) -> dict[str, str]:
    """The refusal each SSA operation gets on one key pair from ``ssa``."""
    pair = key_pair(state, **changes)
    return {
        "assign": refusal(lifecycle.plan_assignment, pair, assign_request(), ssa, ONE_AS, OPTIONAL, False),
        "pop": refusal(lifecycle.plan_proof_of_possession, pair, pop_request(INFO), ssa),
        "update": refusal(lifecycle.updated, pair, update_request((True, True, False)), ssa, ANCHORS, NOW),
        "delete": refusal(
            lifecycle.plan_deletion,
            pair,
            KeyPairDeleteRequest.model_validate({"key_pair": SEALED}),
            ssa,
            False,
        ),
        "rewrap": refusal(lifecycle.rewrap_needed, pair, "kek-2", ssa),
        "sign": refusal(lifecycle.plan_signing, pair, sign_request(), ssa, NOW),
    }


@pytest.mark.parametrize("state", ["created", "assigned", "enabled"])
def test_another_ssa_holding_a_copy_can_do_nothing_with_it(state: str) -> None:
    assert set(_every_operation(state, "ssa-2").values()) == {"key_pair_not_owned"}


@pytest.mark.parametrize("state", ["created", "assigned", "enabled"])
def test_a_key_pair_sealed_before_owners_is_refused_until_bound(state: str) -> None:
    legacy = {"v": 1, "owner": None, "authorization_server": None}
    assert set(_every_operation(state, "ssa-1", **legacy).values()) == {"key_pair_unbound"}


@pytest.mark.parametrize(
    ("allowed", "named", "skad_given", "expected", "bound"),
    [
        (ONE_AS, None, False, "ok", "as-1"),  # the owner's only AS
        (TWO_AS, None, False, "authorization_server_required", None),
        (TWO_AS, "as-2", False, "ok", "as-2"),
        (ONE_AS, "as-2", False, "sad_issuer_not_allowed", None),
        (TWO_AS, None, True, "ok", "skad"),  # the SKAD's issuer, whichever allowed AS it is
        (TWO_AS, "as-2", True, "ok", "as-2"),  # and the SKAD must then come from as-2
    ],
)
def test_assignment_binds_the_signer_to_one_authorization_server(
    allowed: frozenset[str], named: str | None, skad_given: bool, expected: str, bound: str | None
) -> None:
    request = assign_request(**({"authorization_server": named} if named else {}))
    args = (key_pair("created"), request, "ssa-1", allowed, OPTIONAL, skad_given)
    assert refusal(lifecycle.plan_assignment, *args) == expected
    if expected != "ok":
        return
    plan = lifecycle.plan_assignment(*args)
    if bound == "skad":
        assert plan.skad is not None and plan.skad.issuer is None
        assert plan.result(None, skad_issuer="as-2").authorization_server == "as-2"
    else:
        assert plan.result(None).authorization_server == bound
        assert plan.skad is None or plan.skad.issuer == bound


def test_signing_and_deletion_sads_must_come_from_the_signers_authorization_server() -> None:
    pair = key_pair("enabled", authorization_server="as-2")
    assert lifecycle.plan_signing(pair, sign_request(), "ssa-1", NOW).sad.issuer == "as-2"
    deletion = lifecycle.plan_deletion(
        pair,
        KeyPairDeleteRequest.model_validate({"key_pair": SEALED, "signer": {"id": "alice"}}),
        "ssa-1",
        True,
    )
    assert deletion.sad is not None and deletion.sad.issuer == "as-2"


def bind_request(owner: str, authorization_server: str | None = None) -> KeyPairBindRequest:
    body: dict[str, Any] = {"key_pair": SEALED, "owner": owner}
    if authorization_server:
        body["authorization_server"] = authorization_server
    return KeyPairBindRequest.model_validate(body)


SSAS = {"ssa-1": frozenset({"as-1"}), "ssa-2": frozenset({"as-1", "as-2"}), "ssa-3": frozenset({"as-2"})}
LEGACY = {"v": 1, "owner": None, "authorization_server": None}


@pytest.mark.parametrize(
    ("state", "changes", "request_", "expected"),
    [
        ("created", LEGACY, bind_request("ssa-1"), "ok"),
        ("enabled", LEGACY, bind_request("ssa-1", "as-1"), "ok"),
        ("enabled", LEGACY, bind_request("ssa-1"), "binding_invalid"),  # whose signer is it?
        ("enabled", LEGACY, bind_request("ssa-1", "as-2"), "binding_invalid"),  # ssa-1 may not use as-2
        ("created", LEGACY, bind_request("ssa-9"), "binding_invalid"),  # no such SSA
        ("created", {}, bind_request("ssa-2", "as-1"), "binding_invalid"),  # no AS before assignment
        ("enabled", {}, bind_request("ssa-2"), "ok"),  # moved, keeping as-1
        ("enabled", {}, bind_request("ssa-2", "as-2"), "binding_invalid"),  # never another AS for alice
        ("enabled", {}, bind_request("ssa-3"), "binding_invalid"),  # ssa-3 may not use as-1
    ],
)
def test_an_administrator_binds_or_moves_a_key_pair(
    state: str, changes: dict[str, Any], request_: KeyPairBindRequest, expected: str
) -> None:
    pair = key_pair(state, **changes)
    assert refusal(lifecycle.plan_binding, pair, request_, SSAS) == expected
    if expected == "ok":
        bound = lifecycle.plan_binding(pair, request_, SSAS)
        assert (bound.v, bound.owner, bound.revision) == (2, request_.owner, pair.revision + 1)
        assert bound.authorization_server == (None if state == "created" else "as-1")
        assert (bound.signer, bound.status) == (pair.signer, pair.status)


# --- the certificate policy -------------------------------------------------------------

ROGUE_KEY = ec.generate_private_key(ec.SECP256R1())
CERTIFY = (True, True, True)


def _with_duplicate_key_usage(der: bytes, issuer_key: ec.EllipticCurvePrivateKey) -> bytes:
    """``der`` with its first extension twice, signed again: a DER cryptography parses only
    lazily (and then refuses), asn1crypto not at all."""
    from asn1crypto import x509 as asn1_x509

    certificate = asn1_x509.Certificate.load(der)
    tbs = certificate["tbs_certificate"]
    extensions = list(tbs["extensions"])
    tbs["extensions"] = [*extensions, extensions[0]]
    signature = issuer_key.sign(tbs.dump(force=True), ec.ECDSA(hashes.SHA256()))
    result: bytes = asn1_x509.Certificate(
        {
            "tbs_certificate": tbs,
            "signature_algorithm": certificate["signature_algorithm"],
            "signature_value": signature,
        }
    ).dump(force=True)
    return result


def _end_entity(**changes: Any) -> bytes:
    """A signer's certificate with extra extensions, under the dev CA."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("CN=alice,O=Example"))
        .issuer_name(_name("CN=dev CA"))
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(SIGNING_USAGE, critical=True)
    )
    for extension, critical in changes.get("extensions", []):
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(OTHER_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


CONSTRAINED_ANCHOR_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (update_request(CERTIFY, certificate()), "ok"),
        (
            update_request(
                CERTIFY, certificate(issuer=("CN=issuing CA", INTERMEDIATE_KEY)), chain=(INTERMEDIATE,)
            ),
            "ok",
        ),
        (
            update_request(CERTIFY, certificate(issuer=("CN=issuing CA", INTERMEDIATE_KEY))),
            "certificate_untrusted",
        ),
        (update_request(CERTIFY, certificate(issuer=("CN=dev CA", ROGUE_KEY))), "certificate_untrusted"),
        (
            update_request(
                CERTIFY,
                certificate(issuer=("CN=issuing CA", INTERMEDIATE_KEY)),
                chain=(_ca("CN=issuing CA", INTERMEDIATE_KEY, ("CN=dev CA", OTHER_KEY), ca=False),),
            ),
            "certificate_untrusted",  # a chain certificate that is no CA
        ),
        (
            update_request(
                CERTIFY,
                certificate(issuer=("CN=issuing CA", INTERMEDIATE_KEY)),
                chain=(
                    _ca("CN=issuing CA", INTERMEDIATE_KEY, ("CN=dev CA", OTHER_KEY), not_after=NOW - DAY),
                ),
            ),
            "certificate_expired",  # an expired intermediate
        ),
        (
            update_request(CERTIFY, certificate(not_after=NOW - DAY, not_before=NOW - 2 * DAY)),
            "certificate_expired",
        ),
        (
            update_request(CERTIFY, certificate(not_before=NOW + DAY, not_after=NOW + 2 * DAY)),
            "certificate_not_yet_valid",
        ),
        (update_request(CERTIFY, certificate(usage=None)), "certificate_usage_invalid"),
        (
            update_request(
                CERTIFY,
                certificate(
                    usage=x509.KeyUsage(False, False, True, False, False, False, False, False, False)
                ),
            ),
            "certificate_usage_invalid",  # keyEncipherment only
        ),
        (update_request(CERTIFY, certificate(), chain=()), "ok"),
        # found from outside: each must be refused, never a 500 or a pass
        (update_request(CERTIFY, _with_duplicate_key_usage(certificate(), OTHER_KEY)), "certificate_invalid"),
        (
            update_request(
                CERTIFY, _end_entity(extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])
            ),
            "certificate_usage_invalid",  # a CA certificate certifies no signer
        ),
        (
            update_request(
                CERTIFY,
                _end_entity(
                    extensions=[(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)]
                ),
            ),
            "certificate_usage_invalid",  # a TLS server certificate
        ),
        (
            update_request(
                CERTIFY,
                _end_entity(
                    extensions=[
                        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4.5"), b"\x05\x00"), True)
                    ]
                ),
            ),
            "certificate_untrusted",  # an unknown critical extension
        ),
        (
            update_request(
                CERTIFY,
                _end_entity(
                    extensions=[(x509.ExtendedKeyUsage([x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")]), False)]
                ),
            ),
            "ok",  # documentSigning
        ),
    ],
)
def test_a_certificate_must_chain_to_a_trust_anchor_be_valid_and_allow_signing(
    request_: KeyPairUpdateRequest, expected: str
) -> None:
    assert refusal(lifecycle.updated, key_pair("assigned"), request_, "ssa-1", ANCHORS, NOW) == expected


def test_no_trust_anchor_no_certification() -> None:
    assert refusal(
        lifecycle.updated, key_pair("assigned"), update_request(CERTIFY, certificate()), "ssa-1", (), NOW
    ) == ("certificate_untrusted")


@pytest.mark.parametrize(
    ("moment", "expected"),
    [(NOW, "ok"), (NOW + 2 * DAY, "certificate_expired"), (NOW - 2 * DAY, "certificate_not_yet_valid")],
)
def test_a_key_pair_signs_only_while_its_certificate_is_valid(
    moment: datetime.datetime, expected: str
) -> None:
    assert refusal(lifecycle.plan_signing, key_pair("enabled"), sign_request(), "ssa-1", moment) == expected


def test_a_path_length_constraint_binds_the_sam() -> None:
    """An anchor with pathlen 0 may certify signers directly, never through a sub-CA."""
    anchor = (
        x509.CertificateBuilder()
        .subject_name(_name("CN=constrained CA"))
        .issuer_name(_name("CN=constrained CA"))
        .public_key(CONSTRAINED_ANCHOR_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(CONSTRAINED_ANCHOR_KEY, hashes.SHA256())
    )
    direct = certificate(issuer=("CN=constrained CA", CONSTRAINED_ANCHOR_KEY))
    sub_ca = _ca("CN=issuing CA", INTERMEDIATE_KEY, ("CN=constrained CA", CONSTRAINED_ANCHOR_KEY))
    below = certificate(issuer=("CN=issuing CA", INTERMEDIATE_KEY))
    pair = key_pair("assigned")
    assert refusal(lifecycle.updated, pair, update_request(CERTIFY, direct), "ssa-1", (anchor,), NOW) == "ok"
    request_ = update_request(CERTIFY, below, chain=(sub_ca,))
    assert refusal(lifecycle.updated, pair, request_, "ssa-1", (anchor,), NOW) == "certificate_untrusted"
