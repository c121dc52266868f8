"""Connecting to the broker with a TLS client certificate (EXTERNAL auth).

Clients (the SDK, tools) use aio-pika's robust connection. The worker does not: a
worker that loses its connection exits and is started again by its supervisor
(``connect_worker``), because restoring its stream consumers, confirm channels and
in-flight state behind a reconnect proved unreliable, while a fresh start replays the
streams and is known to be right. With several node URLs (a cluster) a starting worker
takes the first node that answers, beginning at a place its instance name picks, so
replicas spread over the nodes and a stopped node only costs its workers a restart.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import zlib

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from worker.settings import TlsFiles, split_urls
from worker.transport import codec

__all__ = ["connect", "connect_worker", "rotated", "tls_context"]

log = logging.getLogger(__name__)


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    """A client TLS context (1.2 or later) that verifies the broker against the CA and
    presents our certificate; ``OSError`` or ``ssl.SSLError`` if a file is missing or unusable."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


async def connect(urls: str, tls: TlsFiles) -> AbstractRobustConnection:
    """A robust connection (tools, SIEM consumers) to the first of the comma-separated
    node ``urls`` that answers; it reconnects to that node."""
    codec.install()
    context = tls_context(tls)
    nodes = split_urls(urls)
    for url in nodes[:-1]:
        try:
            return await aio_pika.connect_robust(url, ssl_context=context)
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
            log.warning("broker node %s not reachable (%s)", _host(url), type(exc).__name__)
    return await aio_pika.connect_robust(nodes[-1], ssl_context=context)


def rotated(urls: tuple[str, ...], name: str) -> list[str]:
    """``urls`` starting at a place ``name`` picks (stable for a name, spread over names)."""
    start = zlib.crc32(name.encode()) % len(urls)
    return list(urls[start:] + urls[:start])


async def connect_worker(
    urls: tuple[str, ...], tls: TlsFiles, patience: float, instance: str
) -> AbstractConnection:
    """A plain connection to the first node that answers, tried round after round for
    ``patience`` seconds (the broker may be starting). Frames are decoded by the
    tolerant codec, so no property a client chose can cost the worker its connection."""
    codec.install()
    logging.getLogger("aiormq.connection").addFilter(_own_connect_failures)
    deadline = time.monotonic() + patience
    delay = 0.5
    context = tls_context(tls)
    failures = 0
    while True:
        for url in rotated(urls, instance):
            try:
                connection = await asyncio.wait_for(aio_pika.connect(url, ssl_context=context), 10)
            except (TimeoutError, ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                failures += 1
                # once per node and outage, not once per try: the try count comes at the end
                level = logging.WARNING if failures <= len(urls) else logging.DEBUG
                log.log(level, "broker node %s not reachable (%s); trying on", _host(url), type(exc).__name__)
                continue
            after = f" after {failures} failed tries" if failures else ""
            log.info("connected to broker node %s%s", _host(url), after)
            return connection
        if time.monotonic() + delay > deadline:
            raise ConnectionError(f"no broker node reachable within {patience} s ({failures} tries)")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5)


def _own_connect_failures(record: logging.LogRecord) -> bool:
    """aiormq logs every failed connection attempt as an ERROR; ``connect_worker`` says
    it once per outage, with a count."""
    return not str(record.msg).startswith("error when creating transport")


def _host(url: str) -> str:
    """host:port of an AMQP URL, for logs (never the query string)."""
    return url.split("://", 1)[-1].split("/", 1)[0]
