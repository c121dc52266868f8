"""``sam-admin audit tail``: the SIEM side of the audit stream.

Binds a queue of the SIEM user's own to ``sam.audit`` (routing key ``#``), verifies every
entry as it arrives (hash, link to the previous entry of its chain, checkpoint
signature) and prints it as a JSON line; problems go to standard error. The exit status
is 1 if any entry failed verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import orjson
from cryptography.hazmat.primitives.asymmetric import ec

from worker.cli.sam import ClientProfile
from worker.domain.audit import ChainFollower
from worker.settings import TlsFiles
from worker.transport.amqp import connect
from worker.transport.topology import AUDIT_EXCHANGE

__all__ = ["tail"]


async def tail(
    profile: ClientProfile,
    queue_name: str | None,
    key: ec.EllipticCurvePublicKey,
    count: int | None,
    idle_timeout: float | None,
) -> int:
    """Follow ``sam.audit`` through ``queue_name`` (default ``<user>.audit``), verifying and
    printing each entry, until ``count`` entries or ``idle_timeout`` seconds without one;
    returns 1 if any entry failed verification."""
    tls = TlsFiles(ca_file=profile.ca_file, cert_file=profile.cert_file, key_file=profile.key_file)
    follower = ChainFollower(key)
    seen, failures = 0, 0
    connection = await connect(profile.url, tls)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(
            queue_name or f"{profile.user_id}.audit", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(AUDIT_EXCHANGE, routing_key="#")
        async with queue.iterator() as messages:
            while count is None or seen < count:
                try:
                    async with asyncio.timeout(idle_timeout):
                        message = await anext(messages)
                except (TimeoutError, StopAsyncIteration):
                    break
                async with message.process():
                    # one message: one or more entries, one JSON document per line
                    for line in message.body.splitlines():
                        if not line.strip():
                            continue
                        try:
                            problems = follower.feed(orjson.loads(line))
                        except orjson.JSONDecodeError:
                            problems = ["not JSON"]
                        seen += 1
                        failures += bool(problems)
                        for problem in problems:
                            print(f"BAD {problem}", file=sys.stderr)
                        sys.stdout.write(line.decode(errors="replace") + "\n")
                    sys.stdout.flush()
        with contextlib.suppress(Exception):
            await channel.close()
    return 1 if failures else 0
