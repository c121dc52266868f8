"""The state every replica rebuilds from the shared logs, as pure reducers.

A stateless SAM still has facts that must hold across replicas: the current dynamic
configuration, which key pairs are assigned, which SAD ``jti`` were used. Each fact
lives in a RabbitMQ stream; every worker replays it and applies records in log order
with the reducers below. A record's verdict (``None`` = accepted, else the refusal)
depends only on the records before it, so every replica reaches the same verdict and
the appender can learn its own outcome by reading its record back.

``sam.sad-use`` also holds the claims that make requests idempotent (``SadUseLog``): a
repeat of a request (same caller, ``message_id``, operation, body and SAD) is told from
a replay by the log, and the one attempt that may answer with a result is decided there.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic import ValidationError

from worker.domain.authorization import RequestBinding, verify_request_jws
from worker.domain.configuration import DynamicState, StaticConfiguration, parse_dynamic
from worker.domain.contract import DynamicConfiguration, Operation
from worker.domain.keys import RegisteredKey, load_public_key
from worker.errors import ErrorCode, SamError

__all__ = [
    "Claimed",
    "ConfigurationLog",
    "KeyEvent",
    "KeyEventLog",
    "KeyPairHistory",
    "Reducer",
    "RequestClaim",
    "RequestIdentity",
    "SadUseLog",
    "Verdict",
]


@dataclass(frozen=True)
class Claimed:
    """The verdict on a request claim: the attempt that now owns the request (0: the first;
    more: a repeat took it over from an attempt that never answered with a result), or,
    with ``answered_at``, the attempt whose result was stored then — the repeat gets it,
    from the ``answered`` mark itself at log position ``mark`` when it carried the result,
    else from the result store."""

    attempt: int
    answered_at: int | None = None
    mark: int | None = None


# What a record gets in log order: accepted (None), refused (the SamError) or, for a
# request claim, who owns the request (Claimed).
Verdict = SamError | Claimed | None


class Reducer(Protocol):
    """The rule of one ledger: applies a record and returns its verdict, which depends
    only on the records applied before it. ``position``: where the record is in the log
    (the stream offset of its message; -1 when unknown), for reducers that remember where
    to read a record back."""

    def apply(self, data: Mapping[str, Any], position: int = -1) -> Verdict: ...


def _digest(*parts: bytes) -> str:
    # 128 bits: collisions are out of reach and every replica keeps one per request
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:32]


def _spent_key(issuer: object, jti: object) -> str:
    """How ``SadUseLog`` names a ``jti`` (per issuer)."""
    return f"{issuer} {jti}"


@dataclass(frozen=True)
class RequestIdentity:
    """Who asked what, as the log remembers it: ``key`` names the request (caller and
    ``message_id``), ``fingerprint`` what was asked (operation, body, SAD). Two requests
    with one key and different fingerprints are a reused ``message_id``, not a repeat."""

    key: str
    fingerprint: str

    @functools.cached_property
    def exact(self) -> str:
        """Names this very request — caller, ``message_id`` and what was asked — where a
        record must not be mistaken for that of another request with the same
        ``message_id`` (its key events, its stored result), even after its claim is
        forgotten."""
        return _digest(self.key.encode(), self.fingerprint.encode())

    @classmethod
    def of(cls, user: str, message_id: str, operation: str, body: bytes, sad: str | None) -> RequestIdentity:
        body_digest = hashlib.sha256(body).digest()
        sad_digest = hashlib.sha256((sad or "").encode()).digest()
        return cls(
            _digest(user.encode(), message_id.encode()),
            _digest(operation.encode(), body_digest, sad_digest),
        )


@dataclass
class RequestClaim:
    """One request as ``sam.sad-use`` says it: what was asked, until when a repeat of it
    is recognised, which attempt owns it and whether that attempt's result is stored."""

    fingerprint: str
    exp: int
    attempt: int = 0
    answered_at: int | None = None
    mark: int | None = None  # the log position of the answered mark that carries the result


