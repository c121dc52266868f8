"""Connecting to the broker with a TLS client certificate (EXTERNAL auth)."""

from __future__ import annotations

import ssl

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from worker.settings import TlsFiles

__all__ = ["connect", "tls_context"]


def tls_context(tls: TlsFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


async def connect(url: str, tls: TlsFiles) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, ssl_context=tls_context(tls))
