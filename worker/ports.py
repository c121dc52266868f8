"""The interfaces between the service and the adapters at its edge.

The service (``worker.service``) depends on these and on nothing of aio-pika, pkcs11 or
the file system; the adapters (``worker.transport``, ``worker.hsm``,
``worker.audit_trail``) implement them, and ``worker.fakes`` holds one in-memory
implementation of each for unit tests. ``tests/contract`` runs one suite per port over
the fake and the real adapter, so a fake cannot drift from what it stands in for.

Each port states its error contract: only ``SamError`` escapes an implementation, with
the codes named on the method.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from worker.domain.algorithms import KeySpec, SignatureScheme
from worker.domain.audit import AuditEvent
from worker.domain.ledgers import Verdict

__all__ = [
    "AuditSink",
    "GeneratedKeyPair",
    "Hsm",
    "IncomingRequest",
    "Ledger",
    "MarkReader",
    "Reply",
    "ResultStore",
    "StoredResult",
    "WrappedKey",
]


# --- requests and replies ---------------------------------------------------------------


@dataclass(frozen=True)
class IncomingRequest:
    """A request as delivered, converted at the transport edge with every value as the
    codec decoded it — of any type, any length, any charset. Nothing in it is trusted:
    the service's envelope gate (``worker.domain.envelope``) checks each field before
    anything else reads it. ``undecodable`` names the properties and headers, read by
    the SAM or not, that were not valid UTF-8 on the wire; ``returned`` says it is a reply
    of the SAM or a dead-lettered message that came back into a request queue (through
    a reply queue's dead-letter exchange, say), which is no request. ``dead_letter`` says
    why a request never got processed (``expired``, ``delivery_limit``, …): it is read
    from ``sam.dead`` only to be answered and audited as such."""

    operation: object
    message_id: object
    correlation_id: object
    reply_to: object
    user_id: object
    body: bytes
    request_jws: object
    sad: object
    content_type: object = None
    undecodable: tuple[str, ...] = ()
    queue: str | None = None  # the queue class it was consumed from (None: not from a queue)
    returned: bool = False  # it carries a SAM reply's status or a dead-letter history
    dead_letter: str | None = None  # why it died in a request queue, when read from sam.dead
    answer_by: object = None  # the sam-answer-by header, as decoded


@dataclass(frozen=True)
class Reply:
    """The one answer to a request: an HTTP-like status, the JSON body, and the error
    code when it is a refusal (for the audit record and the metrics). It is published
    to ``reply_to`` with ``correlation_id`` — both from the checked envelope — and to
    nowhere when ``reply_to`` is ``None``."""

    status: int
    body: bytes
    error_code: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    repeat: bool = False  # the stored result of an earlier attempt of the same request


# --- shared logs ------------------------------------------------------------------------


class Ledger(Protocol):
    """A shared log (a RabbitMQ stream in production) as one replica sees it. Its
    records are applied by a pure reducer (``worker.domain.ledgers``) in log order.

    Errors: ``SamError(ledger_unavailable)`` when the log does not answer in time."""

    @property
    def position(self) -> int:
        """The offset this replica has applied up to (-1: nothing yet)."""
        ...

    async def append(self, data: dict[str, Any]) -> Verdict:
        """Append a record and return its verdict as the reducer gave it in log order
        (``None``: accepted) — the same verdict on every replica."""
        ...

    async def read_to(self, position: int) -> None:
        """Return once this replica has applied the log up to ``position``; writes
        nothing."""
        ...


@dataclass(frozen=True)
class StoredResult:
    """A result as stored for repeats of its request: the reply's status and body, and
    what its audit record said of the request (so a repeat's record says it too)."""

    status: int
    body: bytes
    trace: dict[str, Any]

    def as_record(self, request: str, attempt: int) -> dict[str, Any]:
        """The result as JSON, named by ``request`` (``RequestIdentity.exact``) and
        ``attempt``."""
        return {
            "request": request,
            "attempt": attempt,
            "status": self.status,
            "body": base64.b64encode(self.body).decode(),
            "trace": self.trace,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StoredResult:
        """The result ``as_record`` wrote; ``KeyError``, ``TypeError`` or ``ValueError``
        when it is not one."""
        trace = record["trace"]
        if not isinstance(trace, dict):
            raise TypeError("trace")
        return cls(int(record["status"]), base64.b64decode(record["body"], validate=True), trace)


class MarkReader(Protocol):
    """Reads a result that travelled in its ``answered`` mark back from the log, at the
    mark's position (``Claimed.mark``): one message read per repeat, whatever else is in
    the log, so no caller's repeats can hold up another's.

    Errors: ``SamError(ledger_unavailable)`` when the log does not answer in time or holds
    no such result there."""

    async def read(self, position: int, request: str, attempt: int) -> StoredResult:
        """The result of ``attempt`` of ``request`` (``RequestIdentity.exact``)."""
        ...


class ResultStore(Protocol):
    """Where results too large to travel in their ``answered`` mark wait for repeats of
    their request (``sam.results`` in production): written once per such request, read
    only when a repeat comes — so no worker holds or reads the results of others on the
    way of an ordinary request.

    Errors: ``SamError(ledger_unavailable)`` when the store does not answer in time."""

    async def put(self, request: str, attempt: int, result: StoredResult) -> None:
        """Return once the result of ``attempt`` of ``request`` (``RequestIdentity.exact``)
        is durable."""
        ...

    async def get(self, request: str, attempt: int, stored_at: int) -> StoredResult:
        """The result of ``attempt`` of ``request``, stored at ``stored_at`` (epoch seconds)."""
        ...


# --- audit ------------------------------------------------------------------------------


class AuditSink(Protocol):
    """Where the audit record of every request goes before its reply may leave."""

    async def record(self, event: AuditEvent) -> dict[str, Any]:
        """Return the chained entry once it is durable.

        Errors: ``SamError(audit_unavailable)`` when it could not be made durable
        within the sink's bound; the caller must then withhold the result."""
        ...


# --- the HSM ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedKeyPair:
    """A key pair just generated: its public key and its private key wrapped under the
    KEK named here. Nothing of it stays in the HSM."""

    public_key_der: bytes  # SubjectPublicKeyInfo
    wrapped_private_key: bytes
    kek_label: str
    wrap_mechanism: str


@dataclass(frozen=True)
class WrappedKey:
    """A private key as the SAM holds it between requests: wrapped under a KEK."""

    spec: KeySpec
    wrapped: bytes
    kek_label: str
    wrap_mechanism: str


class Hsm(Protocol):
    """What the service needs of the cryptographic module.

    Calls are coroutines: the PKCS#11 adapter (``worker.hsm.lane``) runs them on threads
    of its own, so the event loop never waits on the HSM.

    Errors: ``SamError`` only — ``hsm_unavailable`` when the module fails, is away or
    lacks the KEK a key pair names, ``key_pair_invalid`` only when the HSM rejects the
    wrapped key itself (or its wrap mechanism is unknown), ``sam_factor_unavailable``
    when it has no factor key."""

    @property
    def current_kek_label(self) -> str:
        """The KEK new and re-wrapped key pairs are wrapped under."""
        ...

    async def generate_key_pair(self, spec: KeySpec) -> GeneratedKeyPair:
        """Generate in the HSM, wrap the private key under the current KEK, keep nothing."""
        ...

    async def sign_with_wrapped_key(
        self, key: WrappedKey, scheme: SignatureScheme, inputs: Sequence[bytes]
    ) -> list[bytes]:
        """Unwrap into a session object, sign each input as ``scheme.hsm_input`` made
        it, destroy the object. ECDSA signatures come back raw (r‖s)."""
        ...

    async def rewrap(self, key: WrappedKey) -> WrappedKey:
        """Unwrap under the key's KEK and wrap again under the current one, inside the HSM."""
        ...

    async def factor_mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 with the HSM factor key (verifiers of SAM-managed factors)."""
        ...

    async def sign_with_state_key(self, data: bytes) -> bytes:
        """ES256 (raw r‖s) over SHA-256(data) with the key-pair sealing key."""
        ...

    async def sign_audit_digest(self, digest: bytes) -> bytes:
        """ECDSA P-256 (raw r‖s) over a SHA-256 digest with the audit key."""
        ...
