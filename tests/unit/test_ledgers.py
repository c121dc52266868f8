"""Ledger reducers: the same records give the same verdicts on every replica."""

from __future__ import annotations

import time

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from sam_devtools.pki import private_key_pem, public_key_pem
from worker.domain.authorization import RequestBinding, request_jws_payload
from worker.domain.configuration import StaticConfiguration
from worker.domain.ledgers import Claimed, ConfigurationLog, KeyEvent, KeyEventLog, RequestIdentity, SadUseLog
from worker.errors import SamError

ADMIN = ec.generate_private_key(ec.SECP256R1())
STATIC = StaticConfiguration.model_validate(
    {"sam_id": "sam-1", "administrators": [{"id": "admin-1", "public_key": public_key_pem(ADMIN)}]}
)


def config_record(
    version: int, key: ec.EllipticCurvePrivateKey = ADMIN, user: str = "admin-1"
) -> dict[str, object]:
    body = orjson.dumps(
        {"version": version, "authorization_servers": [], "signing_service_privileged_users": []}
    )
    binding = RequestBinding(body, f"m-{version}", "configurations.dynamic.put", user)
    token = jws.serialize_compact(
        {"alg": "ES256"},
        request_jws_payload(binding, int(time.time())),
        ECKey.import_key(private_key_pem(key).decode()),
    )
    return ConfigurationLog.record(user, f"m-{version}", body, token)


def test_configuration_versions_only_increase() -> None:
    log = ConfigurationLog(STATIC)
    assert log.apply(config_record(1)) is None
    assert log.apply(config_record(3)) is None
    refused = log.apply(config_record(2))
    assert refused is not None and refused.code.name == "configuration_version_conflict"
    assert log.state.version == 3


def test_configuration_record_needs_an_administrators_signature() -> None:
    log = ConfigurationLog(STATIC)
    forged = log.apply(config_record(1, key=ec.generate_private_key(ec.SECP256R1())))
    assert forged is not None and forged.code.name == "request_signature_invalid"
    stranger = log.apply(config_record(1, user="ssa-1"))
    assert stranger is not None and stranger.code.name == "unknown_user"
    assert log.state.version == 0


def test_first_assignment_wins() -> None:
    log = KeyEventLog()
    assert log.apply(KeyEventLog.event(KeyEvent.assigned, "kp-1", 1, "alice")) is None
    second = log.apply(KeyEventLog.event(KeyEvent.assigned, "kp-1", 1, "bob"))
    assert second is not None and second.code.name == "key_pair_already_assigned"
    assert log.history["kp-1"].signer == "alice"


def test_copies_older_than_the_latest_revision_are_refused() -> None:
    log = KeyEventLog()
    assert log.refusal("kp-1", 0) is None  # never changed: any copy is current
    assert log.apply(KeyEventLog.event(KeyEvent.assigned, "kp-1", 1, "alice")) is None
    assert log.apply(KeyEventLog.event(KeyEvent.updated, "kp-1", 2, "alice")) is None
    racing = log.apply(KeyEventLog.event(KeyEvent.updated, "kp-1", 2, "alice"))
    assert racing is not None and racing.code.name == "key_pair_outdated"
    outdated = log.refusal("kp-1", 1)
    assert outdated is not None and outdated.code.name == "key_pair_outdated"
    assert log.refusal("kp-1", 2) is None
    reassign = log.refusal("kp-1", 0, assigning=True)
    assert reassign is not None and reassign.code.name == "key_pair_already_assigned"


def test_deletion_is_final() -> None:
    log = KeyEventLog()
    assert log.apply(KeyEventLog.event(KeyEvent.deleted, "kp-1", 1, None)) is None
    for revision in (0, 1, 5):
        refused = log.refusal("kp-1", revision)
        assert refused is not None and refused.code.name == "key_pair_deleted"
    again = log.apply(KeyEventLog.event(KeyEvent.deleted, "kp-1", 2, None))
    assert again is not None and again.code.name == "key_pair_deleted"


def test_jti_single_use_until_expiry() -> None:
    log = SadUseLog(clock_skew=30)
    now = int(time.time())
    assert log.apply(SadUseLog.use("as-1", "j-1", now + 60)) is None
    replay = log.apply(SadUseLog.use("as-1", "j-1", now + 60))
    assert isinstance(replay, SamError) and replay.code.name == "sad_replayed"
    assert log.apply(SadUseLog.use("as-2", "j-1", now + 60)) is None  # jti is per issuer
    log.forget_expired(now + 200)
    assert log.used == {}


def test_key_events_marks_only_raise_the_required_position() -> None:
    log = SadUseLog(clock_skew=30)
    assert log.key_events_required == -1
    assert log.apply(SadUseLog.key_events_mark(7)) is None
    assert log.apply(SadUseLog.key_events_mark(3)) is None  # marks of two workers, interleaved
    assert log.key_events_required == 7
    assert log.used == {}  # a mark spends no jti
    unreadable = log.apply({"key_events": "7"})
    assert isinstance(unreadable, SamError) and unreadable.code.name == "internal_error"


_A = RequestIdentity.of("ssa-1", "m-1", "signatures.create", b"body", "sad")
_A_OTHER_BODY = RequestIdentity.of("ssa-1", "m-1", "signatures.create", b"other", "sad")
_B = RequestIdentity.of("ssa-1", "m-2", "signatures.create", b"body", "sad")
_FAR = 2**40
_NOW = 1_796_000_000


