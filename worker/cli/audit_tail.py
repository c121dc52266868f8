"""``sam-admin audit tail`` and ``sam-admin audit archive``: the SIEM side of the audit
trail.

``tail`` reads the SIEM user's queue on ``sam.audit`` (``<user>.audit``, which the
broker definitions declare and bind with ``#``), verifies every entry as it arrives
(hash, link to the previous entry of its chain, checkpoint signature) and prints it as a
JSON line; problems go to standard error.

``archive`` reads ``sam.audit.archive`` — the stream that holds every committed batch —
from an offset or a point in time: how a SIEM whose queue missed entries (it was full,
rejected publishes, was not bound yet) gets them back. It prints every entry and then
verifies what it read as a whole (``verify``'s checks; chains start where the read
starts, and batches a later checkpoint retracts are left out).

The exit status is 1 if any entry failed verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import sys

import aio_pika
import orjson
from cryptography.hazmat.primitives.asymmetric import ec

from worker.client import (
    ClientProfile,
    SamAccessRefused,
    SamUnreachable,
    check_identity,
    describe_connection_failure,
)
from worker.domain.audit import ChainFollower, verify_entries
from worker.transport.amqp import connect as connect_robust
from worker.transport.topology import AUDIT_ARCHIVE_STREAM, AUDIT_EXCHANGE, siem_queue

__all__ = ["read_archive", "tail"]


async def connect(profile: ClientProfile) -> aio_pika.abc.AbstractRobustConnection:
    """The SIEM's connection; ``SamUnreachable`` naming the cause if there is none."""
    tls = profile.tls_files()
    check_identity(tls, profile.user_id)
    try:
        return await asyncio.wait_for(connect_robust(profile.url, tls), 15)
    except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
        raise SamUnreachable(
            "no broker node reachable: " + describe_connection_failure(exc, profile.url, tls)
        ) from None


async def tail(
    profile: ClientProfile,
    queue_name: str | None,
    key: ec.EllipticCurvePublicKey,
    count: int | None,
    idle_timeout: float | None,
) -> int:
    """Follow ``sam.audit`` through ``queue_name`` (default ``<user>.audit``; it must exist:
    SIEMs declare nothing), verifying and printing each entry, until ``count`` entries or
    ``idle_timeout`` seconds without one; returns 1 if any entry failed verification, and
    raises ``SamAccessRefused`` if the queue cannot be read."""
    follower = ChainFollower(key)
    seen, failures = 0, 0
    connection = await connect(profile)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=256)
        name = queue_name or siem_queue(profile.user_id)
        try:
            # the operator's definitions declare and bind it; a SIEM may do neither
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed as closed:
            raise SamAccessRefused(
                f"queue {name!r} cannot be read ({closed.args[1] if len(closed.args) > 1 else closed}): "
                f"the broker definitions declare one per SIEM user, bound to {AUDIT_EXCHANGE}, "
                "which only that user may read"
            ) from None
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


async def read_archive(
    profile: ClientProfile,
    offset: str | int | datetime.datetime,
    key: ec.EllipticCurvePublicKey,
    idle_timeout: float,
    count: int | None = None,
) -> int:
    """Print the archive's entries from ``offset`` (``first``, ``last``, ``next``, a stream
    offset, or a time) until ``idle_timeout`` seconds pass without a batch (or ``count``
    entries), then verify them together; returns 1 if anything failed verification."""
    lines: list[tuple[str, int, bytes]] = []
    arrived = asyncio.Event()
    connection = await connect(profile)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=64)  # a stream consumer needs a prefetch
        stream = await channel.get_queue(AUDIT_ARCHIVE_STREAM, ensure=False)

        async def on_batch(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            where = f"{AUDIT_ARCHIVE_STREAM}@{(message.headers or {}).get('x-stream-offset')!r}"
            for number, line in enumerate(message.body.splitlines(), 1):
                if line.strip():
                    lines.append((where, number, line))
                    sys.stdout.write(line.decode(errors="replace") + "\n")
            sys.stdout.flush()
            await message.ack()
            arrived.set()

        await stream.consume(on_batch, arguments={"x-stream-offset": offset})
        while count is None or len(lines) < count:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), idle_timeout)
            except TimeoutError:
                break
        with contextlib.suppress(Exception):
            await channel.close()
    report = verify_entries(lines, key)
    for problem in report.problems:
        print(f"BAD {problem}", file=sys.stderr)
    print(
        f"archive: {report.entries} entries, {len(report.chains)} chains, "
        f"{sum(c.retracted for c in report.chains.values())} retracted, {len(report.problems)} problems",
        file=sys.stderr,
    )
    return 0 if report.ok else 1
