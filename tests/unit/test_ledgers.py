"""Ledger reducers: the same records give the same verdicts on every replica."""

from __future__ import annotations

import time

import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey

from worker.devtools.pki import private_key_pem, public_key_pem
from worker.domain.authorization import RequestBinding, request_jws_payload
from worker.domain.configuration import StaticConfiguration
from worker.domain.ledgers import ConfigurationLog, KeyEvent, KeyEventLog, SadUseLog

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
    assert replay is not None and replay.code.name == "sad_replayed"
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
    assert unreadable is not None and unreadable.code.name == "internal_error"
