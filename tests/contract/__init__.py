"""Contract suites: one per port, over the fake and the real adapter."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from sam_devtools.stack import Stack
from worker.client import ClientProfile
from worker.settings import TlsFiles
from worker.transport.amqp import tls_context


@contextlib.asynccontextmanager
async def bench_stream(
    stack: Stack, kind: str
) -> AsyncIterator[tuple[AbstractConnection, AbstractChannel, str]]:
    """A fresh stream of the session's broker, ``bench.contract-<kind>-<uuid>`` (the bench
    user may declare queues under its own name), with a connection and a channel to set it
    up: deleted, and the connection closed, at the end."""
    profile = ClientProfile.model_validate_json(stack.profile("bench").read_text())
    tls = TlsFiles(ca_file=profile.ca_file, cert_file=profile.cert_file, key_file=profile.key_file)
    connection = await aio_pika.connect(profile.url, ssl_context=tls_context(tls))
    name = f"bench.contract-{kind}-{uuid.uuid4()}"
    try:
        setup = await connection.channel()
        await setup.declare_queue(name, durable=True, arguments={"x-queue-type": "stream"})
        try:
            yield connection, setup, name
        finally:
            await setup.queue_delete(name)
    finally:
        await connection.close()