def _verdict(verdict: object) -> object:
    if isinstance(verdict, SamError):
        return verdict.code.name
    return verdict


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        # a first claim owns the request; its answered mark is accepted once
        ([SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j")], [Claimed(0)]),
        (
            [SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j"), SadUseLog.answered(_A, 0, 7, _NOW)],
            [Claimed(0), None],
        ),
        # a repeat after the answer is told where the answer is
        (
            [
                SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j"),
                SadUseLog.answered(_A, 0, 7, _NOW),
                SadUseLog.claim(_A, _NOW, _FAR),
            ],
            [Claimed(0), None, Claimed(0, 7)],
        ),
        # ... and whether the answer travelled in the mark itself
        (
            [
                SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j"),
                SadUseLog.answered(_A, 0, 7, _NOW, {"request": _A.exact, "attempt": 0}),
                SadUseLog.claim(_A, _NOW, _FAR),
            ],
            [Claimed(0), None, Claimed(0, 7, mark=1)],  # where the mark is: read back from there
        ),
        # a repeat before any answer takes over; the first attempt's mark is then refused
        (
            [
                SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j"),
                SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j"),
                SadUseLog.answered(_A, 0, 7, _NOW),
                SadUseLog.answered(_A, 1, 8, _NOW),
                SadUseLog.answered(_A, 1, 9, _NOW),
            ],
            [Claimed(0), Claimed(1), "request_taken_over", None, "request_taken_over"],
        ),
        # the SAD of one request, in another's claim, is a replay; a reused message_id is refused
        (
            [SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j"), SadUseLog.claim(_B, _NOW, _FAR, "as-1", "j")],
            [Claimed(0), "sad_replayed"],
        ),
        (
            [SadUseLog.claim(_A, _NOW, _FAR), SadUseLog.claim(_A_OTHER_BODY, _NOW, _FAR)],
            [Claimed(0), "request_id_reused"],
        ),
        # a jti spent before claims existed is spent for every request
        (
            [SadUseLog.use("as-1", "j", _FAR), SadUseLog.claim(_A, _NOW, _FAR, "as-1", "j")],
            [None, "sad_replayed"],
        ),
        # an answered mark for a request never claimed, or unreadable records
        ([SadUseLog.answered(_A, 0, 7, _NOW)], ["request_taken_over"]),
        ([{"claim": _A.key}], ["internal_error"]),
        ([{"answered": _A.key, "attempt": "x", "at": 1}], ["internal_error"]),
    ],
)
def test_request_claims_decide_one_answering_attempt(
    records: list[dict[str, object]], expected: list[object]
) -> None:
    log = SadUseLog(clock_skew=30)
    assert [_verdict(log.apply(record, position)) for position, record in enumerate(records)] == expected


def test_claims_are_forgotten_with_their_window() -> None:
    log = SadUseLog(clock_skew=30)
    now = int(time.time())
    log.apply(SadUseLog.claim(_A, now, now + 60, "as-1", "j"))
    assert log.request(_A, now) is not None and log.spent("as-1", "j", _A)
    assert log.request(_A, now + 200) is None  # past its window, though not forgotten yet
    log.forget_expired(now + 200)
    assert (log.requests, log.used, log.spent_by) == ({}, {}, {})


def test_a_key_event_repeated_by_its_own_request_is_no_conflict() -> None:
    log = KeyEventLog()
    assert log.apply(KeyEventLog.event(KeyEvent.deleted, "kp-1", 3, "alice", "req-1")) is None
    assert log.refusal("kp-1", 2, request="req-1") is None  # the copy it started from
    assert log.apply(KeyEventLog.event(KeyEvent.deleted, "kp-1", 3, "alice", "req-1")) is None
    other = log.apply(KeyEventLog.event(KeyEvent.deleted, "kp-1", 3, "alice", "req-2"))
    assert other is not None and other.code.name == "key_pair_deleted"
    refused = log.refusal("kp-1", 2, request="req-2")
    assert refused is not None and refused.code.name == "key_pair_deleted"


def test_replicas_forget_claims_as_the_log_says_not_as_their_clocks_do() -> None:
    """A claim past its window is forgotten when a record of a later time is applied, on
    every replica alike, whatever each one's own clock did meanwhile: two replicas give a
    reused message_id the same verdict. A repeat claim does not extend the window, so a
    replica started later (replaying from a horizon) counts attempts as the others do."""
    early, late = SadUseLog(clock_skew=30), SadUseLog(clock_skew=30)
    first = SadUseLog.claim(_A, _NOW, _NOW + 20, "as-1", "j-1")
    repeat = SadUseLog.claim(_A, _NOW + 15, _NOW + 35)
    early.forget_expired(_NOW + 10_000)  # one replica's sweep runs early: it changes nothing now
    for log in (early, late):
        assert [log.apply(first), log.apply(repeat)] == [Claimed(0), Claimed(1)]
    inside = SadUseLog.claim(_A_OTHER_BODY, _NOW + 45, _NOW + 65)  # within first's window + skew
    after = SadUseLog.claim(_A_OTHER_BODY, _NOW + 60, _NOW + 80, "as-1", "j-2")  # past it
    verdicts = [[_verdict(log.apply(inside)), _verdict(log.apply(after))] for log in (early, late)]
    assert verdicts == [["request_id_reused", Claimed(0)]] * 2
