"""The worker's small HTTP endpoint: ``/metrics`` (Prometheus), ``/live`` and ``/ready``.

Served on the event loop itself (no thread: a second Python thread would compete for
the GIL with PKCS#11 calls), so ``/live`` answering proves the loop is not stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)


class HealthServer:
    """``/metrics``, ``/live`` and ``/ready`` on the event loop; ``/ready`` answers 503 while
    any readiness check is false, any other path 404."""

    def __init__(
        self, registry: CollectorRegistry, readiness: Callable[[], dict[str, bool]], address: str, port: int
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._address, self._port = address, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._address, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, content_type, body = 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
            elif path == "/live":
                status, content_type, body = 200, "application/json", b'{"live":true}'
            elif path == "/ready":
                checks = self._readiness()
                ready = all(checks.values())
                status, content_type = (200 if ready else 503), "application/json"
                body = orjson.dumps({"ready": ready, "checks": checks})
            else:
                status, content_type, body = 404, "text/plain", b"not found"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
