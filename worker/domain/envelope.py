"""The envelope gate: every AMQP property and header the SAM reads, checked before
anything else reads the message.

A field arrives as the AMQP codec decoded it, so it may be missing, of any AMQP type,
of any length up to the frame size, and a string may hold lone surrogates where the
wire carried bytes that are not UTF-8 (``worker.transport.codec`` decodes them so,
instead of failing the frame). ``check_envelope`` turns the raw fields into an
``Envelope`` whose every value is safe to put in an audit record, a log line, a metric
label or a routing key — or ``None`` — and the first refusal, if any.

The reply goes only to the caller's own reply queue (``<user_id>.replies.<suffix>``,
the only queues its broker permissions let it read): a ``reply_to`` naming anything
else — another SSA's queue, a SAM stream, a request queue — gets no reply at all, only
its audit record.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from worker.domain.contract import OPERATION_QUEUE, Operation
from worker.errors import ErrorCode, SamError

__all__ = ["MAX_PROPERTY_CHARS", "MAX_TOKEN_CHARS", "Envelope", "check_envelope", "reply_queue_prefix"]

MAX_PROPERTY_CHARS = 128  # message_id, correlation_id, user_id, the reply queue's suffix
MAX_TOKEN_CHARS = 16_384  # the request JWS and the SAD, compact JWS

_USER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")  # the Identifier of the contract
_MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no space
_REPLY_SUFFIX = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
# an empty signature (alg "none") passes here: refusing it is the JWS checks' job, with their code
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_CONTENT_TYPE = "application/json"
_OPERATIONS = {str(operation): operation for operation in Operation}


def reply_queue_prefix(user: str) -> str:
    """Reply queues of a user start with this; the broker permissions rely on it."""
    return f"{user}.replies."


@dataclass(frozen=True)
class Envelope:
    """The checked envelope: each field is valid or ``None``; ``refusal`` is the first
    thing wrong with it. ``reply_to`` is set only when it is the caller's own reply
    queue: where it is ``None``, no reply is published."""

    operation: Operation | None
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    user_id: str | None
    request_jws: str | None
    sad: str | None
    refusal: SamError | None
    answer_by_ms: int | None = None  # when the caller stops waiting (``sam-answer-by``)


def _text(value: object, pattern: re.Pattern[str]) -> str | None:
    if isinstance(value, bytes):  # header values may come as AMQP byte arrays
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) and pattern.fullmatch(value) else None


def _epoch_ms(value: object) -> int | None:
    # an AMQP integer (not a boolean), a time after 2000 and before 2300 in milliseconds
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 946_684_800_000 <= value < 10_413_792_000_000
    ):
        return value
    return None


def _token(value: object) -> str | None:
    if isinstance(value, bytes) and len(value) <= MAX_TOKEN_CHARS:
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS:
        return None
    return value if _COMPACT_JWS.fullmatch(value) else None


def check_envelope(
    *,
    operation: object,
    message_id: object,
    correlation_id: object,
    reply_to: object,
    user_id: object,
    content_type: object,
    request_jws: object,
    sad: object,
    undecodable: tuple[str, ...] = (),
    queue: str | None = None,
    returned: bool = False,
    answer_by: object = None,
) -> Envelope:
    """Check each field for presence, type, length and charset; the first refusal, in
    this order: a field that was not UTF-8 anywhere in the message (``invalid_properties``),
    no ``user_id`` (``missing_user_id``), no ``reply_to`` / ``message_id`` /
    ``correlation_id`` (``missing_properties``), a ``reply_to`` that is not the caller's
    own reply queue (``reply_to_not_permitted``), any field malformed
    (``invalid_properties``), an operation the SAM does not know (``unknown_operation``),
    an operation consumed from another ``queue`` class than its own (``wrong_queue``).
    A ``returned`` message (a reply or a dead letter back in a request queue) is refused
    before all that, and never answered."""
    user = _text(user_id, _USER_ID)
    own_queue = None
    if user is not None and isinstance(reply_to, str) and not returned:
        prefix = reply_queue_prefix(user)
        if reply_to.startswith(prefix) and _REPLY_SUFFIX.fullmatch(reply_to[len(prefix) :]):
            own_queue = reply_to
    checked = Envelope(
        operation=_OPERATIONS.get(operation) if isinstance(operation, str) else None,
        message_id=_text(message_id, _MESSAGE_ID),
        correlation_id=_text(correlation_id, _MESSAGE_ID),
        reply_to=own_queue,
        user_id=user,
        request_jws=_token(request_jws),
        sad=_token(sad),
        refusal=None,
        answer_by_ms=_epoch_ms(answer_by),
    )
    raw = {
        "message_id": message_id,
        "correlation_id": correlation_id,
        "reply_to": reply_to,
        "user_id": user_id,
        "content_type": content_type,
        "request_jws": request_jws,
        "sad": sad,
        "answer_by": answer_by,
    }
    refusal = _first_refusal(checked, raw, undecodable, queue, returned)
    return checked if refusal is None else dataclasses.replace(checked, refusal=refusal)


def _first_refusal(
    checked: Envelope,
    raw: dict[str, object],
    undecodable: tuple[str, ...],
    queue: str | None,
    returned: bool,
) -> SamError | None:
    if returned:  # before anything else: such a message never gets a reply
        return SamError(ErrorCode.invalid_properties, "a reply or a dead-lettered message is no request")
    if undecodable:
        names = ", ".join(sorted({n for n in undecodable if _USER_ID.fullmatch(n)}) or ["a field"])[:200]
        return SamError(ErrorCode.invalid_properties, f"not UTF-8: {names}")
    if raw["user_id"] is None or raw["user_id"] == "":
        return SamError(ErrorCode.missing_user_id)
    if checked.user_id is None:
        return SamError(ErrorCode.invalid_properties, "user_id is not an identifier")
    if not raw["reply_to"] or not raw["message_id"] or not raw["correlation_id"]:
        return SamError(ErrorCode.missing_properties)
    if checked.reply_to is None:
        return SamError(
            ErrorCode.reply_to_not_permitted,
            f"reply_to must be a queue {reply_queue_prefix(checked.user_id)}<1-128 of A-Za-z0-9._:@->",
        )
    if checked.message_id is None or checked.correlation_id is None:
        return SamError(
            ErrorCode.invalid_properties, "message_id and correlation_id are 1-128 printable ASCII characters"
        )
    if raw["content_type"] is not None and raw["content_type"] != _CONTENT_TYPE:
        return SamError(ErrorCode.invalid_properties, f"content_type must be {_CONTENT_TYPE}")
    if raw["request_jws"] is not None and checked.request_jws is None:
        return SamError(ErrorCode.invalid_properties, "sam-request-jws is not a compact JWS")
    if raw["sad"] is not None and checked.sad is None:
        return SamError(ErrorCode.invalid_properties, "sam-sad is not a compact JWS")
    if raw["answer_by"] is not None and checked.answer_by_ms is None:
        return SamError(ErrorCode.invalid_properties, "sam-answer-by is not an integer of epoch milliseconds")
    if checked.operation is None:
        return SamError(ErrorCode.unknown_operation, "the AMQP type names no operation")
    home = OPERATION_QUEUE[checked.operation].value
    if queue is not None and home != queue:
        return SamError(ErrorCode.wrong_queue, f"{checked.operation} goes to the {home} queue")
    return None
