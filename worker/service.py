"""One request, start to finish: authenticate, authorize, act, audit, answer.

The transport hands in an ``IncomingRequest`` (the broker message converted at the
edge) and gets back the one ``Reply`` to send. Every path — success, refusal or fault
— produces exactly one audit record before the reply exists; if the record cannot be
made durable the reply becomes ``audit_unavailable`` and the result is dropped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ValidationError

from worker.domain.algorithms import HsmMechanism, key_spec_from_template, signature_scheme
from worker.domain.audit import AuditEvent, AuditLog, Outcome
from worker.domain.authorization import RequestBinding, SadExpectation, verify_request_jws, verify_sad
from worker.domain.configuration import StaticConfiguration
from worker.domain.contract import (
    OPERATION_QUEUE,
    AssignRequest,
    DynamicConfiguration,
    ErrorBody,
    ErrorReply,
    KeyPairCreateRequest,
    KeyPairReply,
    KeyPairStatus,
    Operation,
    QueueClass,
    Signature,
    SignaturesCreateRequest,
    SignaturesReply,
)
from worker.domain.key_pair import KeyPairSealer, SealedKeyPair
from worker.domain.ledgers import ConfigurationLog, KeyEventLog, SadUseLog
from worker.errors import ErrorCode, SamError
from worker.hsm.api import Hsm, WrappedKey

__all__ = ["Appender", "AuditSink", "IncomingRequest", "Reply", "SamService", "error_reply"]

log = logging.getLogger(__name__)

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class IncomingRequest:
    """A request as delivered, before anything about it is trusted."""

    operation: str | None
    message_id: str | None
    correlation_id: str | None
    reply_to: str | None
    user_id: str | None
    body: bytes
    request_jws: str | None
    sad: str | None


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    error_code: str | None = None


class Appender(Protocol):
    async def append(self, data: dict[str, Any]) -> SamError | None: ...


class AuditSink(Protocol):
    async def record(self, event: AuditEvent) -> dict[str, Any]: ...


@dataclass
class _Trace:
    """What the audit record will say, filled in as far as the request gets."""

    operation: str
    log: AuditLog = AuditLog.service
    actor: str | None = None
    request_id: str | None = None
    signer: str | None = None
    key_pair: str | None = None
    sad_jti: str | None = None
    dtbs_sha256: list[str] = field(default_factory=list)

    def event(self, reply: Reply, detail: str | None) -> AuditEvent:
        return AuditEvent(
            log=self.log,
            operation=self.operation,
            outcome=Outcome.success if reply.status < 400 else Outcome.failure,
            status=reply.status,
            error_code=reply.error_code,
            actor=self.actor,
            request_id=self.request_id,
            signer=self.signer,
            key_pair=self.key_pair,
            sad_jti=self.sad_jti,
            dtbs_sha256=tuple(self.dtbs_sha256),
            detail=detail,
        )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _parse(model: type[_M], body: bytes) -> _M:
    # The stdlib parser, unlike orjson, lets us refuse duplicate keys: two readers of
    # one body must never see different values.
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SamError(ErrorCode.malformed_message, f"body is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(document, dict):
        raise SamError(ErrorCode.malformed_message, "body is not a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        where = ", ".join(".".join(map(str, e["loc"])) or "body" for e in exc.errors()[:5])
        raise SamError(ErrorCode.schema_violation, f"schema violation at {where}") from exc


def _ok(status: int, model: BaseModel | None) -> Reply:
    body = b"" if model is None else model.model_dump_json(exclude_none=True).encode()
    return Reply(status, body)


def error_reply(error: SamError, request_id: str | None) -> Reply:
    body = ErrorReply(error=ErrorBody(code=error.code.name, message=error.message, request_id=request_id))
    return Reply(error.status, body.model_dump_json().encode(), error.code.name)


class SamService:
    def __init__(
        self,
        static: StaticConfiguration,
        configuration: ConfigurationLog,
        key_events: KeyEventLog,
        sad_use: SadUseLog,
        appenders: dict[str, Appender],
        hsm: Hsm,
        sealer: KeyPairSealer,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._static = static
        self._configuration = configuration
        self._key_events = key_events
        self._sad_use = sad_use
        self._config_ledger = appenders["config"]
        self._key_ledger = appenders["key_events"]
        self._sad_ledger = appenders["sad_use"]
        self._hsm = hsm
        self._sealer = sealer
        self._audit = audit
        self._clock = clock
        self._handlers: dict[Operation, Callable[[IncomingRequest, _Trace], Awaitable[Reply]]] = {
            Operation.configurations_dynamic_put: self._put_configuration,
            Operation.configurations_dynamic_get: self._get_configuration,
            Operation.key_pairs_create: self._create_key_pair,
            Operation.signers_key_pairs_assign: self._assign_key_pair,
            Operation.signatures_create: self._create_signatures,
        }

    async def process(self, request: IncomingRequest) -> Reply:
        trace = _Trace(
            operation=request.operation or "unknown", actor=request.user_id, request_id=request.message_id
        )
        detail: str | None = None
        try:
            reply = await self._authenticate_and_handle(request, trace)
        except SamError as exc:
            reply, detail = error_reply(exc, request.message_id), exc.message
        except Exception:
            log.exception("unexpected fault on request %s", request.message_id)
            reply = error_reply(SamError(ErrorCode.internal_error), request.message_id)
        try:
            await self._audit.record(trace.event(reply, detail))
        except SamError as exc:
            log.error("audit failed for request %s: %s", request.message_id, exc.message)
            return error_reply(exc, request.message_id)
        return reply

    async def _authenticate_and_handle(self, request: IncomingRequest, trace: _Trace) -> Reply:
        limits = self._static.limits
        user = request.user_id
        if not user:
            raise SamError(ErrorCode.missing_user_id)
        admin_key = self._configuration.admin_key(user)
        if admin_key is not None:
            trace.log = AuditLog.admin
        if not request.message_id or not request.reply_to or not request.correlation_id:
            raise SamError(ErrorCode.missing_properties)
        if len(request.body) > limits.max_body_bytes:
            raise SamError(ErrorCode.message_too_large, f"body over {limits.max_body_bytes} bytes")
        ssa = self._configuration.state.ssa(user)
        key = admin_key if admin_key is not None else (ssa.key if ssa is not None else None)
        if key is None:
            raise SamError(ErrorCode.unknown_user, f"{user!r} is not a registered SSA or administrator")
        binding = RequestBinding(request.body, request.message_id, request.operation or "", user)
        verify_request_jws(
            request.request_jws, key, binding, int(self._clock()), limits.request_max_age_seconds
        )
        try:
            operation = Operation(request.operation or "")
        except ValueError:
            raise SamError(ErrorCode.unknown_operation, f"no operation {request.operation!r}") from None
        needs_admin = OPERATION_QUEUE[operation] is QueueClass.admin
        if needs_admin != (admin_key is not None):
            raise SamError(ErrorCode.operation_not_permitted, f"{user!r} may not call {operation}")
        return await self._handlers[operation](request, trace)

    # --- administration ---------------------------------------------------------------

    async def _put_configuration(self, request: IncomingRequest, trace: _Trace) -> Reply:
        config = _parse(DynamicConfiguration, request.body)
        current = self._configuration.state.version
        if config.version <= current:
            raise SamError(
                ErrorCode.configuration_version_conflict,
                f"version {config.version} is not above the current {current}",
            )
        assert request.user_id and request.message_id and request.request_jws
        record = ConfigurationLog.record(
            request.user_id, request.message_id, request.body, request.request_jws
        )
        verdict = await self._config_ledger.append(record)
        if verdict is not None:
            raise verdict
        return _ok(204, None)

    async def _get_configuration(self, request: IncomingRequest, trace: _Trace) -> Reply:
        config = self._configuration.state.config
        if config is None:
            raise SamError(ErrorCode.configuration_missing)
        return _ok(200, config)

    # --- key pairs --------------------------------------------------------------------

    async def _create_key_pair(self, request: IncomingRequest, trace: _Trace) -> Reply:
        template = _parse(KeyPairCreateRequest, request.body).key_template
        spec = key_spec_from_template(template.algorithm, template.size, template.named_curve)
        generated = self._hsm.generate_key_pair(spec)
        key_pair = SealedKeyPair(
            sam=self._static.sam_id,
            id=str(uuid.uuid4()),
            algorithm=spec.key_type,
            size=spec.size,
            named_curve=spec.curve.name if spec.curve else None,
            public_key=base64.b64encode(generated.public_key_der).decode(),
            wrapped_private_key=base64.b64encode(generated.wrapped_private_key).decode(),
            kek=generated.kek_label,
            wrap_mechanism=generated.wrap_mechanism,
            status=KeyPairStatus(assigned=False, certified=False, enabled=False),
            created=int(self._clock()),
        )
        trace.key_pair = key_pair.id
        return _ok(201, KeyPairReply(key_pair=key_pair.readable(self._sealer.seal(key_pair))))

    async def _assign_key_pair(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(AssignRequest, request.body)
        trace.signer = body.signer.id
        key_pair = self._sealer.open(body.key_pair.sealed)
        trace.key_pair = key_pair.id
        if key_pair.status.assigned or key_pair.id in self._key_events.assigned:
            raise SamError(ErrorCode.key_pair_already_assigned)
        verdict = await self._key_ledger.append(KeyEventLog.assignment(key_pair.id, body.signer.id))
        if verdict is not None:
            raise verdict
        assigned = key_pair.assigned_to(body.signer.id, body.subject)
        return _ok(200, KeyPairReply(key_pair=assigned.readable(self._sealer.seal(assigned))))

    # --- signatures -------------------------------------------------------------------

    async def _create_signatures(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(SignaturesCreateRequest, request.body)
        trace.signer = body.signer.id
        limit = self._static.limits.max_digests_per_request
        if len(body.requests) > limit:
            raise SamError(ErrorCode.too_many_digests, f"at most {limit} DTBS/R per request")
        key_pair = self._sealer.open(body.key_pair.sealed)
        trace.key_pair = key_pair.id
        if not key_pair.status.assigned or key_pair.signer is None:
            raise SamError(ErrorCode.key_pair_not_assigned)
        if key_pair.signer != body.signer.id:
            raise SamError(ErrorCode.signer_mismatch)
        main = signature_scheme(body.signature_algorithm, key_pair.algorithm)
        schemes, digests = [], []
        for item in body.requests:
            scheme = signature_scheme(
                item.signature_algorithm or body.signature_algorithm, key_pair.algorithm
            )
            try:
                dtbs = base64.b64decode(item.dtbs, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise SamError(ErrorCode.invalid_dtbs, "DTBS/R is not base64") from exc
            scheme.check_dtbs(dtbs)
            if scheme.hash_oid != main.hash_oid:
                raise SamError(
                    ErrorCode.sad_digest_mismatch, "all DTBS/R of one request share one hash algorithm"
                )
            schemes.append(scheme)
            digests.append(dtbs)
        trace.dtbs_sha256 = [hashlib.sha256(d).hexdigest() for d in digests]
        assert request.user_id
        claims = verify_sad(
            request.sad,
            self._configuration.state,
            self._static.sam_id,
            self._static.sad_policy,
            SadExpectation(request.user_id, key_pair.signer, key_pair.id, main.hash_oid, tuple(digests)),
            int(self._clock()),
        )
        trace.sad_jti = claims.jti
        if f"{claims.iss} {claims.jti}" in self._sad_use.used:
            raise SamError(ErrorCode.sad_replayed)
        verdict = await self._sad_ledger.append(SadUseLog.use(claims.iss, claims.jti, claims.exp))
        if verdict is not None:
            raise verdict
        wrapped = WrappedKey(
            key_pair.key_spec, key_pair.wrapped_key_bytes, key_pair.kek, key_pair.wrap_mechanism
        )
        # One scheme family per key type, so one unwrap serves the whole request.
        raw = self._hsm.sign_with_wrapped_key(
            wrapped, main.mechanism, [s.hsm_input(d) for s, d in zip(schemes, digests, strict=True)]
        )
        if main.mechanism is HsmMechanism.ECDSA:
            raw = [_ecdsa_der(sig) for sig in raw]
        signatures = [
            Signature(signature=base64.b64encode(sig).decode(), signature_algorithm=s.oid)
            for sig, s in zip(raw, schemes, strict=True)
        ]
        return _ok(200, SignaturesReply(signatures=signatures))


def _ecdsa_der(raw: bytes) -> bytes:
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