class ConfigurationLog:
    """Applies dynamic-configuration records; each carries the administrator's own
    signed request, re-verified here, so the stream cannot be fed a configuration no
    administrator signed."""

    def __init__(self, static: StaticConfiguration) -> None:
        self._admins: dict[str, RegisteredKey] = {
            admin.id: load_public_key(admin.public_key) for admin in static.administrators
        }
        self.state = DynamicState()

    def admin_key(self, user_id: str) -> RegisteredKey | None:
        return self._admins.get(user_id)

    @staticmethod
    def record(user_id: str, message_id: str, body: bytes, request_jws: str) -> dict[str, Any]:
        return {
            "user_id": user_id,
            "message_id": message_id,
            "body": base64.b64encode(body).decode(),
            "request_jws": request_jws,
        }

    def apply(self, data: Mapping[str, Any], position: int = -1) -> SamError | None:
        try:
            user_id, body = str(data["user_id"]), base64.b64decode(data["body"])
            key = self._admins.get(user_id)
            if key is None:
                return SamError(ErrorCode.unknown_user, "configuration record from no administrator")
            binding = RequestBinding(
                body, str(data["message_id"]), Operation.configurations_dynamic_put, user_id
            )
            verify_request_jws(str(data["request_jws"]), key, binding, now=None, max_age=0)
            config = DynamicConfiguration.model_validate_json(body)
            candidate = parse_dynamic(config)
        except SamError as exc:
            return exc
        except (KeyError, TypeError, ValueError, ValidationError):
            return SamError(ErrorCode.configuration_invalid, "configuration record is malformed")
        if config.version <= self.state.version:
            return SamError(
                ErrorCode.configuration_version_conflict,
                f"version {config.version} is not above the current {self.state.version}",
            )
        self.state = candidate
        return None


class KeyEvent(StrEnum):
    """The kinds of key pair change recorded in ``sam.key-events``."""

    assigned = "assigned"
    updated = "updated"
    rewrapped = "rewrapped"
    bound = "bound"
    deleted = "deleted"


@dataclass(frozen=True)
class KeyPairHistory:
    """What ``sam.key-events`` says of one key pair: its latest revision, its signer and
    whether it was deleted."""

    revision: int
    signer: str | None
    deleted: bool
    request: str | None = None  # the request that made this revision (``RequestIdentity.exact``)


@dataclass
class KeyEventLog:
    """Every change of a key pair's state, by revision; the first record for a revision
    wins, so two workers racing to change one key pair agree on one winner. A record
    names the request that made it, so a repeat that took that request over finds the
    change already made — by itself — instead of a conflict."""

    history: dict[str, KeyPairHistory] = field(default_factory=dict)

    @staticmethod
    def event(
        event: KeyEvent, key_pair_id: str, revision: int, signer: str | None, request: str | None = None
    ) -> dict[str, Any]:
        record = {"event": str(event), "key_pair": key_pair_id, "revision": revision, "signer": signer}
        if request is not None:
            record["request"] = request
        return record

    def apply(self, data: Mapping[str, Any], position: int = -1) -> SamError | None:
        try:
            event, key_pair = KeyEvent(str(data.get("event"))), str(data["key_pair"])
            revision, signer = int(data["revision"]), data.get("signer")
            request = data.get("request")
            request = str(request) if request is not None else None
        except (KeyError, TypeError, ValueError):
            return SamError(ErrorCode.internal_error, "unreadable key event")
        known = self.history.get(key_pair)
        if (
            request is not None
            and known is not None
            and (known.request, known.revision) == (request, revision)
        ):
            return None  # this request made the change before: a repeat of it, nothing new
        refusal = self.refusal(key_pair, revision - 1, assigning=event is KeyEvent.assigned)
        if refusal is not None:
            return refusal
        self.history[key_pair] = KeyPairHistory(
            revision,
            str(signer) if signer is not None else (known.signer if known else None),
            event is KeyEvent.deleted,
            request,
        )
        return None

    def refusal(
        self, key_pair: str, revision: int, *, assigning: bool = False, request: str | None = None
    ) -> SamError | None:
        """Why a copy of ``key_pair`` at ``revision`` may not be used, if it may not.
        ``request``: the request asking (``RequestIdentity.exact``: the same caller,
        ``message_id``, operation, body and SAD); the latest change, if that very request
        made it from this very revision, does not count against it."""
        known = self.history.get(key_pair)
        if known is None:
            return None
        if request is not None and known.request == request and revision == known.revision - 1:
            return None
        if known.deleted:
            return SamError(ErrorCode.key_pair_deleted)
        if assigning and known.signer is not None:
            return SamError(ErrorCode.key_pair_already_assigned)
        if revision < known.revision:
            return SamError(
                ErrorCode.key_pair_outdated, f"revision {revision} is older than the latest, {known.revision}"
            )
        return None


