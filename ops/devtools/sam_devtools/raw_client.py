"""The SDK with the knobs only tests need: ``RawSamClient.send`` publishes a request as
given — unsigned, with another JWS, user id, routing key, reply queue or headers, without
waiting — and returns the reply as it arrived (a ``RawReply``), refusals included.

A well-behaved SSA never needs any of this; it stays out of ``worker.client``'s public
API, here in the test tooling.
"""

from __future__ import annotations

import uuid
from typing import Any

from worker.client import RawReply, SamClient
from worker.domain.contract import HEADER_ANSWER_BY, HEADER_REQUEST_JWS, HEADER_SAD

__all__ = ["RawReply", "RawSamClient"]


class RawSamClient(SamClient):
    """A ``SamClient`` that also sends what a well-behaved SSA would not."""

    def sign_request(self, body: bytes, message_id: str, operation: str, user_id: str | None = None) -> str:
        """The request JWS binding ``body``, ``message_id``, ``operation`` and ``user_id``
        (default: this client's), signed with this client's JWS key."""
        return self._sign_request(body, message_id, operation, user_id)

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
        it to send what a well-behaved SSA would not). ``user_id`` and ``reply_to``: ``""``
        for this client's own, None for none; ``wait=False`` returns None once published.

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
            all_headers[HEADER_ANSWER_BY] = self._answer_by(seconds, retries)
        if request_jws is not None:
            all_headers[HEADER_REQUEST_JWS] = request_jws
        if sad is not None:
            all_headers[HEADER_SAD] = sad
        message = self._message(
            operation,
            body,
            message_id,
            all_headers,
            reply_to=self._reply_queue_name if reply_to == "" else reply_to,
            user_id=self.user_id if user_id == "" else user_id,
        )
        if routing_key is None:
            routing_key = self._routing_key(operation)
        return await self._exchange(message, routing_key, seconds, wait, retries)
