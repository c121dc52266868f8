"""One request, start to finish: authenticate → parse → decide → act → audit → answer.

The transport hands in an ``IncomingRequest`` (the broker message converted at the
edge) and gets back the one ``Reply`` to send. What a request may do is decided by the
pure domain (``worker.domain.authorization`` for who may ask and what the signer
authorized, ``worker.domain.lifecycle`` for what an operation may do to a key pair);
this module only puts those decisions in order and acts on them through the ports
(``worker.ports``: the HSM, the shared ledgers, the audit sink).

Every path — success, refusal or fault — produces exactly one audit record before the
reply exists; if the record cannot be made durable the reply becomes
``audit_unavailable`` and the result is not released.

Requests that act (sign, generate, change a key pair: ``IDEMPOTENT``) are claimed in
``sam.sad-use`` before they do, and their result is kept — in the answered mark itself
when it is small, else first in the ``ResultStore`` — and marked answered there before
the audit record is written. A repeat of such a request — a copy
the SDK sent again, a redelivery after a worker died — is answered with the stored
result, or, when no attempt answered with one, takes the request over; see
``SadUseLog`` for why exactly one attempt of a request can answer with a result.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cryptography import x509
from pydantic import BaseModel

from worker.domain import lifecycle
from worker.domain.algorithms import (
    HsmMechanism,
    SignatureScheme,
    ecdsa_signature_der,
    key_spec_from_template,
)
from worker.domain.audit import AuditEvent, AuditLog, Outcome
from worker.domain.authorization import (
    RequestBinding,
    SadClaims,
    SadExpectation,
    verify_request_jws,
    verify_sad,
)
from worker.domain.configuration import StaticConfiguration
from worker.domain.contract import (
    OPERATION_QUEUE,
    AssignRequest,
    DynamicConfiguration,
    ErrorBody,
    ErrorReply,
    KeyPairBindRequest,
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
from worker.domain.envelope import Envelope, check_envelope
from worker.domain.key_pair import KeyPairSealer, SealedKeyPair
from worker.domain.ledgers import (
    Claimed,
    ConfigurationLog,
    KeyEvent,
    KeyEventLog,
    RequestIdentity,
    SadUseLog,
)
from worker.domain.wire import parse_body
from worker.errors import ErrorCode, SamError
from worker.metrics import Metrics, RepeatAnswer
from worker.ports import (
    AuditSink,
    Hsm,
    IncomingRequest,
    Ledger,
    MarkReader,
    Reply,
    ResultStore,
    StoredResult,
    WrappedKey,
)

__all__ = ["IDEMPOTENT", "RESULT_IN_MARK_BYTES", "SamService", "error_reply"]

# The operations that act: claimed before they do, their result kept for repeats. The
# others change nothing (configurations.dynamic.get), are versioned (.put: a repeat meets
# its own version, configuration_version_conflict) or sign only the caller's own CSR
# again (proofs_of_possession.create), so running a repeat again is their answer.
IDEMPOTENT = frozenset(
    {
        Operation.signatures_create,
        Operation.key_pairs_create,
        Operation.signers_key_pairs_assign,
        Operation.key_pairs_update,
        Operation.key_pairs_delete,
        Operation.key_pairs_rewrap,
        Operation.key_pairs_bind,
    }
)

# A result this small (a reply body of a few signatures, most key-pair changes) travels
# in its answered mark in sam.sad-use: one broker message fewer, and one confirmation
# fewer to wait for, per request. Every worker reads every mark, so larger results (100
# digests, a new RSA key pair) go to sam.results, which only repeats read.
RESULT_IN_MARK_BYTES = 4096

log = logging.getLogger(__name__)


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
    note: str | None = None  # the record's detail when the reply is no refusal

    def stored(self) -> dict[str, object]:
        """What a repeat's record needs to say of the request it answers again."""
        return {
            "signer": self.signer,
            "key_pair": self.key_pair,
            "sad_jti": self.sad_jti,
            "dtbs_sha256": self.dtbs_sha256,
        }

    def restore(self, stored: dict[str, object]) -> None:
        for name in ("signer", "key_pair", "sad_jti"):
            value = stored.get(name)
            if isinstance(value, str):
                setattr(self, name, value)
        digests = stored.get("dtbs_sha256")
        if isinstance(digests, list):
            self.dtbs_sha256 = [d for d in digests if isinstance(d, str)]

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