@dataclass
class SadUseLog:
    """``jti`` already used and requests already claimed, remembered until a repeat of them
    could no longer be accepted (plus the skew), and how far ``sam.key-events`` must have
    been read before a signature.

    **Single use of a SAD.** A ``jti`` is spent by the claim of the request that carries
    it; the same ``jti`` in a claim of any other request is ``sad_replayed``.

    **Idempotent requests.** A request that acts (signs, generates, changes a key pair) is
    claimed here before it does; the claim names the request (``RequestIdentity``). A
    claim for a request already claimed is a repeat: if the owning attempt's result was
    stored (its ``answered`` mark is in the log) the repeat is answered with it;
    otherwise the repeat takes the request over — the next attempt owns it, and the
    ``answered`` mark of an earlier one is refused (``request_taken_over``), so of all the
    copies of a request exactly one answers with a result, whichever worker hung or died.

    **Forgetting follows the log.** Claims and marks carry their appender's time (``t``),
    and what is past its window is forgotten when a record of a later time is applied —
    not by each worker's own clock — so every replica, including one started later (it
    replays from a horizon that covers every window), holds the same claims and gives
    every record the same verdict. A repeat claim does not extend its request's window.

    **Key-event marks.** A key pair change is confirmed to its caller only after a mark
    with its key-events offset is in ``sam.sad-use`` too. A signature request spends its
    ``jti`` in this stream, after any such mark, so reading it back tells the worker which
    key-events offset to wait for: a change confirmed before the request arrived is always
    honoured, and signing writes nothing to ``sam.key-events`` (which is never truncated:
    it would otherwise grow with every signature)."""

    clock_skew: int
    used: dict[str, int] = field(default_factory=dict)  # "iss jti" -> exp
    spent_by: dict[str, str] = field(default_factory=dict)  # "iss jti" -> request key
    requests: dict[str, RequestClaim] = field(default_factory=dict)  # request key -> claim
    key_events_required: int = -1
    # (exp, "jti" | "request", key), to forget in order of expiry as the log's time passes
    _expiring: list[tuple[int, str, str]] = field(default_factory=list)

    @staticmethod
    def use(issuer: str, jti: str, exp: int) -> dict[str, Any]:
        """A ``jti`` spent by no request in particular (records before claims existed)."""
        return {"iss": issuer, "jti": jti, "exp": exp}

    @staticmethod
    def claim(
        request: RequestIdentity, now: int, exp: int, issuer: str | None = None, jti: str | None = None
    ) -> dict[str, Any]:
        """``now``: the appender's time; ``exp``: until when a repeat is recognised."""
        record: dict[str, Any] = {"claim": request.key, "fp": request.fingerprint, "t": now, "exp": exp}
        if jti is not None:
            record |= {"iss": issuer, "jti": jti}
        return record

    @staticmethod
    def answered(
        request: RequestIdentity, attempt: int, at: int, now: int, result: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The mark that ``attempt``'s result is stored (``at``: when, to find it) — in the
        mark itself, as ``result``, when given. A replica keeps only where the mark is in the
        log: the result is read back from there when a repeat wants it."""
        record = {"answered": request.key, "attempt": attempt, "at": at, "t": now}
        if result is not None:
            record["result"] = result
        return record

    @staticmethod
    def result_in(record: object, request: str, attempt: int) -> Mapping[str, Any] | None:
        """The result of ``attempt`` of ``request`` (``RequestIdentity.exact``) that the
        answered mark ``record`` carries, if it is that mark (as ``StoredResult.as_record``
        wrote it)."""
        result = record.get("result") if isinstance(record, dict) and "answered" in record else None
        if isinstance(result, dict) and (result.get("request"), result.get("attempt")) == (request, attempt):
            return result
        return None

    @staticmethod
    def key_events_mark(position: int) -> dict[str, Any]:
        return {"key_events": position}

    def seen(self, issuer: str, jti: str, request: RequestIdentity) -> bool:
        """Whether this replica has already applied a use of ``jti`` from ``issuer`` by
        another request than ``request``."""
        return _spent_key(issuer, jti) in self.used and not self.spent(issuer, jti, request)

    def spent(self, issuer: str, jti: str, request: RequestIdentity) -> bool:
        """Whether ``request``'s own claim spent ``jti`` from ``issuer``."""
        return self.spent_by.get(_spent_key(issuer, jti)) == request.key

    def answer_of(self, request: RequestIdentity, now: int) -> Claimed | None:
        """Where the answer to ``request`` is, if an attempt of this very request answered
        and its window is not past at ``now``."""
        known = self.request(request, now)
        if known is None or known.answered_at is None or known.fingerprint != request.fingerprint:
            return None
        return Claimed(known.attempt, known.answered_at, known.mark)

    def request(self, request: RequestIdentity, now: int) -> RequestClaim | None:
        """What this replica has applied of ``request``'s claims, if its window is not past
        at ``now`` (the log may not have forgotten it yet)."""
        known = self.requests.get(request.key)
        return known if known is not None and known.exp > now - self.clock_skew else None

    def __len__(self) -> int:
        """How many uses and claims are remembered (the window the lifetimes bound)."""
        return len(self.used) + len(self.requests)

    def apply(self, data: Mapping[str, Any], position: int = -1) -> Verdict:
        if "key_events" in data:
            position = data["key_events"]
            if not isinstance(position, int):
                return SamError(ErrorCode.internal_error, "unreadable key-events mark")
            self.key_events_required = max(self.key_events_required, position)
            return None
        try:
            if isinstance(data.get("t"), int):
                self.forget_expired(int(data["t"]))
            if "claim" in data:
                return self._claim(data)
            if "answered" in data:
                return self._answered(
                    str(data["answered"]),
                    int(data["attempt"]),
                    int(data["at"]),
                    position if "result" in data else None,
                )
            exp = int(data.get("exp", 0))
        except (KeyError, TypeError, ValueError):
            return SamError(ErrorCode.internal_error, "unreadable SAD-use record")
        key = _spent_key(data.get("iss"), data.get("jti"))
        if key in self.used:
            return SamError(ErrorCode.sad_replayed)
        self._use(key, exp)
        return None

    def _use(self, key: str, exp: int) -> None:
        self.used[key] = max(exp, self.used.get(key, exp))
        heapq.heappush(self._expiring, (self.used[key], "jti", key))

    def forget_expired(self, now: int) -> None:
        """Forget what no record of time ``now`` or later can refer to any more — what a
        record of that time does when it is applied."""
        horizon = now - self.clock_skew
        while self._expiring and self._expiring[0][0] <= horizon:
            exp, kind, key = heapq.heappop(self._expiring)
            if kind == "jti" and self.used.get(key) == exp:
                del self.used[key]
                self.spent_by.pop(key, None)
            elif kind == "request" and key in self.requests and self.requests[key].exp == exp:
                del self.requests[key]

    def _claim(self, data: Mapping[str, Any]) -> Verdict:
        request, fingerprint, exp = str(data["claim"]), str(data["fp"]), int(data["exp"])
        spent = _spent_key(data.get("iss"), data.get("jti")) if data.get("jti") is not None else None
        if spent is not None and spent in self.used and self.spent_by.get(spent) != request:
            return SamError(ErrorCode.sad_replayed)
        known = self.requests.get(request)
        if known is not None and known.fingerprint != fingerprint:
            return SamError(ErrorCode.request_id_reused)
        if spent is not None:
            self._use(spent, exp)
            self.spent_by[spent] = request
        if known is None:
            self.requests[request] = RequestClaim(fingerprint, exp)
            heapq.heappush(self._expiring, (exp, "request", request))
            return Claimed(0)
        # a repeat does not extend the window: it is its first claim's, which every
        # replica, one started later too, has read
        if known.answered_at is not None:
            return Claimed(known.attempt, known.answered_at, known.mark)
        known.attempt += 1
        return Claimed(known.attempt)

    def _answered(self, request: str, attempt: int, at: int, mark: int | None) -> SamError | None:
        known = self.requests.get(request)
        if known is None or known.attempt != attempt or known.answered_at is not None:
            return SamError(ErrorCode.request_taken_over)
        known.answered_at, known.mark = at, mark
        return None
