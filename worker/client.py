"""The SSA SDK: an async client that signs each request, publishes it and awaits the
correlated reply.

It connects with a TLS client certificate (EXTERNAL), keeps one reply queue named under
its own user (``<user>.replies.<uuid>``, the only queues its broker permissions let it
read), signs every request with its registered JWS key and raises ``SamRequestError``
carrying the SAM's stable error code.

The operation methods take and return the contract's models (``worker.domain.contract``):
key pairs are ``KeyPairObject`` in and out, the dynamic configuration a
``DynamicConfiguration``. A reply that is not the operation's reply model raises
``SamReplyError``; ``call`` is the untyped escape hatch (any body in, the decoded reply
out).

Given several node URLs (a cluster), it connects to the first that answers and, when
that node goes away, to the next: its reply queue is then a quorum queue, replicated on
every node, so replies published while it moves are waiting for it on the new node.
With one URL the reply queue is a classic durable queue (cheaper; it survives a broker
restart) and the client reconnects to that URL.

Lost answers are asked for again: a request whose reply does not come within the
timeout, or that was answered "unavailable" (503), is published again unchanged — the
same ``message_id``, body, JWS and SAD — up to ``retries`` times. The SAM recognises such
a repeat and answers it with the original result, so retrying never signs twice and
never spends the SAD on a refusal. Of the replies to one request, a success is kept over
any refusal, and ``request_taken_over`` (an earlier copy whose result was dropped
because a repeat took over) is never the answer.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey
from pydantic import BaseModel, ConfigDict, ValidationError

from worker.domain.authorization import RequestBinding, request_jws_payload
from worker.domain.certification import assemble_certification_request, build_certification_request_info
from worker.domain.contract import (
    HEADER_ANSWER_BY,
    HEADER_REPEAT,
    HEADER_REQUEST_JWS,
    HEADER_SAD,
    HEADER_STATUS,
    OPERATION_QUEUE,
    DynamicConfiguration,
    ErrorReply,
    KeyPairDeleteReply,
    KeyPairObject,
    KeyPairReply,
    Operation,
    ProofOfPossessionReply,
    SignaturesReply,
)
from worker.errors import ErrorCode
from worker.settings import TlsFiles, split_urls
from worker.transport.amqp import tls_context
from worker.transport.topology import REQUESTS_EXCHANGE, reply_queue_prefix

__all__ = [
    "TRANSIENT_CODES",
    "ClientProfile",
    "RawReply",
    "SamAccessRefused",
    "SamClient",
    "SamClientError",
    "SamConfigurationError",
    "SamReplyError",
    "SamRequestError",
    "SamTimeout",
    "SamUnreachable",
    "broker_reply_text",
    "check_identity",
    "describe_connection_failure",
]

# Refusals that say "not now": nothing was released, and the very same request, sent again
# a little later, may succeed (a repeat of it gets whatever an earlier copy achieved).
TRANSIENT_CODES = frozenset({"audit_unavailable", "hsm_unavailable", "ledger_unavailable", "request_expired"})
# seconds to wait for a better answer after a transient one, before sending again
_RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0)
# the SAM releases no result later than this before the client gives up: the reply must
# still reach it, and the clocks of client and SAM may differ a little
_ANSWER_MARGIN_SECONDS = 1.0

_M = TypeVar("_M", bound=BaseModel)


class SamClientError(Exception):
    """Base of every error the SDK raises."""


class SamTimeout(SamClientError):
    """No reply within the time allowed, after every retry: the outcome is unknown (the
    request may have been processed). Send the same request again — the same
    ``message_id`` and SAD, while the SAD is valid — to learn it: a repeat is answered
    with the original result."""

    def __init__(self, request_id: str, seconds: float) -> None:
        super().__init__(f"no reply to {request_id} within {seconds} s")
        self.request_id = request_id


class SamRequestError(SamClientError):
    """The SAM refused the request. ``code`` is its stable error code: an ``ErrorCode``
    when this SDK knows it — which equals its name as a string too, so
    ``exc.code == "unknown_user"`` and ``exc.code == ErrorCode.unknown_user`` both hold —
    and the plain ``str`` of the wire for a code it does not know (from a newer SAM)."""

    def __init__(self, status: int, code: ErrorCode | str, message: str, request_id: str | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code: ErrorCode | str = _known_code(code)
        self.message = message
        self.request_id = request_id


class SamReplyError(SamClientError):
    """The SAM answered with a body that is not what the operation replies (a SAM of
    another contract version, or a broken one); ``problems`` says where, briefly."""

    def __init__(self, operation: str, expected: str, problems: Sequence[str]) -> None:
        listed = "; ".join(problems[:3]) + ("; …" if len(problems) > 3 else "")
        super().__init__(f"the reply to {operation} is not a valid {expected}: {listed}")
        self.operation = operation
        self.problems = list(problems)


class SamUnreachable(SamClientError, ConnectionError):
    """No broker node answered, or TLS or the login failed (``connect``; a
    ``ConnectionError`` too)."""


class SamAccessRefused(SamClientError):
    """The broker refused this user something: what its permissions do not allow
    (``ACCESS_REFUSED``: a queue not under its own name, publishing where it may not), or a
    message it will not take (``PRECONDITION_FAILED``: a ``user_id`` that is not the
    login's, a size over the broker's limit). Sending it again would meet the same answer."""


class SamConfigurationError(SamClientError, ValueError):
    """The client cannot be set up: an unreadable or invalid profile, or a JWS key the SAM
    would not accept. (A ``ValueError`` too, as ``ClientProfile.client`` raised before.)"""


def broker_reply_text(exc: BaseException) -> str:
    """The broker's reply text (``ACCESS_REFUSED - …``) without aiormq's preamble."""
    text = str(exc)
    return text[text.index('"') + 1 : text.rindex('"')] if text.count('"') >= 2 else text


def certificate_user(cert_file: Path) -> str | None:
    """The CN of the client certificate in ``cert_file`` (PEM): the broker's name for the
    user (EXTERNAL login); None when it has none. ``SamConfigurationError`` if unreadable."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except OSError as exc:
        raise SamConfigurationError(
            f"cannot read the client certificate {cert_file}: {exc.strerror or exc}"
        ) from None
    except ValueError:
        raise SamConfigurationError(f"{cert_file} is not a PEM certificate") from None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def check_identity(tls: TlsFiles, user_id: str) -> None:
    """Refuse, before connecting, a user id that is not the client certificate's CN: the
    broker logs the connection in as the CN and allows it only queues and ``user_id``s of
    that name, so the mismatch would surface as a refused queue far from its cause."""
    common_name = certificate_user(tls.cert_file)
    if common_name != user_id:
        raise SamConfigurationError(
            f"the client certificate {tls.cert_file} is for CN={common_name}, but the user id is "
            f"{user_id!r}: the broker knows a client by its certificate's CN, so the two must be the same"
        )