@dataclass
class _Claim:
    """An acting request's standing in ``sam.sad-use`` as this attempt knows it."""

    identity: RequestIdentity
    attempt: int | None = None  # the attempt this worker owns; None: not claimed yet


class _Repeat(Exception):  # control flow, not an error: the answer is known
    """Raised where a claim finds the request answered already: ``reply`` is that answer."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


@dataclass(frozen=True)
class _Caller:
    """A request whose envelope passed the gate and whose sender is established: its
    request JWS verified. ``claim``: for an acting operation (``IDEMPOTENT``)."""

    envelope: Envelope
    body: bytes
    user: str
    operation: Operation
    trace: _Trace
    claim: _Claim | None = None

    @property
    def sad(self) -> str | None:
        return self.envelope.sad

    @property
    def exact_request(self) -> str | None:
        """``RequestIdentity.exact`` of an acting request (what its key events name)."""
        return self.claim.identity.exact if self.claim is not None else None

    @property
    def sad_given(self) -> bool:
        return self.envelope.sad is not None


def _ok(status: int, model: BaseModel | None) -> Reply:
    body = b"" if model is None else model.model_dump_json(exclude_none=True).encode()
    return Reply(status, body)


def error_reply(error: SamError, request_id: str | None) -> Reply:
    """The reply of a refusal: its stable code, our message, the request id."""
    body = ErrorReply(error=ErrorBody(code=error.code.name, message=error.message, request_id=request_id))
    return Reply(error.status, body.model_dump_json().encode(), error.code.name)


def _addressed(reply: Reply, envelope: Envelope) -> Reply:
    """The reply, to the caller's own reply queue only (none if it named no such queue)."""
    return dataclasses.replace(reply, reply_to=envelope.reply_to, correlation_id=envelope.correlation_id)


def _dead_letter_refusal(reason: str) -> SamError:
    if reason == "expired":
        return SamError(ErrorCode.request_expired)
    return SamError(ErrorCode.request_undeliverable, f"dead-lettered ({reason})")


def _wrapped(key_pair: SealedKeyPair) -> WrappedKey:
    return WrappedKey(key_pair.key_spec, key_pair.wrapped_key_bytes, key_pair.kek, key_pair.wrap_mechanism)


