"""Connecting to the broker with a TLS client certificate (EXTERNAL auth).

Clients (the SDK, tools) use aio-pika's robust connection. The worker does not: a
worker that loses its connection exits and is started again by its supervisor
(``connect_worker``), because restoring its stream consumers, confirm channels and
in-flight state behind a reconnect proved unreliable, while a fresh start replays the
streams and is known to be right.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from worker.settings import TlsFiles

__all__ = ["connect", "connect_worker", "tls_context"]

log = logging.getLogger(__name__)


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


async def connect(url: str, tls: TlsFiles) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, ssl_context=tls_context(tls))


async def connect_worker(url: str, tls: TlsFiles, patience: float) -> AbstractConnection:
    """A plain connection, retried for ``patience`` seconds (the broker may be starting)."""
    deadline = time.monotonic() + patience
    delay = 0.5
    while True:
        try:
            return await aio_pika.connect(url, ssl_context=tls_context(tls))
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("broker not reachable (%s); trying again in %.1f s", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
