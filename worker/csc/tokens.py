"""The bearer service token of a CSC client — pure.

A CSC client authenticates its user with an OAuth 2 access token of scope ``service``
(CSC v2 §8), issued by an authorization server registered with the gateway. The gateway
accepts it only as a JWT signed by that server's registered key (algorithms by key type,
never ``none`` or HMAC, never a key from the token), for this gateway (``aud``), within
its lifetime and a bounded age, with ``service`` among its scopes. Its subject is the
user whose credentials the call may see. The credential-scoped token (the SAD) is not
checked here: it goes to the SAM unchanged, and the SAM checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from joserfc import jws

from worker.csc.protocol import CscError
from worker.domain.authorization import JOSE_FAILURES
from worker.domain.keys import RegisteredKey
from worker.domain.wire import json_object
from worker.errors import ErrorCode, SamError

__all__ = ["ServiceTokenVerifier", "ServiceUser"]

MAX_TOKEN = 8192


@dataclass(frozen=True)
class ServiceUser:
    """Who the service token speaks for: the user ``subject`` at ``issuer``."""

    issuer: str
    subject: str


def _unauthorized(description: str) -> CscError:
    return CscError(401, "invalid_token", description)


class ServiceTokenVerifier:
    """Checks ``Authorization: Bearer`` service tokens against the registered
    authorization servers (issuer id → key)."""

    def __init__(
        self,
        issuers: Mapping[str, RegisteredKey],
        audience: str,
        clock_skew: int = 60,
        max_lifetime: int = 3600,
    ) -> None:
        self._issuers = dict(issuers)
        self._audience = audience
        self._skew = clock_skew
        self._max_lifetime = max_lifetime

    def user(self, authorization: str | None, now: int) -> ServiceUser:
        """The user of a request's ``Authorization`` header, or ``invalid_token`` (401)."""
        if not authorization:
            raise _unauthorized("no bearer token")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("the Authorization header is not a bearer token")
        if len(token) > MAX_TOKEN or not token.isascii():
            raise _unauthorized("the bearer token is not a compact JWT")
        claims = self._claims(token)
        issuer, subject = claims.get("iss"), claims.get("sub")
        if not isinstance(subject, str) or not subject or len(subject) > 256:
            raise _unauthorized("the token has no subject")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if self._audience not in audiences:
            raise _unauthorized("the token is for another service")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in (exp, iat)):
            raise _unauthorized("the token has no integer exp and iat")
        assert isinstance(exp, int) and isinstance(iat, int)
        if exp <= now - self._skew:
            raise _unauthorized("the token expired")
        if iat > now + self._skew or exp - iat > self._max_lifetime:
            raise _unauthorized("the token is from the future or lives too long")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int) or isinstance(nbf, bool) or nbf > now + self._skew):
            raise _unauthorized("the token is not valid yet")
        scope = claims.get("scope")
        if not isinstance(scope, str) or "service" not in scope.split():
            raise CscError(403, "insufficient_scope", "the token's scope has no service")
        assert isinstance(issuer, str)
        return ServiceUser(issuer, subject)

    def _claims(self, token: str) -> dict[str, object]:
        try:
            unverified = jws.extract_compact(token.encode())
            payload = json_object(unverified.payload, ErrorCode.sad_invalid, "token")
        except (SamError, *JOSE_FAILURES):  # type: ignore[misc]
            raise _unauthorized("the bearer token is not a compact JWT") from None
        issuer = payload.get("iss")
        key = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if key is None:
            raise _unauthorized("the token's issuer is not registered with this gateway")
        try:
            verified = jws.deserialize_compact(token, key.jwk, algorithms=list(key.algorithms))
        except JOSE_FAILURES:
            raise _unauthorized("the token's signature does not verify") from None
        if "crit" in verified.headers():
            raise _unauthorized("the token has a critical header")
        try:
            return json_object(verified.payload, ErrorCode.sad_invalid, "token")
        except SamError:
            raise _unauthorized("the token's payload is not a JSON object") from None
