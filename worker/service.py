"""One request, start to finish: authenticate, authorize, act, audit, answer.

The transport hands in an ``IncomingRequest`` (the broker message converted at the
edge) and gets back the one ``Reply`` to send. Every path — success, refusal or fault
— produces exactly one audit record before the reply exists; if the record cannot be
made durable the reply becomes ``audit_unavailable`` and the result is dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import BaseModel, ValidationError

from worker.domain.algorithms import HsmMechanism, SignatureScheme, key_spec_from_template, signature_scheme
from worker.domain.audit import AuditEvent, AuditLog, Outcome
from worker.domain.authorization import (
    SAD_TYPE_DELETION,
    SKAD_TYPE_ASSIGNMENT,
    RequestBinding,
    SadClaims,
    SadExpectation,
    verify_request_jws,
    verify_sad,
)
from worker.domain.certification import canonical_subject, check_certificate, check_certification_request_info
from worker.domain.configuration import StaticConfiguration
from worker.domain.contract import (
    OPERATION_QUEUE,
    AssignRequest,
    DynamicConfiguration,
    ErrorBody,
    ErrorReply,
    KeyPairCreateRequest,
    KeyPairDeleteReply,
    KeyPairDeleteRequest,
    KeyPairReply,
    KeyPairRewrapRequest,
    KeyPairStatus,
    KeyPairUpdateRequest,
    Operation,
    ProofOfPossessionReply,
    ProofOfPossessionRequest,
    QueueClass,
    SamFactor,
    Signature,
    SignaturesCreateRequest,
    SignaturesReply,
)
from worker.domain.key_pair import KeyPairSealer, SealedKeyPair
from worker.domain.ledgers import ConfigurationLog, KeyEvent, KeyEventLog, SadUseLog
from worker.errors import ErrorCode, SamError
from worker.hsm.api import Hsm, WrappedKey
from worker.metrics import Metrics, operation_label

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
    """A shared log (a RabbitMQ stream) as one replica sees it."""

    @property
    def position(self) -> int:
        """The offset this replica has applied up to."""
        ...

    async def append(self, data: dict[str, Any]) -> SamError | None:
        """Append a record and return its verdict, read back in log order."""
        ...

    async def read_to(self, position: int) -> None:
        """Return once this replica has applied the log up to ``position``."""
        ...


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
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._key_generation_lane = asyncio.Lock()
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
            Operation.proofs_of_possession_create: self._prove_possession,
            Operation.key_pairs_update: self._update_key_pair,
            Operation.key_pairs_delete: self._delete_key_pair,
            Operation.key_pairs_rewrap: self._rewrap_key_pair,
            Operation.signatures_create: self._create_signatures,
        }

    async def process(self, request: IncomingRequest) -> Reply:
        started = time.perf_counter()
        if request.operation == Operation.key_pairs_create:
            # Key generation holds the event loop for up to seconds (RSA-4096). One at a
            # time, each with its audit record made durable before the next starts:
            # otherwise a queue of them starves the audit flusher into timeouts.
            async with self._key_generation_lane:
                reply = await self._process(request)
        else:
            reply = await self._process(request)
        if self._metrics is not None:
            operation = operation_label(request.operation)
            outcome = "success" if reply.status < 400 else "failure"
            self._metrics.requests.labels(operation, outcome, reply.error_code or "ok").inc()
            self._metrics.request_seconds.labels(operation).observe(time.perf_counter() - started)
            if 400 <= reply.status < 500 and reply.error_code:
                self._metrics.rejections.labels(reply.error_code).inc()
        return reply

    async def _process(self, request: IncomingRequest) -> Reply:
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

    def _open(self, sealed: str, trace: _Trace, *, assigning: bool = False) -> SealedKeyPair:
        """The key pair inside the seal, refused if deleted or an outdated copy."""
        key_pair = self._sealer.open(sealed)
        trace.key_pair = key_pair.id
        refusal = self._key_events.refusal(key_pair.id, key_pair.revision, assigning=assigning)
        if refusal is not None:
            raise refusal
        return key_pair

    @staticmethod
    def _owned(key_pair: SealedKeyPair, signer: str | None) -> str:
        if not key_pair.status.assigned or key_pair.signer is None:
            raise SamError(ErrorCode.key_pair_not_assigned)
        if signer != key_pair.signer:
            raise SamError(ErrorCode.signer_mismatch)
        return key_pair.signer

    async def _record(self, event: KeyEvent, key_pair: SealedKeyPair) -> None:
        """Append the change to sam.key-events (the log's order decides races), then
        its mark to sam.sad-use, so every signature request spent after the reply waits
        until its worker has read the change (see ``SadUseLog``)."""
        record = KeyEventLog.event(event, key_pair.id, key_pair.revision, key_pair.signer)
        verdict = await self._key_ledger.append(record)
        if verdict is None:
            verdict = await self._sad_ledger.append(SadUseLog.key_events_mark(self._key_ledger.position))
        if verdict is not None:
            raise verdict

    def _sealed_reply(self, key_pair: SealedKeyPair, status: int = 200) -> Reply:
        return _ok(status, KeyPairReply(key_pair=key_pair.readable(self._sealer.seal(key_pair))))

    async def _authorize(
        self, request: IncomingRequest, trace: _Trace, expected: SadExpectation
    ) -> SadClaims:
        """Verify a SAD (or SKAD) and spend its jti cluster-wide."""
        claims = verify_sad(
            request.sad,
            self._configuration.state,
            self._static.sam_id,
            self._static.sad_policy,
            expected,
            int(self._clock()),
        )
        trace.sad_jti = claims.jti
        if f"{claims.iss} {claims.jti}" in self._sad_use.used:
            raise SamError(ErrorCode.sad_replayed)
        verdict = await self._sad_ledger.append(SadUseLog.use(claims.iss, claims.jti, claims.exp))
        if verdict is not None:
            raise verdict
        return claims

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
        return self._sealed_reply(key_pair, 201)

    async def _assign_key_pair(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(AssignRequest, request.body)
        trace.signer = body.signer.id
        key_pair = self._open(body.key_pair.sealed, trace, assigning=True)
        if key_pair.status.assigned:
            raise SamError(ErrorCode.key_pair_already_assigned)
        subject = canonical_subject(body.subject)
        if request.sad is not None or self._static.sad_policy.assignment_skad == "required":
            assert request.user_id
            expected = SadExpectation(
                request.user_id, body.signer.id, key_pair.id, detail_type=SKAD_TYPE_ASSIGNMENT
            )
            await self._authorize(request, trace, expected)
        factor: dict[str, object] = {}
        if body.sam_factor is not None:
            mac = self._hsm.factor_mac(_factor_input(key_pair.id, body.sam_factor))
            factor = {"factor_type": body.sam_factor.type, "factor_verifier": base64.b64encode(mac).decode()}
        assigned = key_pair.next_revision(
            signer=body.signer.id,
            subject=subject,
            status=key_pair.status.model_copy(update={"assigned": True}),
            **factor,
        )
        await self._record(KeyEvent.assigned, assigned)
        return self._sealed_reply(assigned)

    async def _prove_possession(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(ProofOfPossessionRequest, request.body)
        key_pair = self._open(body.key_pair.sealed, trace)
        trace.signer = key_pair.signer
        if not key_pair.status.assigned or key_pair.subject is None:
            raise SamError(ErrorCode.key_pair_not_assigned)
        if key_pair.status.certified:
            raise SamError(ErrorCode.key_pair_certified)
        scheme = signature_scheme(
            body.request.signature_algorithm, key_pair.algorithm, body.request.signature_algorithm_parameters
        )
        info = _base64(body.request.dtbs, ErrorCode.pop_not_a_certification_request, "dtbs")
        check_certification_request_info(info, key_pair.public_key_der, key_pair.subject)
        trace.dtbs_sha256 = [hashlib.sha256(info).hexdigest()]
        [signature] = self._sign(key_pair, scheme, [scheme.digest(info)])
        return _ok(
            200,
            ProofOfPossessionReply(
                signature=base64.b64encode(signature).decode(), signature_algorithm=scheme.oid
            ),
        )

    async def _update_key_pair(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(KeyPairUpdateRequest, request.body)
        trace.signer = body.signer.id
        key_pair = self._open(body.key_pair.sealed, trace)
        self._owned(key_pair, body.signer.id)
        wanted = body.status
        if not wanted.assigned or (key_pair.status.certified and not wanted.certified):
            raise SamError(
                ErrorCode.status_transition_invalid, "a key pair cannot be unassigned or un-certified"
            )
        certificate = key_pair.certificate
        if body.certificate is not None:
            if not wanted.certified:
                raise SamError(
                    ErrorCode.status_transition_invalid, "a certificate comes with certified: true"
                )
            der = _base64(body.certificate, ErrorCode.certificate_invalid, "certificate")
            assert key_pair.subject is not None
            check_certificate(der, key_pair.public_key_der, key_pair.subject)
            certificate = base64.b64encode(der).decode()
        elif wanted.certified and certificate is None:
            raise SamError(ErrorCode.certificate_required)
        updated = key_pair.next_revision(status=wanted, certificate=certificate)
        await self._record(KeyEvent.updated, updated)
        return self._sealed_reply(updated)

    async def _delete_key_pair(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(KeyPairDeleteRequest, request.body)
        key_pair = self._open(body.key_pair.sealed, trace)
        trace.signer = key_pair.signer
        if key_pair.signer is not None:
            self._owned(key_pair, body.signer.id if body.signer else None)
        if request.sad is not None:
            # the signer's own request, relayed by the SSA
            assert request.user_id
            expected = SadExpectation(
                request.user_id, key_pair.signer or "", key_pair.id, detail_type=SAD_TYPE_DELETION
            )
            await self._authorize(request, trace, expected)
        await self._record(KeyEvent.deleted, key_pair.next_revision())
        return _ok(200, KeyPairDeleteReply(key_pair_id=key_pair.id, deleted=True))

    async def _rewrap_key_pair(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(KeyPairRewrapRequest, request.body)
        key_pair = self._open(body.key_pair.sealed, trace)
        trace.signer = key_pair.signer
        if key_pair.kek == self._hsm.current_kek_label:
            return _ok(200, KeyPairReply(key_pair=key_pair.readable(body.key_pair.sealed)))
        rewrapped = self._hsm.rewrap(_wrapped(key_pair))
        updated = key_pair.next_revision(
            wrapped_private_key=base64.b64encode(rewrapped.wrapped).decode(),
            kek=rewrapped.kek_label,
            wrap_mechanism=rewrapped.wrap_mechanism,
        )
        await self._record(KeyEvent.rewrapped, updated)
        return self._sealed_reply(updated)

    # --- signatures -------------------------------------------------------------------

    def _sign(self, key_pair: SealedKeyPair, scheme: SignatureScheme, digests: list[bytes]) -> list[bytes]:
        raw = self._hsm.sign_with_wrapped_key(
            _wrapped(key_pair), scheme, [scheme.hsm_input(d) for d in digests]
        )
        if scheme.mechanism is HsmMechanism.ECDSA:
            return [_ecdsa_der(sig) for sig in raw]
        return raw

    async def _create_signatures(self, request: IncomingRequest, trace: _Trace) -> Reply:
        body = _parse(SignaturesCreateRequest, request.body)
        trace.signer = body.signer.id
        limit = self._static.limits.max_digests_per_request
        if len(body.requests) > limit:
            raise SamError(ErrorCode.too_many_digests, f"at most {limit} DTBS/R per request")
        key_pair = self._open(body.key_pair.sealed, trace)
        signer = self._owned(key_pair, body.signer.id)
        if not key_pair.status.certified:
            raise SamError(ErrorCode.key_pair_not_certified)
        if not key_pair.status.enabled:
            raise SamError(ErrorCode.key_pair_disabled)
        scheme = signature_scheme(
            body.signature_algorithm, key_pair.algorithm, body.signature_algorithm_parameters
        )
        digests = []
        for item in body.requests:
            if item.signature_algorithm is not None and (
                item.signature_algorithm != scheme.oid
                or (item.signature_algorithm_parameters or body.signature_algorithm_parameters)
                != body.signature_algorithm_parameters
            ):
                # One SAD names one hash algorithm, and one unwrap serves one scheme.
                raise SamError(
                    ErrorCode.unsupported_algorithm, "all DTBS/R of one request use one signature algorithm"
                )
            dtbs = _base64(item.dtbs, ErrorCode.invalid_dtbs, "DTBS/R")
            scheme.check_dtbs(dtbs)
            digests.append(dtbs)
        trace.dtbs_sha256 = [hashlib.sha256(d).hexdigest() for d in digests]
        assert request.user_id
        expected = SadExpectation(request.user_id, signer, key_pair.id, scheme.hash_oid, tuple(digests))
        await self._authorize(request, trace, expected)
        # Read back, the jti record follows the mark of every key pair change confirmed
        # before this request arrived: once key-events are read that far, a deletion or
        # a newer revision is seen before anything is signed.
        await self._key_ledger.read_to(self._sad_use.key_events_required)
        refusal = self._key_events.refusal(key_pair.id, key_pair.revision)
        if refusal is not None:
            raise refusal
        self._check_factor(key_pair, body.sam_factor)
        signatures = [
            Signature(signature=base64.b64encode(sig).decode(), signature_algorithm=scheme.oid)
            for sig in self._sign(key_pair, scheme, digests)
        ]
        return _ok(200, SignaturesReply(signatures=signatures))

    def _check_factor(self, key_pair: SealedKeyPair, factor: SamFactor | None) -> None:
        if key_pair.factor_verifier is None:
            return
        if factor is None or factor.type != key_pair.factor_type:
            raise SamError(ErrorCode.sam_factor_missing)
        expected = base64.b64decode(key_pair.factor_verifier)
        if not hmac.compare_digest(self._hsm.factor_mac(_factor_input(key_pair.id, factor)), expected):
            raise SamError(ErrorCode.sam_factor_invalid)


def _base64(text: str, code: ErrorCode, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SamError(code, f"{what} is not base64") from exc


def _factor_input(key_pair_id: str, factor: SamFactor) -> bytes:
    # bound to the key pair, so a verifier copied into another key pair is useless
    return b"\0".join([b"sam-factor-v1", key_pair_id.encode(), factor.type.encode(), factor.value.encode()])


def _wrapped(key_pair: SealedKeyPair) -> WrappedKey:
    return WrappedKey(key_pair.key_spec, key_pair.wrapped_key_bytes, key_pair.kek, key_pair.wrap_mechanism)


def _ecdsa_der(raw: bytes) -> bytes:
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