def describe_connection_failure(exc: BaseException, url: str, tls: TlsFiles) -> str:
    """What went wrong reaching ``url``, in words an operator can act on (aiormq wraps
    the socket and TLS errors into one exception type whose text carries the cause)."""
    # host:port only: a user or password in the URL is never printed
    where = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    text = str(exc)
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} within the connect timeout"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip(" :')\"")
        return f"the broker's certificate at {where} does not verify against ca_file {tls.ca_file}: {reason}"
    if "alert" in text.lower() and "SSL" in text:
        return (
            f"the broker at {where} ended the TLS handshake: it does not accept the client certificate "
            f"{tls.cert_file} (another CA, expired, or not for client authentication)"
        )
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        return (
            f"the broker at {where} refused the login: it takes only EXTERNAL (the URL needs ?auth=external "
            "and no user or password), and the certificate's CN must be one of its users"
        )
    if "Connect call failed" in text or isinstance(exc, ConnectionRefusedError):
        return f"nothing accepts connections at {where}"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return f"cannot resolve the broker's host in {where}"
    return f"{where}: {type(exc).__name__}: {text}"


def _known_code(code: ErrorCode | str) -> ErrorCode | str:
    if isinstance(code, ErrorCode):
        return code
    try:
        return ErrorCode[code]
    except KeyError:  # a code of a newer SAM
        return code


