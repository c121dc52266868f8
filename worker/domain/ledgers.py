"""The state every replica rebuilds from the shared logs, as pure reducers.

A stateless SAM still has facts that must hold across replicas: the current dynamic
configuration, which key pairs are assigned, which SAD ``jti`` were used. Each fact
lives in a RabbitMQ stream; every worker replays it and applies records in log order
with the reducers below. A record's verdict (``None`` = accepted, else the refusal)
depends only on the records before it, so every replica reaches the same verdict and
the appender can learn its own outcome by reading its record back.
"""

from __future__ import annotations

import base64
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

__all__ = ["ConfigurationLog", "KeyEvent", "KeyEventLog", "KeyPairHistory", "Reducer", "SadUseLog"]


class Reducer(Protocol):
    """The rule of one ledger: applies a record and returns its verdict (``None``: accepted,
    else the refusal), which depends only on the records applied before it."""

    def apply(self, data: Mapping[str, Any]) -> SamError | None: ...


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

    def apply(self, data: Mapping[str, Any]) -> SamError | None:
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


@dataclass
class KeyEventLog:
    """Every change of a key pair's state, by revision; the first record for a revision
    wins, so two workers racing to change one key pair agree on one winner."""

    history: dict[str, KeyPairHistory] = field(default_factory=dict)

    @staticmethod
    def event(event: KeyEvent, key_pair_id: str, revision: int, signer: str | None) -> dict[str, Any]:
        return {"event": str(event), "key_pair": key_pair_id, "revision": revision, "signer": signer}

    def apply(self, data: Mapping[str, Any]) -> SamError | None:
        try:
            event, key_pair = KeyEvent(str(data.get("event"))), str(data["key_pair"])
            revision, signer = int(data["revision"]), data.get("signer")
        except (KeyError, TypeError, ValueError):
            return SamError(ErrorCode.internal_error, "unreadable key event")
        refusal = self.refusal(key_pair, revision - 1, assigning=event is KeyEvent.assigned)
        if refusal is not None:
            return refusal
        known = self.history.get(key_pair)
        self.history[key_pair] = KeyPairHistory(
            revision,
            str(signer) if signer is not None else (known.signer if known else None),
            event is KeyEvent.deleted,
        )
        return None

    def refusal(self, key_pair: str, revision: int, *, assigning: bool = False) -> SamError | None:
        """Why a copy of ``key_pair`` at ``revision`` may not be used, if it may not."""
        known = self.history.get(key_pair)
        if known is None:
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
    """``jti`` already used, remembered until their SAD expires (plus the skew), and how
    far ``sam.key-events`` must have been read before a signature.

    A key pair change is confirmed to its caller only after a mark with its key-events
    offset is in ``sam.sad-use`` too. A signature request spends its ``jti`` in this
    stream, after any such mark, so reading it back tells the worker which key-events
    offset to wait for: a change confirmed before the request arrived is always
    honoured, and signing writes nothing to ``sam.key-events`` (which is never
    truncated: it would otherwise grow with every signature)."""

    clock_skew: int
    used: dict[str, int] = field(default_factory=dict)  # "iss jti" -> exp
    key_events_required: int = -1

    @staticmethod
    def use(issuer: str, jti: str, exp: int) -> dict[str, Any]:
        return {"iss": issuer, "jti": jti, "exp": exp}

    @staticmethod
    def key_events_mark(position: int) -> dict[str, Any]:
        return {"key_events": position}

    def seen(self, issuer: str, jti: str) -> bool:
        """Whether this replica has already applied a use of ``jti`` from ``issuer``."""
        return f"{issuer} {jti}" in self.used

    def __len__(self) -> int:
        """How many uses are remembered (the window the SAD lifetime bounds)."""
        return len(self.used)

    def apply(self, data: Mapping[str, Any]) -> SamError | None:
        if "key_events" in data:
            position = data["key_events"]
            if not isinstance(position, int):
                return SamError(ErrorCode.internal_error, "unreadable key-events mark")
            self.key_events_required = max(self.key_events_required, position)
            return None
        key = f"{data.get('iss')} {data.get('jti')}"
        if key in self.used:
            return SamError(ErrorCode.sad_replayed)
        self.used[key] = int(data.get("exp", 0))
        return None

    def forget_expired(self, now: int) -> None:
        """Drop what can no longer be replayed: its SAD would be refused as expired."""
        horizon = now - self.clock_skew
        self.used = {key: exp for key, exp in self.used.items() if exp > horizon}
