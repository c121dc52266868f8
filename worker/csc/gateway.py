"""The gateway's HTTP adapter (aiohttp): CSC v2 endpoints under ``/csc/v2`` (and
``/csc/v1``, the path pyHanko's ``CSCSigner`` uses by default), JSON in and out.

Each call: a bounded body (``max_body_bytes``) that must be a JSON object; the bearer
service token checked (``tokens``) before anything is looked up; the credential looked
up *by its user*, so another user's ``credentialID`` is "not found" exactly as one that
does not exist; the signing call to the SAM bounded by the SDK's timeout. Every
failure is a CSC error document (``protocol.CscError``) — no stack trace, no library
message — and every call is logged with its outcome and, where the SAM answered, the
SAM's request id.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web

from worker.client import SamClientError, SamRequestError, SamTimeout
from worker.csc.protocol import (
    CSC_SPECS,
    CredentialDescription,
    CredentialInfoRequest,
    CredentialsListRequest,
    CscError,
    SignHashRequest,
    credential_info,
    error_for_sam_code,
    invalid,
    parse,
    sign_hash_message_id,
)
from worker.csc.store import Credential, CredentialState, CredentialStore, CredentialStoreError
from worker.csc.tokens import ServiceTokenVerifier, ServiceUser
from worker.domain.algorithms import SIGNATURE_ALGORITHMS
from worker.domain.contract import KeyPairObject

__all__ = ["GatewayOptions", "SigningService", "make_app"]

log = logging.getLogger(__name__)


class SigningService(Protocol):
    """What the gateway needs of the SAM: ``worker.client.SamClient.sign``."""

    async def sign(
        self,
        key_pair: KeyPairObject,
        signer: str,
        signature_algorithm: str,
        digests: Sequence[bytes],
        sad: str,
        *,
        parameters: bytes | None = None,
        pin: str | None = None,
        message_id: str | None = None,
    ) -> list[bytes]: ...


class GatewayOptions:
    """What ``info`` says of the service, and the bounds of a call."""

    def __init__(
        self,
        name: str,
        multisign: int,
        max_body_bytes: int = 1_048_576,
        body_timeout: float = 10.0,
        region: str = "EU",
        description: str = "Remote signing through a Signature Activation Module (SCAL2)",
        oauth2: str | None = None,
    ) -> None:
        self.name, self.multisign, self.max_body_bytes = name, multisign, max_body_bytes
        self.body_timeout = body_timeout
        self.region, self.description, self.oauth2 = region, description, oauth2


_METHODS = ["info", "credentials/list", "credentials/info", "signatures/signHash"]

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[dict[str, Any]]]


def make_app(
    options: GatewayOptions,
    tokens: ServiceTokenVerifier,
    store: CredentialStore,
    sam: SigningService,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The gateway as an aiohttp application."""

    def user_of(request: web.Request) -> ServiceUser:
        return tokens.user(request.headers.get("Authorization"), int(clock()))

    async def info(request: web.Request, document: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "specs": CSC_SPECS,
            "name": options.name,
            "logo": "",
            "region": options.region,
            "lang": "en",
            "description": options.description,
            "authType": ["oauth2code"],
            "methods": _METHODS,
            "signAlgorithms": {"algos": list(SIGNATURE_ALGORITHMS)},
        }
        if options.oauth2:
            answer["oauth2"] = options.oauth2
        return answer

    async def credentials_list(request: web.Request, document: dict[str, Any]) -> dict[str, Any]:
        user = user_of(request)
        asked = parse(CredentialsListRequest, document)
        if asked.userID is not None and asked.userID != user.subject:
            # CSC: a user-specific token must not list another user's credentials
            raise invalid("Invalid parameter userID")
        credentials = await _stored(store.of_user(user.issuer, user.subject))
        shown = [c for c in credentials if c.state is not CredentialState.awaiting_certificate]
        if asked.onlyValid:
            shown = [c for c in shown if c.state is CredentialState.enabled]
        if asked.maxResults is not None:
            shown = shown[: asked.maxResults]
        answer: dict[str, Any] = {"credentialIDs": [c.credential_id for c in shown]}
        if asked.credentialInfo:
            answer["credentialInfos"] = [
                {
                    "credentialID": c.credential_id,
                    **credential_info(_described(c, options), asked.certificates, asked.certInfo),
                }
                for c in shown
            ]
        return answer

    async def credentials_info(request: web.Request, document: dict[str, Any]) -> dict[str, Any]:
        user = user_of(request)
        asked = parse(CredentialInfoRequest, document)
        credential = await _credential_of(store, user, asked.credentialID)
        return credential_info(_described(credential, options), asked.certificates, asked.certInfo)

    async def sign_hash(request: web.Request, document: dict[str, Any]) -> dict[str, Any]:
        user = user_of(request)
        asked = SignHashRequest.of(document)
        if len(asked.hashes) > options.multisign:
            raise invalid(f"Invalid parameter hashes: at most {options.multisign} (multisign)")
        credential = await _credential_of(store, user, asked.credential_id)
        if credential.state is not CredentialState.enabled:
            raise invalid("The credential is disabled")
        key_pair = KeyPairObject.model_validate_json(credential.key_pair)
        message_id = sign_hash_message_id(user.issuer, user.subject, asked)
        try:
            signatures = await sam.sign(
                key_pair,
                credential.signer,
                asked.sign_algorithm,
                asked.hashes,
                asked.sad,
                parameters=asked.sign_algorithm_parameters,
                message_id=message_id,
            )
        except SamRequestError as exc:
            raise error_for_sam_code(str(exc.code), exc.status, exc.request_id) from None
        except SamTimeout as exc:
            raise CscError(
                503, "temporarily_unavailable", "the signing service did not answer in time", exc.request_id
            ) from None
        except SamClientError as exc:
            log.warning("signHash for %s: the SAM client failed (%s)", message_id, type(exc).__name__)
            raise CscError(503, "temporarily_unavailable", "the signing service is unreachable") from None
        log.info(
            "signHash: %d signature(s) for %s (SAM request %s)",
            len(signatures),
            credential.credential_id,
            message_id,
        )
        return {"signatures": [base64.b64encode(s).decode() for s in signatures]}

    app = web.Application(client_max_size=options.max_body_bytes, middlewares=[_errors])

    async def name_the_server(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = "sam-csc"  # not the framework and its version

    app.on_response_prepare.append(name_the_server)
    for version in ("v1", "v2"):
        for name, handler in (
            ("info", info),
            ("credentials/list", credentials_list),
            ("credentials/info", credentials_info),
            ("signatures/signHash", sign_hash),
        ):
            app.router.add_post(f"/csc/{version}/{name}", _json_endpoint(handler, options.body_timeout))
    return app


def _described(credential: Credential, options: GatewayOptions) -> CredentialDescription:
    return CredentialDescription(
        credential.credential_id,
        credential.algorithm,
        credential.size,
        credential.named_curve,
        credential.state is CredentialState.enabled,
        credential.chain,
        options.multisign,
        credential.description,
    )


async def _stored(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except CredentialStoreError as exc:
        log.error("credential store: %s", exc)
        raise CscError(503, "temporarily_unavailable", "the credential store is unavailable") from None


async def _credential_of(store: CredentialStore, user: ServiceUser, credential_id: str) -> Credential:
    credential = await _stored(store.get(user.issuer, user.subject, credential_id))
    if credential is None or credential.state is CredentialState.awaiting_certificate:
        raise invalid("Invalid parameter credentialID")  # the same whether absent or another user's
    assert isinstance(credential, Credential)
    return credential


def _json_endpoint(handler: Handler, body_timeout: float) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def endpoint(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            raise invalid("the request body must be application/json")
        try:
            # a client that trickles its body must not hold a connection for ever
            async with asyncio.timeout(body_timeout):
                body = await request.read()
        except TimeoutError:
            raise CscError(408, "invalid_request", "the request body did not arrive in time") from None
        except web.HTTPException:
            raise  # 413: answered by the middleware
        except Exception as exc:  # a Content-Encoding that does not decode, a broken chunk
            raise invalid(f"the request body could not be read ({type(exc).__name__})") from None
        try:
            document = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError:
            raise invalid("the request body is not JSON") from None
        if not isinstance(document, dict):
            raise invalid("the request body must be a JSON object")
        answer = await handler(request, document)
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    return endpoint


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
        log.info("%s %s: %d", request.method, request.path, response.status)
        return response
    except CscError as exc:
        log.info("%s %s: %d %s (%s)", request.method, request.path, exc.status, exc.error, exc.description)
        headers = {"WWW-Authenticate": f'Bearer error="{exc.error}"'} if exc.status == 401 else None
        return web.Response(
            status=exc.status, body=orjson.dumps(exc.body()), content_type="application/json", headers=headers
        )
    except web.HTTPRequestEntityTooLarge:
        error = CscError(413, "invalid_request", "the request body is too large")
        return web.Response(status=413, body=orjson.dumps(error.body()), content_type="application/json")
    except web.HTTPException as exc:  # 404, 405: the path or method is not offered
        error = CscError(exc.status, "invalid_request", exc.reason)
        return web.Response(
            status=exc.status, body=orjson.dumps(error.body()), content_type="application/json"
        )
    except Exception:
        log.exception("%s %s: unexpected fault", request.method, request.path)
        error = CscError(500, "server_error", "an unexpected fault; the incident is in the gateway log")
        return web.Response(status=500, body=orjson.dumps(error.body()), content_type="application/json")
