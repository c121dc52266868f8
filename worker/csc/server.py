"""Running the gateway: settings → credential store (migrated), token verifier, the SDK
connection to the SAM, the aiohttp app on TLS; ``serve`` until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from worker.client import SamClient
from worker.csc.gateway import GatewayOptions, make_app
from worker.csc.settings import CscSettings
from worker.csc.store import SqliteCredentialStore
from worker.csc.tokens import ServiceTokenVerifier
from worker.domain.keys import load_public_key

__all__ = ["running", "serve"]

log = logging.getLogger(__name__)


def _tls(settings: CscSettings) -> ssl.SSLContext | None:
    if settings.plain_http:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return context


@contextlib.asynccontextmanager
async def running(settings: CscSettings) -> AsyncIterator[str]:
    """The gateway listening; yields its base URL (what precedes ``/csc/v2``)."""
    store = SqliteCredentialStore(settings.store_file)
    await asyncio.to_thread(store.migrate)
    issuers = {
        issuer: load_public_key(path.read_text()) for issuer, path in settings.authorization_servers.items()
    }
    tokens = ServiceTokenVerifier(
        issuers, settings.gateway_id, settings.clock_skew_seconds, settings.token_max_lifetime_seconds
    )
    options = GatewayOptions(
        settings.name, settings.multisign, settings.max_body_bytes, settings.body_timeout_seconds
    )
    async with SamClient.from_profile(settings.sam_profile, timeout=settings.sam_timeout_seconds) as sam:
        # keepalive_timeout also bounds a connection that never sends a whole request (a
        # TLS handshake done, then nothing or a header trickled byte by byte)
        runner = web.AppRunner(
            make_app(options, tokens, store, sam),
            access_log=None,
            keepalive_timeout=settings.idle_timeout_seconds,
        )
        await runner.setup()
        # reuse_port: one process per core on one port, the kernel spreading connections
        site = web.TCPSite(
            runner, settings.listen_host, settings.listen_port, ssl_context=_tls(settings), reuse_port=True
        )
        await site.start()
        scheme = "http" if settings.plain_http else "https"
        url = f"{scheme}://{settings.listen_host}:{settings.listen_port}"
        log.info("sam-csc %s listening on %s", settings.gateway_id, url)
        try:
            yield url
        finally:
            await runner.cleanup()


async def serve(settings: CscSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings):
        await stop.wait()
