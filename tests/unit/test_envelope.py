"""The envelope gate over every AMQP property and header the SAM reads: a table of
hostile values per field (missing, wrong type, too long, outside the charset, not
UTF-8, pointing elsewhere) → the refusal each gets, and a property test that whatever
arrives, the checked envelope holds only values safe for an audit record, a log line,
a metric label or a routing key."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.domain.envelope import MAX_TOKEN_CHARS, check_envelope
from worker.errors import ErrorCode

JWS = "eyJhbGciOiJFUzI1NiJ9.eyJ4IjoxfQ.c2lnbmF0dXJl"
VALID: dict[str, Any] = {
    "operation": "signatures.create",
    "message_id": "0b6f2c1e-1111-4c1e-9a55-2b8f0c0ffee0",
    "correlation_id": "c-1",
    "reply_to": "ssa-1.replies.0b6f2c1e",
    "user_id": "ssa-1",
    "content_type": "application/json",
    "request_jws": JWS,
    "sad": JWS,
}
NOT_UTF8 = "\udcff"  # what the tolerant codec makes of a byte that is not UTF-8


def _code(**changes: Any) -> str:
    fields = {**VALID, **changes}
    undecodable = fields.pop("undecodable", ())
    refusal = check_envelope(**fields, undecodable=undecodable).refusal
    return "ok" if refusal is None else refusal.code.name


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "ok"),
        ({"content_type": None, "sad": None}, "ok"),
        ({"request_jws": JWS.encode()}, "ok"),  # an AMQP byte array header
        # anything the codec could not decode, read by the SAM or not
        ({"undecodable": ("app_id",)}, "invalid_properties"),
        ({"undecodable": ("headers",)}, "invalid_properties"),
        # user_id
        ({"user_id": None}, "missing_user_id"),
        ({"user_id": ""}, "missing_user_id"),
        ({"user_id": 7}, "invalid_properties"),
        ({"user_id": "ssa 1"}, "invalid_properties"),
        ({"user_id": "s" * 129}, "invalid_properties"),
        ({"user_id": "ssa-1" + NOT_UTF8}, "invalid_properties"),
        # presence
        ({"reply_to": None}, "missing_properties"),
        ({"message_id": None}, "missing_properties"),
        ({"correlation_id": ""}, "missing_properties"),
        # reply_to: the caller's own reply queue, nothing else
        ({"reply_to": "ssa-2.replies.0b6f2c1e"}, "reply_to_not_permitted"),
        ({"reply_to": "sam.key-events"}, "reply_to_not_permitted"),
        ({"reply_to": "sam.signatures"}, "reply_to_not_permitted"),
        ({"reply_to": "amq.rabbitmq.reply-to"}, "reply_to_not_permitted"),
        ({"reply_to": "ssa-1.replies."}, "reply_to_not_permitted"),
        ({"reply_to": "ssa-1.replies." + "x" * 129}, "reply_to_not_permitted"),
        ({"reply_to": "ssa-1.replies.a b"}, "reply_to_not_permitted"),
        ({"reply_to": "ssa-1.replies.x" + NOT_UTF8}, "reply_to_not_permitted"),
        ({"reply_to": 5}, "reply_to_not_permitted"),
        # message_id / correlation_id
        ({"message_id": "m" * 129}, "invalid_properties"),
        ({"message_id": "a b"}, "invalid_properties"),
        ({"message_id": "a\nb"}, "invalid_properties"),
        ({"message_id": "é"}, "invalid_properties"),
        ({"correlation_id": 12}, "invalid_properties"),
        ({"correlation_id": "c" + NOT_UTF8}, "invalid_properties"),
        # content type
        ({"content_type": "text/plain"}, "invalid_properties"),
        ({"content_type": 1}, "invalid_properties"),
        # the two headers
        ({"request_jws": 12}, "invalid_properties"),
        ({"request_jws": ["a"]}, "invalid_properties"),
        ({"request_jws": "x" * (MAX_TOKEN_CHARS + 1)}, "invalid_properties"),
        ({"request_jws": "not a jws"}, "invalid_properties"),
        ({"sad": {"a": 1}}, "invalid_properties"),
        ({"sad": b"\xff.\xff.\xff"}, "invalid_properties"),
        ({"sad": JWS + NOT_UTF8}, "invalid_properties"),
        # sam-answer-by: epoch milliseconds, an integer, or absent
        ({"answer_by": 1_796_000_000_000}, "ok"),
        ({"answer_by": True}, "invalid_properties"),
        ({"answer_by": "1796000000000"}, "invalid_properties"),
        ({"answer_by": 1_796_000_000.5}, "invalid_properties"),
        ({"answer_by": 1_796_000_000}, "invalid_properties"),  # seconds, not milliseconds
        ({"answer_by": -1}, "invalid_properties"),
        ({"answer_by": 2**63}, "invalid_properties"),
        # the operation
        ({"operation": "key_pairs.explode"}, "unknown_operation"),
        ({"operation": "k" * 250}, "unknown_operation"),
        ({"operation": None}, "unknown_operation"),
        ({"operation": 3}, "unknown_operation"),
    ],
)
def test_each_hostile_field_gets_its_refusal(changes: dict[str, Any], expected: str) -> None:
    assert _code(**changes) == expected


@pytest.mark.parametrize(
    ("queue", "expected"),
    [(None, "ok"), ("signatures", "ok"), ("keys", "wrong_queue"), ("admin", "wrong_queue")],
)
def test_an_operation_is_served_only_from_its_own_queue(queue: str | None, expected: str) -> None:
    refusal = check_envelope(**VALID, queue=queue).refusal
    assert (refusal.code.name if refusal else "ok") == expected


def test_a_reply_or_dead_letter_back_in_a_request_queue_is_refused_and_never_answered() -> None:
    envelope = check_envelope(**VALID, returned=True)
    assert envelope.refusal is not None and envelope.refusal.code is ErrorCode.invalid_properties
    assert envelope.reply_to is None


def test_a_reply_goes_only_to_the_callers_own_queue() -> None:
    assert check_envelope(**VALID).reply_to == VALID["reply_to"]
    for elsewhere in ("ssa-2.replies.x", "sam.key-events", "sam.requests", ""):
        envelope = check_envelope(**{**VALID, "reply_to": elsewhere})
        assert envelope.reply_to is None  # no reply is published at all


def test_the_first_refusal_wins_in_a_documented_order() -> None:
    assert _code(undecodable=("type",), user_id=None) == "invalid_properties"
    assert _code(user_id=None, reply_to=None) == "missing_user_id"
    assert _code(reply_to="sam.key-events", message_id="a b") == "reply_to_not_permitted"
    assert _code(message_id="a b", operation="nope") == "invalid_properties"
    assert ErrorCode.reply_to_not_permitted.status == 403


_SAFE = {
    "message_id": re.compile(r"[\x21-\x7e]{1,128}"),
    "correlation_id": re.compile(r"[\x21-\x7e]{1,128}"),
    "user_id": re.compile(r"[A-Za-z0-9._:@-]{1,128}"),
    "reply_to": re.compile(r"[A-Za-z0-9._:@-]{1,128}\.replies\.[A-Za-z0-9._:@-]{1,128}"),
    "request_jws": re.compile(r"[A-Za-z0-9_.-]{1,16384}"),
    "sad": re.compile(r"[A-Za-z0-9_.-]{1,16384}"),
}
anything = (
    st.none()
    | st.text(max_size=300)
    | st.binary(max_size=300)
    | st.integers()
    | st.booleans()
    | st.lists(st.text(max_size=5), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
    | st.sampled_from([*VALID.values(), "ssa-1.replies.x", "x" * 20_000, NOT_UTF8])
)


@settings(max_examples=3000, deadline=None)
@given(fields=st.fixed_dictionaries({name: anything for name in VALID}), broken=st.booleans())
def test_whatever_arrives_the_envelope_holds_only_safe_values(fields: dict[str, Any], broken: bool) -> None:
    envelope = check_envelope(**fields, undecodable=("app_id",) if broken else ())
    for name, pattern in _SAFE.items():
        value = getattr(envelope, name)
        assert value is None or (isinstance(value, str) and pattern.fullmatch(value)), (name, value)
        if value is not None:
            value.encode("utf-8")  # never a lone surrogate
    assert envelope.operation is None or str(envelope.operation) in {
        "configurations.dynamic.put",
        "configurations.dynamic.get",
        "key_pairs.create",
        "signers.key_pairs.assign",
        "proofs_of_possession.create",
        "key_pairs.update",
        "key_pairs.delete",
        "key_pairs.rewrap",
        "signatures.create",
    }
    if envelope.reply_to is not None:
        assert envelope.reply_to.startswith(f"{envelope.user_id}.replies.")
    if broken:
        assert envelope.refusal is not None and envelope.refusal.code is ErrorCode.invalid_properties
