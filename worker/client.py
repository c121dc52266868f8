"""The SSA SDK: an async client that signs each request, publishes it and awaits the
correlated reply.

It connects with a TLS client certificate (EXTERNAL), keeps one reply queue named under
its own user (``<user>.replies.<uuid>``, the only queues its broker permissions let it
read), signs every request with its registered JWS key and raises ``SamRequestError``
carrying the SAM's stable error code.

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
import contextlib
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from joserfc import jws
from joserfc.jwk import ECKey, RSAKey

from worker.domain.authorization import RequestBinding, request_jws_payload
from worker.domain.certification import assemble_certification_request, build_certification_request_info
from worker.domain.contract import (
    HEADER_ANSWER_BY,
    HEADER_REPEAT,
    HEADER_REQUEST_JWS,
    HEADER_SAD,
    HEADER_STATUS,
    OPERATION_QUEUE,
    Operation,
)
from worker.settings import TlsFiles, split_urls
from worker.transport.amqp import tls_context
from worker.transport.topology import REQUESTS_EXCHANGE, reply_queue_prefix

__all__ = ["TRANSIENT_CODES", "RawReply", "SamClient", "SamClientError", "SamRequestError", "SamTimeout"]

# Refusals that say "not now": nothing was released, and the very same request, sent again
# a little later, may succeed (a repeat of it gets whatever an earlier copy achieved).
TRANSIENT_CODES = frozenset({"audit_unavailable", "hsm_unavailable", "ledger_unavailable", "request_expired"})
# seconds to wait for a better answer after a transient one, before sending again
_RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0)
# the SAM releases no result later than this before the client gives up: the reply must
# still reach it, and the clocks of client and SAM may differ a little
_ANSWER_MARGIN_SECONDS = 1.0


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
    """The SAM refused the request; ``code`` is its stable error code."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


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


def _jws_key(pem: bytes) -> ECKey | RSAKey:
    text = pem.decode()
    return RSAKey.import_key(text) if "RSA" in text.split("\n", 1)[0] else ECKey.import_key(text)