class SamService:
    """The SAM's request pipeline over its ports; stateless apart from the replicated
    ledger state (``ConfigurationLog``, ``KeyEventLog``, ``SadUseLog``) it reads.

    ``process`` never raises: every outcome is a ``Reply`` with its audit record."""

    def __init__(
        self,
        static: StaticConfiguration,
        configuration: ConfigurationLog,
        key_events: KeyEventLog,
        sad_use: SadUseLog,
        ledgers: dict[str, Ledger],
        hsm: Hsm,
        sealer: KeyPairSealer,
        audit: AuditSink,
        results: ResultStore,
        marks: MarkReader,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        result_in_mark_bytes: int = RESULT_IN_MARK_BYTES,
    ) -> None:
        self._metrics = metrics
        self._static = static
        self._configuration = configuration
        self._key_events = key_events
        self._sad_use = sad_use
        self._config_ledger = ledgers["config"]
        self._key_ledger = ledgers["key_events"]
        self._sad_ledger = ledgers["sad_use"]
        self._hsm = hsm
        self._sealer = sealer
        self._audit = audit
        self._results = results
        self._marks = marks
        self._result_in_mark_bytes = result_in_mark_bytes
        self._clock = clock
        self._handlers: dict[Operation, Callable[[_Caller], Awaitable[Reply]]] = {
            Operation.configurations_dynamic_put: self._put_configuration,
            Operation.configurations_dynamic_get: self._get_configuration,
            Operation.key_pairs_create: self._create_key_pair,
            Operation.signers_key_pairs_assign: self._assign_key_pair,
            Operation.proofs_of_possession_create: self._prove_possession,
            Operation.key_pairs_update: self._update_key_pair,
            Operation.key_pairs_delete: self._delete_key_pair,
            Operation.key_pairs_rewrap: self._rewrap_key_pair,
            Operation.key_pairs_bind: self._bind_key_pair,
            Operation.signatures_create: self._create_signatures,
        }

    async def process(self, request: IncomingRequest) -> Reply:
        """The one reply to ``request``, sent only after its audit record is durable."""
        started = time.perf_counter()
        # key generation runs on the HSM lane's generation sessions, which bound how many
        # run at once; the event loop and the audit trail go on meanwhile
        reply = await self._audited(request)
        if self._metrics is not None:
            self._metrics.observe(
                request.operation if isinstance(request.operation, str) else None,
                reply.status,
                reply.error_code,
                time.perf_counter() - started,
            )
        return reply

    async def _audited(self, request: IncomingRequest) -> Reply:
        # The envelope gate comes first: from here on only checked values are read, so
        # nothing the sender chose reaches the audit record, a routing key or a log line.
        envelope = check_envelope(
            operation=request.operation,
            message_id=request.message_id,
            correlation_id=request.correlation_id,
            reply_to=request.reply_to,
            user_id=request.user_id,
            content_type=request.content_type,
            request_jws=request.request_jws,
            sad=request.sad,
            undecodable=request.undecodable,
            queue=request.queue,
            returned=request.returned,
            answer_by=request.answer_by,
        )
        admin = envelope.user_id is not None and self._configuration.admin_key(envelope.user_id) is not None
        trace = _Trace(
            operation=str(envelope.operation or "unknown"),
            log=AuditLog.admin if admin else AuditLog.service,
            actor=envelope.user_id,
            request_id=envelope.message_id,
        )
        detail: str | None = None
        try:
            if request.dead_letter is not None:  # never processed: answered as such, nothing runs
                reply = await self._answer_dead_letter(envelope, request.body, request.dead_letter, trace)
            else:
                self._check_still_awaited(envelope)
                reply = await self._answer(self._authenticate(envelope, request.body, trace))
            detail = trace.note
        except SamError as exc:
            reply, detail = error_reply(exc, envelope.message_id), exc.message
        except Exception:
            log.exception("unexpected fault on request %r", envelope.message_id)
            reply = error_reply(SamError(ErrorCode.internal_error), envelope.message_id)
        try:
            await self._audit.record(trace.event(reply, detail))
        except SamError as exc:
            # the trail logs the outage once, with counts; a line per reply would flood
            log.debug("reply to %r withheld: %s", envelope.message_id, exc.message)
            return _addressed(error_reply(exc, envelope.message_id), envelope)
        return _addressed(reply, envelope)

    def _authenticate(self, envelope: Envelope, body: bytes, trace: _Trace) -> _Caller:
        """Who is asking, proven by the request JWS over this very message, and whether
        they may call this operation at all."""
        limits = self._static.limits
        if envelope.refusal is not None:
            raise envelope.refusal
        user, operation, message_id = envelope.user_id, envelope.operation, envelope.message_id
        assert user is not None and operation is not None and message_id is not None  # the gate passed
        admin_key = self._configuration.admin_key(user)
        if len(body) > limits.max_body_bytes:
            raise SamError(ErrorCode.message_too_large, f"body over {limits.max_body_bytes} bytes")
        ssa = self._configuration.state.ssa(user)
        key = admin_key if admin_key is not None else (ssa.key if ssa is not None else None)
        if key is None:
            raise SamError(ErrorCode.unknown_user, f"{user!r} is not a registered SSA or administrator")
        binding = RequestBinding(body, message_id, operation, user)
        verify_request_jws(
            envelope.request_jws, key, binding, int(self._clock()), limits.request_max_age_seconds
        )
        if (OPERATION_QUEUE[operation] is QueueClass.admin) != (admin_key is not None):
            raise SamError(ErrorCode.operation_not_permitted, f"{user!r} may not call {operation}")
        claim = None
        if operation in IDEMPOTENT:
            claim = _Claim(RequestIdentity.of(user, message_id, operation, body, envelope.sad))
        return _Caller(envelope, body, user, operation, trace, claim)

    def _check_still_awaited(self, envelope: Envelope, dropping: bool = False) -> None:
        """Refuse (``request_expired``) once the caller has stopped waiting
        (``sam-answer-by``): a result released then would be a signature its caller
        holds as a failure or an unknown. ``dropping``: a result made is dropped so."""
        if envelope.answer_by_ms is not None and self._clock() * 1000 > envelope.answer_by_ms:
            what = "; the result made was dropped" if dropping else ""
            raise SamError(ErrorCode.request_expired, f"the caller stopped waiting (sam-answer-by){what}")

    # --- repeats ----------------------------------------------------------------------

    async def _answer(self, caller: _Caller) -> Reply:
        """The handler's reply; for an acting request, the stored result when it is a
        repeat of an answered one, and otherwise stored (and marked answered) before it
        is released."""
        handler = self._handlers[caller.operation]
        claim = caller.claim
        if claim is None:
            return await handler(caller)
        try:
            now = int(self._clock())
            known = self._sad_use.request(claim.identity, now)
            if known is not None:
                if known.fingerprint != claim.identity.fingerprint:
                    raise SamError(ErrorCode.request_id_reused)
                answer = self._sad_use.answer_of(claim.identity, now)
                if answer is not None:  # answered is final: no need to ask the log again
                    return await self._stored(claim.identity, answer, caller.trace)
                # A repeat of a request this worker knows is claimed: taken over now, before
                # anything is decided, so that whatever this attempt answers, a slow
                # earlier attempt can no longer answer otherwise.
                await self._claim(caller)
            reply = await handler(caller)
        except _Repeat as repeat:
            return repeat.reply
        if reply.status < 400 and claim.attempt is not None:
            await self._settle(caller, claim, reply)
        return reply

    async def _claim(self, caller: _Caller, sad: SadClaims | None = None) -> None:
        """Claim the request in sam.sad-use (spending the SAD's jti, if it has one) before
        it acts. A claim that finds the request answered raises ``_Repeat`` with the
        stored answer; one that finds it claimed by an attempt that never answered takes
        it over. Once claimed, this attempt claims again only to spend a jti."""
        claim = caller.claim
        assert claim is not None, "only acting operations claim"
        if sad is not None:
            caller.trace.sad_jti = sad.jti
            if self._sad_use.seen(sad.iss, sad.jti, claim.identity):
                raise SamError(ErrorCode.sad_replayed)
        spent = sad is None or self._sad_use.spent(sad.iss, sad.jti, claim.identity)
        if claim.attempt is not None and spent:
            return
        now = int(self._clock())
        exp = now + self._static.limits.request_max_age_seconds
        record = SadUseLog.claim(claim.identity, now, exp)
        if sad is not None:
            record = SadUseLog.claim(claim.identity, now, max(exp, sad.exp), sad.iss, sad.jti)
        verdict = await self._sad_ledger.append(record)
        if isinstance(verdict, SamError):
            raise verdict
        assert isinstance(verdict, Claimed)
        claim.attempt = verdict.attempt
        if verdict.answered_at is not None:
            raise _Repeat(await self._stored(claim.identity, verdict, caller.trace))
        if verdict.attempt:
            self._count_repeat(RepeatAnswer.takeover)

    async def _settle(self, caller: _Caller, claim: _Claim, reply: Reply) -> None:
        """Keep the result for repeats and mark this attempt answered; refused
        (``request_taken_over``) when a repeat took the request over meanwhile — the
        result is then dropped, and the repeat's answer is the one that counts."""
        assert claim.attempt is not None
        started = time.perf_counter()
        stored_at = int(self._clock())  # taken before either write: both land after it
        stored = StoredResult(reply.status, reply.body, caller.trace.stored())
        in_mark = None
        if len(reply.body) <= self._result_in_mark_bytes:
            in_mark = stored.as_record(claim.identity.exact, claim.attempt)
        else:
            await self._results.put(claim.identity.exact, claim.attempt, stored)
        # the last moment a result can still be kept from a caller that stopped waiting:
        # once marked answered, repeats get it
        self._check_still_awaited(caller.envelope, dropping=True)
        verdict = await self._sad_ledger.append(
            SadUseLog.answered(claim.identity, claim.attempt, stored_at, int(self._clock()), in_mark)
        )
        if self._metrics is not None:
            self._metrics.result_store_seconds.observe(time.perf_counter() - started)
        if isinstance(verdict, SamError):
            self._count_repeat(RepeatAnswer.taken_over)
            raise verdict
        # said in the record, and in its "reply withheld" form if the record cannot be
        # made durable: the caller may still get this result, through a repeat
        caller.trace.note = f"result kept for repeats (attempt {claim.attempt})"

    def _count_repeat(self, answer: RepeatAnswer) -> None:
        if self._metrics is not None:
            self._metrics.repeats.labels(answer).inc()

    async def _stored(self, identity: RequestIdentity, verdict: Claimed, trace: _Trace) -> Reply:
        assert verdict.answered_at is not None
        self._count_repeat(RepeatAnswer.stored_result)
        if verdict.mark is not None:
            result = await self._marks.read(verdict.mark, identity.exact, verdict.attempt)
        else:
            result = await self._results.get(identity.exact, verdict.attempt, verdict.answered_at)
        trace.restore(result.trace)
        trace.note = f"a repeat: answered with the result of attempt {verdict.attempt}"
        return Reply(result.status, result.body, repeat=True)

    async def _answer_dead_letter(self, envelope: Envelope, body: bytes, reason: str, trace: _Trace) -> Reply:
        """A request that died unprocessed is refused as such — unless an attempt of it
        answered with a result that its caller may never have got (the reply could not
        be confirmed, say): then that result, as to any repeat."""
        if envelope.refusal is not None:
            raise envelope.refusal
        user, operation, message_id = envelope.user_id, envelope.operation, envelope.message_id
        if user is not None and message_id is not None and operation in IDEMPOTENT:
            identity = RequestIdentity.of(user, message_id, str(operation), body, envelope.sad)
            answer = self._sad_use.answer_of(identity, int(self._clock()))
            if answer is not None:
                return await self._stored(identity, answer, trace)
        raise _dead_letter_refusal(reason)

    # --- acting on the ports ----------------------------------------------------------

    def _open(
        self, sealed: str, caller: _Caller, *, owned: bool = True, assigning: bool = False
    ) -> SealedKeyPair:
        """The key pair inside the seal, refused if not the caller's (checked first, so
        another SSA learns nothing of its state), deleted or an outdated copy — unless
        the change that made it outdated is this very request's (a repeat that took it
        over). ``owned=False``: an administrator's operation."""
        key_pair = self._sealer.open(sealed)
        caller.trace.key_pair = key_pair.id
        if owned:
            lifecycle.owned_by(key_pair, caller.user)
        refusal = self._key_events.refusal(
            key_pair.id, key_pair.revision, assigning=assigning, request=caller.exact_request
        )
        if refusal is not None:
            raise refusal
        return key_pair

    async def _authorize(self, caller: _Caller, expected: SadExpectation) -> SadClaims:
        """Verify a SAD (or SKAD) and claim the request with it, spending its jti
        cluster-wide."""
        claims = verify_sad(
            caller.sad,
            self._configuration.state,
            self._static.sam_id,
            self._static.sad_policy,
            expected,
            int(self._clock()),
        )
        await self._claim(caller, claims)
        return claims

    async def _record(self, event: KeyEvent, key_pair: SealedKeyPair, caller: _Caller) -> None:
        """Append the change to sam.key-events (the log's order decides races), then
        its mark to sam.sad-use, so every signature request spent after the reply waits
        until its worker has read the change (see ``SadUseLog``)."""
        record = KeyEventLog.event(
            event, key_pair.id, key_pair.revision, key_pair.signer, caller.exact_request
        )
        verdict = await self._key_ledger.append(record)
        if verdict is None:
            verdict = await self._sad_ledger.append(SadUseLog.key_events_mark(self._key_ledger.position))
        if isinstance(verdict, SamError):
            raise verdict

    async def _sign(
        self, key_pair: SealedKeyPair, scheme: SignatureScheme, digests: tuple[bytes, ...]
    ) -> list[bytes]:
        raw = await self._hsm.sign_with_wrapped_key(
            _wrapped(key_pair), scheme, [scheme.hsm_input(d) for d in digests]
        )
        if scheme.mechanism is HsmMechanism.ECDSA:
            return [ecdsa_signature_der(sig) for sig in raw]
        return raw

    async def _factor_verifier(self, key_pair: SealedKeyPair, factor: SamFactor | None) -> bytes | None:
        if factor is None:
            return None
        return await self._hsm.factor_mac(lifecycle.factor_input(key_pair.id, factor))

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)

    def _trust_anchors(self, user: str) -> tuple[x509.Certificate, ...]:
        ssa = self._configuration.state.ssa(user)
        return ssa.trust_anchors if ssa is not None else ()

    async def _sealed_reply(self, key_pair: SealedKeyPair, status: int = 200) -> Reply:
        return _ok(status, KeyPairReply(key_pair=key_pair.readable(await self._sealer.seal(key_pair))))

    # --- administration ---------------------------------------------------------------

    async def _put_configuration(self, caller: _Caller) -> Reply:
        config = parse_body(DynamicConfiguration, caller.body)
        current = self._configuration.state.version
        if config.version <= current:
            raise SamError(
                ErrorCode.configuration_version_conflict,
                f"version {config.version} is not above the current {current}",
            )
        envelope = caller.envelope
        assert envelope.message_id and envelope.request_jws  # checked by _authenticate
        record = ConfigurationLog.record(caller.user, envelope.message_id, caller.body, envelope.request_jws)
        verdict = await self._config_ledger.append(record)
        if isinstance(verdict, SamError):
            raise verdict
        return _ok(204, None)

    async def _get_configuration(self, caller: _Caller) -> Reply:
        config = self._configuration.state.config
        if config is None:
            raise SamError(ErrorCode.configuration_missing)
        return _ok(200, config)

    # --- key pairs --------------------------------------------------------------------

    async def _create_key_pair(self, caller: _Caller) -> Reply:
        template = parse_body(KeyPairCreateRequest, caller.body).key_template
        spec = key_spec_from_template(template.algorithm, template.size, template.named_curve)
        await self._claim(caller)
        generated = await self._hsm.generate_key_pair(spec)
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
            owner=caller.user,
        )
        caller.trace.key_pair = key_pair.id
        return await self._sealed_reply(key_pair, 201)

    async def _assign_key_pair(self, caller: _Caller) -> Reply:
        body = parse_body(AssignRequest, caller.body)
        caller.trace.signer = body.signer.id
        key_pair = self._open(body.key_pair.sealed, caller, assigning=True)
        ssa = self._configuration.state.ssa(caller.user)
        allowed = ssa.allowed_authorization_servers if ssa is not None else frozenset()
        assignment = lifecycle.plan_assignment(
            key_pair, body, caller.user, allowed, self._static.sad_policy, caller.sad_given
        )
        skad_issuer = None
        if assignment.skad is not None:
            skad_issuer = (await self._authorize(caller, assignment.skad)).iss
        else:
            await self._claim(caller)
        assigned = assignment.result(await self._factor_verifier(key_pair, assignment.factor), skad_issuer)
        await self._record(KeyEvent.assigned, assigned, caller)
        return await self._sealed_reply(assigned)

    async def _prove_possession(self, caller: _Caller) -> Reply:
        body = parse_body(ProofOfPossessionRequest, caller.body)
        key_pair = self._open(body.key_pair.sealed, caller)
        caller.trace.signer = key_pair.signer
        proof = lifecycle.plan_proof_of_possession(key_pair, body, caller.user)
        caller.trace.dtbs_sha256 = [proof.info_sha256]
        [signature] = await self._sign(key_pair, proof.scheme, (proof.digest,))
        reply = ProofOfPossessionReply(
            signature=base64.b64encode(signature).decode(), signature_algorithm=proof.scheme.oid
        )
        return _ok(200, reply)

    async def _update_key_pair(self, caller: _Caller) -> Reply:
        body = parse_body(KeyPairUpdateRequest, caller.body)
        caller.trace.signer = body.signer.id
        key_pair = self._open(body.key_pair.sealed, caller)
        updated = lifecycle.updated(
            key_pair, body, caller.user, self._trust_anchors(caller.user), self._now()
        )
        await self._claim(caller)
        await self._record(KeyEvent.updated, updated, caller)
        return await self._sealed_reply(updated)

    async def _delete_key_pair(self, caller: _Caller) -> Reply:
        body = parse_body(KeyPairDeleteRequest, caller.body)
        key_pair = self._open(body.key_pair.sealed, caller)
        caller.trace.signer = key_pair.signer
        deletion = lifecycle.plan_deletion(key_pair, body, caller.user, caller.sad_given)
        if deletion.sad is not None:
            await self._authorize(caller, deletion.sad)
        else:
            await self._claim(caller)
        await self._record(KeyEvent.deleted, deletion.result, caller)
        return _ok(200, KeyPairDeleteReply(key_pair_id=key_pair.id, deleted=True))

    async def _rewrap_key_pair(self, caller: _Caller) -> Reply:
        body = parse_body(KeyPairRewrapRequest, caller.body)
        key_pair = self._open(body.key_pair.sealed, caller)
        caller.trace.signer = key_pair.signer
        if not lifecycle.rewrap_needed(key_pair, self._hsm.current_kek_label, caller.user):
            return _ok(200, KeyPairReply(key_pair=key_pair.readable(body.key_pair.sealed)))
        await self._claim(caller)
        rewrapped = await self._hsm.rewrap(_wrapped(key_pair))
        updated = lifecycle.rewrapped(
            key_pair, rewrapped.wrapped, rewrapped.kek_label, rewrapped.wrap_mechanism
        )
        await self._record(KeyEvent.rewrapped, updated, caller)
        return await self._sealed_reply(updated)

    async def _bind_key_pair(self, caller: _Caller) -> Reply:
        body = parse_body(KeyPairBindRequest, caller.body)
        key_pair = self._open(body.key_pair.sealed, caller, owned=False)
        caller.trace.signer = key_pair.signer
        bound = lifecycle.plan_binding(
            key_pair, body, self._configuration.state.allowed_authorization_servers()
        )
        await self._claim(caller)
        await self._record(KeyEvent.bound, bound, caller)
        return await self._sealed_reply(bound)

    # --- signatures -------------------------------------------------------------------

    async def _create_signatures(self, caller: _Caller) -> Reply:
        body = parse_body(SignaturesCreateRequest, caller.body)
        caller.trace.signer = body.signer.id
        lifecycle.check_digest_count(body, self._static.limits.max_digests_per_request)
        key_pair = self._open(body.key_pair.sealed, caller)
        signing = lifecycle.plan_signing(key_pair, body, caller.user, self._now())
        caller.trace.dtbs_sha256 = signing.dtbs_sha256
        await self._authorize(caller, signing.sad)
        # Read back, the jti record follows the mark of every key pair change confirmed
        # before this request arrived: once key-events are read that far, a deletion or
        # a newer revision is seen before anything is signed.
        await self._key_ledger.read_to(self._sad_use.key_events_required)
        refusal = self._key_events.refusal(key_pair.id, key_pair.revision)
        if refusal is not None:
            raise refusal
        factor = lifecycle.check_factor(key_pair, body.sam_factor)
        if factor is not None:
            lifecycle.verify_factor_mac(key_pair, await self._hsm.factor_mac(factor))
        signatures = [
            Signature(signature=base64.b64encode(sig).decode(), signature_algorithm=signing.scheme.oid)
            for sig in await self._sign(key_pair, signing.scheme, signing.digests)
        ]
        return _ok(200, SignaturesReply(signatures=signatures))