@dataclass(frozen=True)
class RawReply:
    """A reply as it arrived: status, body and correlation id (``json()`` decodes it);
    ``repeat``: the SAM answered a repeat with the result of an earlier attempt."""

    status: int
    body: bytes
    correlation_id: str | None
    repeat: bool = False

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None

    @property
    def code(self) -> str | None:
        """The refusal's stable error code (None for a success or an unreadable body)."""
        if self.status < 400:
            return None
        try:
            code = self.json()["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        return code if isinstance(code, str) else None


# --- the JWS key -------------------------------------------------------------------------

_EC_JWS_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_ACCEPTED_KEYS = (
    "an unencrypted private key, PEM or DER: RSA of 2048 bits or more (PKCS#1 or PKCS#8) "
    "or EC on P-256, P-384 or P-521 (SEC1 or PKCS#8)"
)


def _jws_key(data: bytes) -> tuple[ECKey | RSAKey, str]:
    """The request-signing key and its JWS algorithm, decided by the key as the SAM
    decides it (``worker.domain.keys``): ES256/ES384/ES512 for its curve, PS256 for RSA."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise SamConfigurationError(f"the JWS key is encrypted; the SDK needs {_ACCEPTED_KEYS}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SamConfigurationError(
            f"the JWS key cannot be read ({type(exc).__name__}); the SDK needs {_ACCEPTED_KEYS}"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = _EC_JWS_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise SamConfigurationError(
                f"the JWS key is on curve {key.curve.name}; the SDK needs {_ACCEPTED_KEYS}"
            )
        return ECKey.import_key(key), alg
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise SamConfigurationError(
                f"the JWS key is RSA of {key.key_size} bits; the SDK needs {_ACCEPTED_KEYS}"
            )
        return RSAKey.import_key(key), "PS256"
    kind = type(key).__name__.removesuffix("PrivateKey") or type(key).__name__
    raise SamConfigurationError(f"the JWS key is of type {kind}; the SDK needs {_ACCEPTED_KEYS}")


# --- replies -----------------------------------------------------------------------------


def _problems(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)]


def _parse(model: type[_M], reply: RawReply, operation: str) -> _M:
    try:
        return model.model_validate_json(reply.body)
    except ValidationError as exc:
        raise SamReplyError(operation, model.__name__, _problems(exc)) from None


def _refusal(reply: RawReply) -> SamRequestError:
    try:
        error = ErrorReply.model_validate_json(reply.body).error
    except ValidationError:
        # not the contract's error body: still a refusal, with whatever code it names
        return SamRequestError(reply.status, reply.code or "unknown", "(unreadable error body)", None)
    return SamRequestError(reply.status, error.code, error.message, error.request_id)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, operation: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SamReplyError(operation, "reply", [f"{what}: not base64"]) from None


def _wire(model: BaseModel) -> dict[str, Any]:
    """A model as the SAM reads it: JSON types, absent rather than null."""
    return model.model_dump(mode="json", exclude_none=True)


# --- profiles ----------------------------------------------------------------------------


class ClientProfile(BaseModel):
    """Who a ``sam`` user is: broker URL, TLS files, user id and the JWS key requests are
    signed with; a profile without one (a SIEM's) cannot send requests
    (``SamConfigurationError``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    user_id: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    jws_key_file: Path | None = None  # SIEM profiles sign nothing

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Self:
        """The profile in the JSON file ``path``; ``SamConfigurationError`` if it cannot be
        read or is no profile."""
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise SamConfigurationError(f"cannot read the profile {path}: {exc.strerror or exc}") from None
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            listed = "; ".join(_problems(exc)[:3])
            raise SamConfigurationError(f"{path} is not a client profile: {listed}") from None

    def tls_files(self) -> TlsFiles:
        return TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)

    def client(self, *, timeout: float = 15.0, retries: int = 2) -> SamClient:
        """An unconnected ``SamClient`` for this profile."""
        return SamClient._for_profile(self, timeout=timeout, retries=retries)


# --- the client --------------------------------------------------------------------------


class SamClient:
    """The SSA SDK: one TLS connection (EXTERNAL auth) to the broker, one reply queue of
    the user's own, every request signed with the user's registered JWS key; each
    operation of the contract as a method. Refusals raise ``SamRequestError``; each
    method asks again up to ``retries`` times for an answer that was lost or
    unavailable (see the module's docstring).

    ``jws_key``: the private key requests are signed with, PEM or DER, unencrypted: RSA
    (PKCS#1 or PKCS#8; signs PS256) or EC P-256/P-384/P-521 (SEC1 or PKCS#8; ES256/384/512);
    anything else raises ``SamConfigurationError``."""

    def __init__(
        self,
        url: str,
        tls: TlsFiles,
        user_id: str,
        jws_key: bytes,
        timeout: float = 15.0,
        retries: int = 2,
    ) -> None:
        self.url = url
        self.urls = split_urls(url)
        self.tls = tls
        self.user_id = user_id
        self._key, self._alg = _jws_key(jws_key)
        self.timeout = timeout
        self.retries = retries
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._requests: AbstractExchange | None = None  # sam.requests on the current channel
        self._reply_queue: AbstractQueue | None = None
        self._reply_queue_name = f"{reply_queue_prefix(user_id)}{uuid.uuid4()}"
        self._consumer_tag = ""
        self._node = 0  # index in ``urls`` of the node tried first
        self._connected = asyncio.Event()
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing_lost: asyncio.Task[None] | None = None  # kept: a task needs a reference
        self._closing = False
        self._pending: dict[str, asyncio.Queue[RawReply]] = {}
        # replies nobody waited for any more (a second answer, or one after its timeout),
        # by correlation id; answered requests are not kept, so a long-lived client does
        # not grow with its traffic
        self.unmatched_replies: Counter[str] = Counter()
        self.retried = 0
        self.reconnects = 0

    @classmethod
    def from_profile(cls, path: str | os.PathLike[str], *, timeout: float = 15.0, retries: int = 2) -> Self:
        """An unconnected client for the JSON client profile at ``path`` (url, user_id,
        ca_file, cert_file, key_file, jws_key_file). ``SamConfigurationError`` if the file
        cannot be read, is no profile, names no JWS key (a SIEM's) or a key not accepted."""
        return cls._for_profile(ClientProfile.read(path), timeout=timeout, retries=retries)

    @classmethod
    def _for_profile(cls, profile: ClientProfile, *, timeout: float, retries: int) -> Self:
        if profile.jws_key_file is None:
            raise SamConfigurationError(
                f"the profile of {profile.user_id} has no jws_key_file: it cannot send requests"
            )
        try:
            key = profile.jws_key_file.read_bytes()
        except OSError as exc:
            raise SamConfigurationError(
                f"cannot read the JWS key {profile.jws_key_file}: {exc.strerror or exc}"
            ) from None
        return cls(profile.url, profile.tls_files(), profile.user_id, key, timeout=timeout, retries=retries)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._closing = False
        # once, here: the files do not change between reconnections, and a failure in
        # the reconnecting task would have nobody to tell
        check_identity(self.tls, self.user_id)
        await self._open(attempts=1)

    async def _open(self, attempts: int) -> None:
        """Connect to the first node that answers, trying them in turn from the current
        one for ``attempts`` rounds (0: until closed)."""
        try:
            context = tls_context(self.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise SamConfigurationError(f"the TLS files cannot be used: {exc}") from None
        failures: dict[str, str] = {}  # url → the last failure there
        rounds = 0
        while not self._closing:
            for _ in self.urls:
                url = self.urls[self._node]
                try:
                    await asyncio.wait_for(self._open_on(url, context), 10)
                    return
                except aiormq.exceptions.ChannelAccessRefused as exc:
                    # the user's permissions are the same on every node: no use trying on
                    raise SamAccessRefused(
                        f"the broker refused {self.user_id} access ({broker_reply_text(exc)}): a client "
                        f"may use only reply queues named {reply_queue_prefix(self.user_id)}*"
                    ) from None
                except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                    failures[url] = describe_connection_failure(exc, url, self.tls)
                    self._node = (self._node + 1) % len(self.urls)
            rounds += 1
            if attempts and rounds >= attempts:
                break
            await asyncio.sleep(min(0.5 * rounds, 2))
        raise SamUnreachable("no broker node reachable: " + "; ".join(failures.values()))

    async def _open_on(self, url: str, context: Any) -> None:
        connection = await aio_pika.connect(url, ssl_context=context)
        try:
            channel = await connection.channel(publisher_confirms=True)
            # Durable, so replies published while the broker restarts or this client
            # reconnects are still there; it expires ten minutes after the client is gone.
            arguments: dict[str, Any] = {"x-expires": 600_000}
            if len(self.urls) > 1:
                arguments["x-queue-type"] = "quorum"
            queue = await channel.declare_queue(self._reply_queue_name, durable=True, arguments=arguments)
            self._consumer_tag = await queue.consume(self._on_reply, no_ack=True)
            # the broker cancels the consumer when the reply queue goes (deleted, say):
            # replies would then be dropped unseen, so open everything anew
            (await channel.get_underlay_channel()).on_consumer_cancel_callbacks.add(self._on_reply_queue_lost)
            requests = await channel.get_exchange(REQUESTS_EXCHANGE, ensure=False)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection, self._channel, self._reply_queue = connection, channel, queue
        self._requests = requests
        connection.close_callbacks.add(self._on_connection_lost)
        self._connected.set()

    def _on_reply_queue_lost(self, *_: object) -> None:
        connection = self._connection
        if connection is not None and not self._closing and not connection.is_closed:
            # closing it is what starts a reconnection, which declares the queue again
            self._closing_lost = asyncio.get_running_loop().create_task(connection.close())

    def _on_connection_lost(self, *_: object) -> None:
        self._connected.clear()
        if self._closing or (self._reconnecting is not None and not self._reconnecting.done()):
            return
        self._node = (self._node + 1) % len(self.urls)
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        with contextlib.suppress(ConnectionError, SamAccessRefused):  # requests then time out
            await self._open(attempts=0)
            self.reconnects += 1

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnecting
        if self._connection is not None:
            if self._reply_queue is not None and not self._connection.is_closed:
                with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                    # our own consumer first, so the broker has none to cancel
                    await self._reply_queue.cancel(self._consumer_tag)
                    await self._reply_queue.delete(if_unused=False, if_empty=False)
            with contextlib.suppress(aio_pika.exceptions.AMQPError, RuntimeError, ConnectionError):
                await self._connection.close()
            self._connection = None
        self._connected.clear()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        replies = self._pending.get(message.correlation_id or "")
        if replies is None:
            self.unmatched_replies[message.correlation_id or ""] += 1
            return
        headers = message.headers or {}
        status = headers.get(HEADER_STATUS)
        replies.put_nowait(
            RawReply(
                int(status) if isinstance(status, int) else 0,
                message.body,
                message.correlation_id,
                headers.get(HEADER_REPEAT) is True,
            )
        )

    def _sign_request(self, body: bytes, message_id: str, operation: str, user_id: str | None = None) -> str:
        binding = RequestBinding(body, message_id, operation, user_id or self.user_id)
        payload = request_jws_payload(binding, int(time.time()))
        # joserfc signs only its "recommended" algorithms unless told: PS256, ES384 and ES512 are not
        return jws.serialize_compact(
            {"alg": self._alg, "kid": self.user_id}, payload, self._key, algorithms=[self._alg]
        )

    @staticmethod
    def _routing_key(operation: str) -> str:
        try:
            return OPERATION_QUEUE[Operation(operation)].value
        except ValueError:
            return "signatures"

    @staticmethod
    def _answer_by(seconds: float, retries: int) -> int:
        """The ``sam-answer-by`` of a request: when this client gives up on every copy (the
        SAM releases nothing after it)."""
        return int((time.time() + seconds * (retries + 1) - _ANSWER_MARGIN_SECONDS) * 1000)

    def _message(
        self,
        operation: str,
        body: bytes,
        message_id: str,
        headers: dict[str, Any],
        *,
        reply_to: str | None,
        user_id: str | None,
    ) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=str(uuid.uuid4()),
            reply_to=reply_to,
            user_id=user_id,
            type=operation,
            timestamp=time.time(),
            headers=headers,
        )

    async def _request(
        self, operation: str, body: bytes, *, sad: str | None, message_id: str | None
    ) -> RawReply:
        """Publish a well-formed request, signed, and return the answer that counts, asking
        again up to ``retries`` times (see ``_exchange``); a refusal raises
        ``SamRequestError``."""
        if self._channel is None:
            raise SamClientError("not connected: use `async with client` or `await client.connect()`")
        message_id = message_id or str(uuid.uuid4())
        headers: dict[str, Any] = {
            HEADER_ANSWER_BY: self._answer_by(self.timeout, self.retries),
            HEADER_REQUEST_JWS: self._sign_request(body, message_id, operation),
        }
        if sad is not None:
            headers[HEADER_SAD] = sad
        message = self._message(
            operation, body, message_id, headers, reply_to=self._reply_queue_name, user_id=self.user_id
        )
        reply = await self._exchange(message, self._routing_key(operation), self.timeout, True, self.retries)
        assert reply is not None  # waited for
        if reply.status >= 400:
            raise _refusal(reply)
        return reply

    async def _exchange(
        self, message: aio_pika.Message, routing_key: str, seconds: float, wait: bool, retries: int
    ) -> RawReply | None:
        """Publish ``message`` and return the answer that counts among the replies with
        its correlation id, publishing the same message again while ``retries`` last."""
        assert message.correlation_id is not None and message.message_id is not None
        correlation_id = message.correlation_id
        replies: asyncio.Queue[RawReply] = asyncio.Queue()
        self._pending[correlation_id] = replies
        # with retries, a broker that is away (restarting) is waited for, up to the
        # time all attempts would take
        deadline = time.monotonic() + seconds * (retries + 1)
        try:
            held: RawReply | None = None  # a transient refusal: the answer if nothing better comes
            for attempt in range(retries + 1):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if attempt:
                    self.retried += 1
                if wait:
                    # a copy still queued when this client gives up expires there (and is
                    # answered request_expired from sam.dead) instead of being signed
                    message.expiration = left
                await self._publish(message, routing_key, deadline, seconds, retrying=retries > 0)
                if not wait:
                    return None
                last = attempt == retries
                # The last copy is waited for up to the deadline, whatever came before: until
                # then (sam-answer-by) the SAM may still release a result of any copy.
                wait_for = deadline - time.monotonic() if last else min(seconds, deadline - time.monotonic())
                pause = _RETRY_PAUSES[min(attempt, len(_RETRY_PAUSES) - 1)]
                # a transient refusal of the only copy is the answer: no other copy can
                # still release anything; with earlier copies out, one of them might
                reply, transient = await self._answer(replies, wait_for, pause, last, alone=attempt == 0)
                if reply is not None:
                    return reply
                held = transient or held
            if held is not None:
                return held
            raise SamTimeout(message.message_id, seconds * (retries + 1))
        finally:
            self._pending.pop(correlation_id, None)

    @staticmethod
    async def _answer(
        replies: asyncio.Queue[RawReply], seconds: float, pause: float, last: bool, alone: bool
    ) -> tuple[RawReply | None, RawReply | None]:
        """The answer among the replies coming within ``seconds`` (or None: send again, or
        give up), and the last transient refusal seen. After a transient refusal a better
        answer (an earlier copy's) is waited for ``pause`` seconds before sending again;
        on the ``last`` try, for all of ``seconds`` — unless it is the ``alone`` copy."""
        end = time.monotonic() + seconds
        transient: RawReply | None = None
        while (left := end - time.monotonic()) > 0:
            try:
                reply = await asyncio.wait_for(replies.get(), left)
            except TimeoutError:
                break
            if reply.status < 400:
                return reply, None
            if reply.code == "request_taken_over":
                continue  # a copy whose result was dropped: the repeat's answer counts
            if reply.code in TRANSIENT_CODES and not (last and alone):
                transient = reply
                if not last:
                    end = min(end, time.monotonic() + pause)
                continue
            return reply, None
        return None, transient

    async def _publish(
        self, message: aio_pika.Message, routing_key: str, deadline: float, seconds: float, retrying: bool
    ) -> None:
        """Publish once the client is connected; when ``retrying``, a publish the broker
        did not take is tried again each second until ``deadline``."""
        while True:
            try:
                if not self._connected.is_set():  # a node went away: wait while the client moves
                    await asyncio.wait_for(self._connected.wait(), max(deadline - time.monotonic(), 0.01))
                assert self._requests is not None
                # bounded: a hung broker must not hold the caller past its deadline (a copy
                # it takes later is refused by its sam-answer-by)
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await self._requests.publish(message, routing_key=routing_key, mandatory=True)
                return
            except TimeoutError:
                raise SamTimeout(message.message_id or "", seconds) from None
            except aiormq.exceptions.ChannelAccessRefused as exc:
                # the user's permissions will not change while we wait: say so now
                raise SamAccessRefused(
                    f"the broker refused {self.user_id} publishing to {REQUESTS_EXCHANGE} "
                    f"({broker_reply_text(exc)}): its permissions must allow writing there"
                ) from None
            except (
                aiormq.exceptions.ChannelPreconditionFailed,
                aiormq.exceptions.ChannelNotFoundEntity,
            ) as exc:
                # the broker closed the channel over this very message (a user_id that is
                # not the login's, say): sending it again would meet the same answer
                raise SamAccessRefused(
                    f"the broker refused the request {message.message_id}: {broker_reply_text(exc)}"
                ) from exc
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
                if not retrying or time.monotonic() > deadline:
                    raise SamUnreachable(
                        f"the request {message.message_id} could not be published: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                await asyncio.sleep(1)

    async def call(
        self,
        operation: Operation | str,
        body: Any = None,
        *,
        sad: str | None = None,
        message_id: str | None = None,
    ) -> Any:
        """The untyped escape hatch: send a well-formed request of any ``operation`` with
        ``body`` (a JSON-able document, or a model, sent as the operation methods send it),
        asking again for a lost or unavailable answer; return the decoded reply document
        (``Any``: None for an empty one) or raise ``SamRequestError`` (or ``SamTimeout``:
        unknown). ``message_id``: to repeat a request sent before (same body and SAD)."""
        document = _wire(body) if isinstance(body, BaseModel) else (body if body is not None else {})
        reply = await self._request(str(operation), orjson.dumps(document), sad=sad, message_id=message_id)
        try:
            return reply.json()
        except orjson.JSONDecodeError:
            raise SamReplyError(str(operation), "JSON document", ["not JSON"]) from None

    async def _call(
        self,
        operation: Operation,
        body: dict[str, Any],
        reply_model: type[_M],
        *,
        sad: str | None = None,
        message_id: str | None = None,
    ) -> _M:
        reply = await self._request(operation.value, orjson.dumps(body), sad=sad, message_id=message_id)
        return _parse(reply_model, reply, operation.value)

    async def _key_pair_call(
        self, operation: Operation, body: dict[str, Any], *, sad: str | None = None, message_id: str | None
    ) -> KeyPairObject:
        return (await self._call(operation, body, KeyPairReply, sad=sad, message_id=message_id)).key_pair

    # --- operations -------------------------------------------------------------------
    #
    # Arguments are sent as given: the SAM, not the SDK, decides what it accepts (a
    # refusal names the stable code, schema_violation for what its schema refuses).
    # ``message_id``: that of an earlier call with the same arguments whose outcome is
    # unknown (``SamTimeout`` names it): the SAM answers with that call's result, so a
    # lost answer to an assignment or update is recovered instead of leaving a copy of
    # the key pair the SAM no longer takes.

    async def put_configuration(
        self, configuration: DynamicConfiguration, *, message_id: str | None = None
    ) -> None:
        """(Administrators) replace the dynamic configuration; its ``version`` must be above
        the current one (``configuration_version_conflict``)."""
        await self._request(
            Operation.configurations_dynamic_put.value,
            orjson.dumps(_wire(configuration)),
            sad=None,
            message_id=message_id,
        )

    async def get_configuration(self) -> DynamicConfiguration:
        """(Administrators) the current dynamic configuration (``configuration_missing``: none yet)."""
        return await self._call(Operation.configurations_dynamic_get, {}, DynamicConfiguration)

    async def create_key_pair(
        self,
        algorithm: Literal["RSA", "ECDSA"],
        *,
        size: int | None = None,
        named_curve: str | None = None,
        message_id: str | None = None,
    ) -> KeyPairObject:
        """A new key pair, unassigned: RSA of ``size`` bits or ECDSA on ``named_curve``."""
        template: dict[str, Any] = {"algorithm": algorithm}
        if size is not None:
            template["size"] = size
        if named_curve is not None:
            template["named_curve"] = named_curve
        return await self._key_pair_call(
            Operation.key_pairs_create, {"key_template": template}, message_id=message_id
        )

    async def assign_key_pair(
        self,
        key_pair: KeyPairObject,
        signer: str,
        subject: str,
        *,
        skad: str | None = None,
        pin: str | None = None,
        authorization_server: str | None = None,
        message_id: str | None = None,
    ) -> KeyPairObject:
        """Assign to ``signer`` (RFC 4514 ``subject``), whom ``authorization_server`` speaks
        for from now on (the SKAD's issuer if one is given; needed without a SKAD when
        this SSA may use several); ``pin`` enrols a SAM-managed factor."""
        body: dict[str, Any] = {"key_pair": _wire(key_pair), "signer": {"id": signer}, "subject": subject}
        if pin is not None:
            body["sam_factor"] = {"type": "pin", "value": pin}
        if authorization_server is not None:
            body["authorization_server"] = authorization_server
        return await self._key_pair_call(
            Operation.signers_key_pairs_assign, body, sad=skad, message_id=message_id
        )

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
    ) -> list[bytes]:
        """Sign DTBS/R (hashes); ``parameters`` is DER RSASSA-PSS-params for RSASSA-PSS.
        Returns one signature per digest, in order. ``message_id``: that of an earlier call
        with the same arguments whose outcome is unknown (``SamTimeout``) — the SAM answers
        with that call's result."""
        body: dict[str, Any] = {
            "signature_algorithm": signature_algorithm,
            "requests": [{"dtbs": _b64(d)} for d in digests],
            "key_pair": _wire(key_pair),
            "signer": {"id": signer},
        }
        if parameters is not None:
            body["signature_algorithm_parameters"] = _b64(parameters)
        if pin is not None:
            body["sam_factor"] = {"type": "pin", "value": pin}
        operation = Operation.signatures_create
        reply = await self._call(operation, body, SignaturesReply, sad=sad, message_id=message_id)
        if len(reply.signatures) != len(digests):
            problem = f"signatures: {len(reply.signatures)} for {len(digests)} DTBS/R"
            raise SamReplyError(operation.value, "SignaturesReply", [problem])
        return [_unb64(s.signature, operation.value, "signature") for s in reply.signatures]

    async def prove_possession(
        self,
        key_pair: KeyPairObject,
        info_der: bytes,
        signature_algorithm: str,
        parameters: bytes | None = None,
    ) -> bytes:
        """The SAM's signature over a DER CertificationRequestInfo for this key pair."""
        request: dict[str, Any] = {"dtbs": _b64(info_der), "signature_algorithm": signature_algorithm}
        if parameters is not None:
            request["signature_algorithm_parameters"] = _b64(parameters)
        operation = Operation.proofs_of_possession_create
        body = {"key_pair": _wire(key_pair), "request": request}
        reply = await self._call(operation, body, ProofOfPossessionReply)
        return _unb64(reply.signature, operation.value, "signature")

    async def certification_request(
        self, key_pair: KeyPairObject, signature_algorithm: str, parameters: bytes | None = None
    ) -> bytes:
        """A DER PKCS#10 request for an assigned key pair (the copy the SAM returned, with
        its public key and subject), signed by the SAM as proof of possession."""
        if key_pair.public_key is None or key_pair.subject is None:
            raise SamClientError(
                "the key pair has no public_key or subject: pass the assigned copy the SAM returned"
            )
        try:
            public_key = base64.b64decode(key_pair.public_key, validate=True)
        except (binascii.Error, ValueError):
            raise SamClientError("the key pair's public_key is not base64") from None
        info = build_certification_request_info(public_key, key_pair.subject)
        signature = await self.prove_possession(key_pair, info, signature_algorithm, parameters)
        return assemble_certification_request(info, signature_algorithm, parameters, signature)

    async def update_key_pair(
        self,
        key_pair: KeyPairObject,
        signer: str,
        *,
        certified: bool = True,
        enabled: bool = True,
        certificate: bytes | None = None,
        chain: Sequence[bytes] | None = None,
        message_id: str | None = None,
    ) -> KeyPairObject:
        """Certify (with the DER ``certificate`` and the intermediates in ``chain`` up to a
        trust anchor), enable or disable the signer's key pair."""
        body: dict[str, Any] = {
            "key_pair": _wire(key_pair),
            "signer": {"id": signer},
            "status": {"assigned": True, "certified": certified, "enabled": enabled},
        }
        if certificate is not None:
            body["certificate"] = _b64(certificate)
        if chain:
            body["certificate_chain"] = [_b64(der) for der in chain]
        return await self._key_pair_call(Operation.key_pairs_update, body, message_id=message_id)

    async def delete_key_pair(
        self,
        key_pair: KeyPairObject,
        signer: str | None,
        sad: str | None = None,
        *,
        message_id: str | None = None,
    ) -> KeyPairDeleteReply:
        """Delete a key pair for good; an assigned one needs its ``signer``, and ``sad``,
        when given, is the signer's deletion SAD."""
        body: dict[str, Any] = {"key_pair": _wire(key_pair)}
        if signer is not None:
            body["signer"] = {"id": signer}
        return await self._call(
            Operation.key_pairs_delete, body, KeyPairDeleteReply, sad=sad, message_id=message_id
        )

    async def rewrap_key_pair(
        self, key_pair: KeyPairObject, *, message_id: str | None = None
    ) -> KeyPairObject:
        """The key pair wrapped under the current KEK (unchanged if it already is)."""
        return await self._key_pair_call(
            Operation.key_pairs_rewrap, {"key_pair": _wire(key_pair)}, message_id=message_id
        )

    async def bind_key_pair(
        self,
        key_pair: KeyPairObject,
        owner: str,
        authorization_server: str | None = None,
        *,
        message_id: str | None = None,
    ) -> KeyPairObject:
        """(Administrators) bind a key pair to the SSA ``owner``: one sealed before key
        pairs had owners, or one moved to another SSA."""
        body: dict[str, Any] = {"key_pair": _wire(key_pair), "owner": owner}
        if authorization_server is not None:
            body["authorization_server"] = authorization_server
        return await self._key_pair_call(Operation.key_pairs_bind, body, message_id=message_id)