class SamClient:
    """The SSA SDK: one TLS connection (EXTERNAL auth) to the broker, one reply queue of
    the user's own, every request signed with the user's registered JWS key; each
    operation of the contract as a method. Refusals raise ``SamRequestError``; each
    method asks again up to ``retries`` times for an answer that was lost or
    unavailable (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        tls: TlsFiles,
        user_id: str,
        jws_key_pem: bytes,
        timeout: float = 15.0,
        retries: int = 2,
    ) -> None:
        self.url = url
        self.urls = split_urls(url)
        self.tls = tls
        self.user_id = user_id
        self._key = _jws_key(jws_key_pem)
        self._alg = "ES256" if isinstance(self._key, ECKey) else "PS256"
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

    async def __aenter__(self) -> SamClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._closing = False
        await self._open(attempts=1)

    async def _open(self, attempts: int) -> None:
        """Connect to the first node that answers, trying them in turn from the current
        one for ``attempts`` rounds (0: until closed)."""
        context = tls_context(self.tls)
        failure: BaseException | None = None
        rounds = 0
        while not self._closing:
            for _ in self.urls:
                url = self.urls[self._node]
                try:
                    await asyncio.wait_for(self._open_on(url, context), 10)
                    return
                except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                    failure = exc
                    self._node = (self._node + 1) % len(self.urls)
            rounds += 1
            if attempts and rounds >= attempts:
                break
            await asyncio.sleep(min(0.5 * rounds, 2))
        raise ConnectionError(f"no broker node reachable: {failure!r}")

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
        with contextlib.suppress(ConnectionError):
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

    def sign_request(self, body: bytes, message_id: str, operation: str, user_id: str | None = None) -> str:
        binding = RequestBinding(body, message_id, operation, user_id or self.user_id)
        payload = request_jws_payload(binding, int(time.time()))
        return jws.serialize_compact({"alg": self._alg, "kid": self.user_id}, payload, self._key)

    async def send(
        self,
        operation: str,
        body: bytes,
        *,
        sad: str | None = None,
        request_jws: str | None = None,
        sign: bool = True,
        message_id: str | None = None,
        user_id: str | None = "",
        routing_key: str | None = None,
        reply_to: str | None = "",
        headers: dict[str, Any] | None = None,
        reply_timeout: float | None = None,
        wait: bool = True,
        retries: int = 0,
    ) -> RawReply | None:
        """Publish one request as given and wait for its reply (low level; tests use
        it to send what a well-behaved SSA would not).

        ``retries``: after a timeout, a transient refusal (``TRANSIENT_CODES``) or a
        publish the broker did not take, publish the very same message again — same
        message_id, correlation_id, JWS and SAD: a repeat, which the SAM answers with the
        original result. A success wins over any refusal; ``request_taken_over`` is
        never the answer; later replies are counted in ``unmatched_replies``."""
        assert self._channel is not None, "not connected"
        message_id = message_id or str(uuid.uuid4())
        if request_jws is None and sign:
            request_jws = self.sign_request(body, message_id, operation)
        seconds = reply_timeout or self.timeout
        all_headers: dict[str, Any] = dict(headers or {})
        if wait and HEADER_ANSWER_BY not in all_headers:
            # when this client gives up on every copy: the SAM releases nothing after it
            give_up = time.time() + seconds * (retries + 1) - _ANSWER_MARGIN_SECONDS
            all_headers[HEADER_ANSWER_BY] = int(give_up * 1000)
        if request_jws is not None:
            all_headers[HEADER_REQUEST_JWS] = request_jws
        if sad is not None:
            all_headers[HEADER_SAD] = sad
        if routing_key is None:
            try:
                routing_key = OPERATION_QUEUE[Operation(operation)].value
            except ValueError:
                routing_key = "signatures"
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=str(uuid.uuid4()),
            reply_to=self._reply_queue_name if reply_to == "" else reply_to,
            user_id=self.user_id if user_id == "" else user_id,
            type=operation,
            timestamp=time.time(),
            headers=all_headers,
        )
        return await self._exchange(message, routing_key, seconds, wait, retries)

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
            raise SamTimeout(message.message_id, seconds)
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
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError):
                if not retrying or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

    async def call(
        self,
        operation: Operation | str,
        body: Any = None,
        *,
        sad: str | None = None,
        message_id: str | None = None,
    ) -> Any:
        """Send a well-formed request, asking again for a lost or unavailable answer; return
        the reply document or raise ``SamRequestError`` (or ``SamTimeout``: unknown).
        ``message_id``: to repeat a request sent before (with the same body and SAD)."""
        payload = orjson.dumps(body if body is not None else {})
        reply = await self.send(str(operation), payload, sad=sad, message_id=message_id, retries=self.retries)
        assert reply is not None
        document = reply.json()
        if reply.status >= 400:
            error = (document or {}).get("error", {})
            raise SamRequestError(
                reply.status, error.get("code", "unknown"), error.get("message", ""), error.get("request_id")
            )
        return document

    # --- operations -------------------------------------------------------------------

    async def put_configuration(self, configuration: dict[str, Any]) -> None:
        await self.call(Operation.configurations_dynamic_put, configuration)

    async def get_configuration(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(Operation.configurations_dynamic_get)
        return result

    async def create_key_pair(
        self, algorithm: str, *, size: int | None = None, named_curve: str | None = None
    ) -> dict[str, Any]:
        template: dict[str, Any] = {"algorithm": algorithm}
        if size is not None:
            template["size"] = size
        if named_curve is not None:
            template["named_curve"] = named_curve
        result = await self.call(Operation.key_pairs_create, {"key_template": template})
        return dict(result["key_pair"])

    async def assign_key_pair(
        self,
        key_pair: dict[str, Any],
        signer: str,
        subject: str,
        *,
        skad: str | None = None,
        pin: str | None = None,
        authorization_server: str | None = None,
    ) -> dict[str, Any]:
        """Assign to ``signer`` (RFC 4514 ``subject``), whom ``authorization_server`` speaks
        for from now on (the SKAD's issuer if one is given; needed without a SKAD when
        this SSA may use several); ``pin`` enrols a SAM-managed factor."""
        body: dict[str, Any] = {"key_pair": key_pair, "signer": {"id": signer}, "subject": subject}
        if pin is not None:
            body["sam_factor"] = {"type": "pin", "value": pin}
        if authorization_server is not None:
            body["authorization_server"] = authorization_server
        result = await self.call(Operation.signers_key_pairs_assign, body, sad=skad)
        return dict(result["key_pair"])

    async def sign(
        self,
        key_pair: dict[str, Any],
        signer: str,
        signature_algorithm: str,
        digests: list[bytes],
        sad: str,
        *,
        parameters: bytes | None = None,
        pin: str | None = None,
        message_id: str | None = None,
    ) -> list[bytes]:
        """Sign DTBS/R (hashes); ``parameters`` is DER RSASSA-PSS-params for RSASSA-PSS.
        ``message_id``: that of an earlier call with the same arguments whose outcome is
        unknown (``SamTimeout``) — the SAM answers with that call's result."""
        body: dict[str, Any] = {
            "signature_algorithm": signature_algorithm,
            "requests": [{"dtbs": base64.b64encode(d).decode()} for d in digests],
            "key_pair": key_pair,
            "signer": {"id": signer},
        }
        if parameters is not None:
            body["signature_algorithm_parameters"] = base64.b64encode(parameters).decode()
        if pin is not None:
            body["sam_factor"] = {"type": "pin", "value": pin}
        result = await self.call(Operation.signatures_create, body, sad=sad, message_id=message_id)
        return [base64.b64decode(s["signature"]) for s in result["signatures"]]

    async def prove_possession(
        self,
        key_pair: dict[str, Any],
        info_der: bytes,
        signature_algorithm: str,
        parameters: bytes | None = None,
    ) -> bytes:
        """The SAM's signature over a DER CertificationRequestInfo for this key pair."""
        request: dict[str, Any] = {
            "dtbs": base64.b64encode(info_der).decode(),
            "signature_algorithm": signature_algorithm,
        }
        if parameters is not None:
            request["signature_algorithm_parameters"] = base64.b64encode(parameters).decode()
        result = await self.call(
            Operation.proofs_of_possession_create, {"key_pair": key_pair, "request": request}
        )
        return base64.b64decode(result["signature"])

    async def certification_request(
        self, key_pair: dict[str, Any], signature_algorithm: str, parameters: bytes | None = None
    ) -> bytes:
        """A DER PKCS#10 request for an assigned key pair, signed by the SAM as proof of possession."""
        info = build_certification_request_info(base64.b64decode(key_pair["public_key"]), key_pair["subject"])
        signature = await self.prove_possession(key_pair, info, signature_algorithm, parameters)
        return assemble_certification_request(info, signature_algorithm, parameters, signature)

    async def update_key_pair(
        self,
        key_pair: dict[str, Any],
        signer: str,
        *,
        certified: bool = True,
        enabled: bool = True,
        certificate: bytes | None = None,
        chain: list[bytes] | None = None,
    ) -> dict[str, Any]:
        """Certify (with the DER ``certificate`` and the intermediates in ``chain`` up to a
        trust anchor), enable or disable the signer's key pair."""
        body: dict[str, Any] = {
            "key_pair": key_pair,
            "signer": {"id": signer},
            "status": {"assigned": True, "certified": certified, "enabled": enabled},
        }
        if certificate is not None:
            body["certificate"] = base64.b64encode(certificate).decode()
        if chain:
            body["certificate_chain"] = [base64.b64encode(der).decode() for der in chain]
        result = await self.call(Operation.key_pairs_update, body)
        return dict(result["key_pair"])

    async def delete_key_pair(
        self, key_pair: dict[str, Any], signer: str | None, sad: str | None = None
    ) -> None:
        body: dict[str, Any] = {"key_pair": key_pair}
        if signer is not None:
            body["signer"] = {"id": signer}
        await self.call(Operation.key_pairs_delete, body, sad=sad)

    async def rewrap_key_pair(self, key_pair: dict[str, Any]) -> dict[str, Any]:
        result = await self.call(Operation.key_pairs_rewrap, {"key_pair": key_pair})
        return dict(result["key_pair"])

    async def bind_key_pair(
        self, key_pair: dict[str, Any], owner: str, authorization_server: str | None = None
    ) -> dict[str, Any]:
        """(Administrators) bind a key pair to the SSA ``owner``: one sealed before key
        pairs had owners, or one moved to another SSA."""
        body: dict[str, Any] = {"key_pair": key_pair, "owner": owner}
        if authorization_server is not None:
            body["authorization_server"] = authorization_server
        result = await self.call(Operation.key_pairs_bind, body)
        return dict(result["key_pair"])
